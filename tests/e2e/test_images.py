"""/refine and /variations on attached images: every option, the three formats (recognised by
their content, not their name), outputs at the size the engine fits the input to, and charges.

img2img works at about 1 megapixel whatever the input size (engine.validate.fit_size), which is
slow for the tiny model's VAE on a CPU, so the 4-image default of /variations is checked on the
queued job and then cancelled; the Variations button test runs a 4-image job to the end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.jobs import Refine, Variations
from engine.validate import fit_size
from studio.harness import Studio
from tests.e2e.member_kit import (
    EDITING_BUTTONS,
    assert_queued,
    assert_refused,
    fields,
    job,
    labels,
    ledger,
    sizes,
    used,
    wait_status,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


def picture(width: int, height: int, fmt: str, seed: int = 0) -> bytes:
    """A smooth gradient with some noise, encoded as `fmt` (PNG, JPEG, WEBP)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype("uint8")
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, fmt)
    return out.getvalue()


async def test_refine_a_png_with_the_defaults(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs = studio.bot.wiring.outputs
    saved: dict[str, bytes] = {}  # every input as the bot stored it for the engine

    def save_input(job_id: str, data: bytes) -> Path:
        saved[job_id] = data
        return type(outputs).save_input(outputs, job_id, data)

    monkeypatch.setattr(outputs, "save_input", save_input)
    member = studio.new_member("png-refiner")
    inter = await studio.command(
        member,
        "refine",
        {"prompt": "a mossy rock"},
        attachments=[("rock.png", picture(320, 256, "PNG"), "image/png")],
    )
    job_id = assert_queued(inter)
    result = await studio.result_of(job_id)

    fitted = fit_size(320, 256)
    assert sizes(studio.sb, result) == [fitted]
    assert labels(result) == ["Reroll", "Upscale", "Variations", "Refine", "Delete", *EDITING_BUTTONS]
    assert result.embeds[0]["description"] == "a mossy rock"
    assert result.embeds[0]["author"]["name"].startswith("Refine")
    f = fields(result)
    assert f["Strength"] == "0.3" and f["Model"] == "tiny" and f["Size"] == f"{fitted[0]}×{fitted[1]}"
    assert f["Job"] == job_id

    record = await job(studio, job_id)
    assert record.kind == "refine" and record.status == "done"
    assert record.params["strength"] == 0.3 and record.params["input_size"] == list(fitted)
    cost = Refine(job_id="x", image=b"", steps=4, strength=0.3).cost(fitted)
    assert record.cost == pytest.approx(cost)
    assert await ledger(studio, member) == [("reserve", cost, job_id), ("commit", cost, job_id)]

    # Reroll on an image job: the same input image again, a new seed, on the clicker's quota.
    clicker = studio.new_member("png-reroller")
    again_id = assert_queued(await studio.click(clicker, result, "Reroll"))
    again = await studio.result_of(again_id)
    assert sizes(studio.sb, again) == [fitted]
    again_record = await job(studio, again_id)
    assert again_record.kind == "refine" and again_record.owner_id == clicker.id
    assert again_record.params["seed"] != record.params["seed"]
    assert saved[again_id] == saved[job_id]
    # Inputs are kept only while their job may need them (issue 12): both ended, both are gone.
    assert not outputs.input_path(job_id).exists() and not outputs.input_path(again_id).exists()
    assert await used(studio, clicker) == pytest.approx(cost)


async def test_refine_a_jpeg_named_png_with_strength_and_model(studio: Studio) -> None:
    member = studio.new_member("jpeg-refiner")
    data = picture(300, 200, "JPEG", seed=1)
    assert data[:3] == b"\xff\xd8\xff"  # a JPEG, whatever its name says
    inter = await studio.command(
        member,
        "refine",
        {"strength": 0.5, "model": "tiny-base"},
        attachments=[("scan.png", data, "image/png")],
    )
    job_id = assert_queued(inter)
    result = await studio.result_of(job_id)
    fitted = fit_size(300, 200)
    assert sizes(studio.sb, result) == [fitted]
    f = fields(result)
    assert f["Strength"] == "0.5" and f["Model"] == "tiny-base"
    assert result.embeds[0]["description"] == "*(no prompt)*"
    record = await job(studio, job_id)
    assert record.params["strength"] == 0.5 and record.params["model"] == "tiny-base"


async def test_variations_of_a_webp_with_count_strength_and_prompt(studio: Studio) -> None:
    member = studio.new_member("webp-varier")
    data = picture(256, 192, "WEBP", seed=2)
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    inter = await studio.command(
        member,
        "variations",
        {"prompt": "a blue door", "count": 2, "strength": 0.8, "model": "tiny"},
        attachments=[("door.bin", data, "application/octet-stream")],
    )
    job_id = assert_queued(inter)
    result = await studio.result_of(job_id)
    fitted = fit_size(256, 192)
    assert sizes(studio.sb, result) == [fitted, fitted]
    assert labels(result) == ["U1", "U2", "V1", "V2", "Reroll", "Delete"]
    f = fields(result)
    assert f["Strength"] == "0.8" and f["Model"] == "tiny"
    seeds = [int(s) for s in f["Seeds"].split(", ")]
    assert seeds == [seeds[0], seeds[0] + 1]
    assert result.embeds[0]["description"] == "a blue door"
    record = await job(studio, job_id)
    assert record.kind == "variations" and record.params["count"] == 2 and record.params["strength"] == 0.8
    cost = Variations(job_id="x", image=b"", steps=4, strength=0.8, count=2).cost(fitted)
    assert record.cost == pytest.approx(cost)
    assert await used(studio, member) == pytest.approx(cost)


async def test_variations_default_to_four_images_at_strength_0_6(studio: Studio) -> None:
    member = studio.new_member("default-varier")
    scheduler = studio.bot.wiring.scheduler
    scheduler.pause()
    try:
        inter = await studio.command(
            member, "variations", attachments=[("a.png", picture(200, 200, "PNG", seed=3), "image/png")]
        )
        job_id = assert_queued(inter)
        record = await job(studio, job_id)
        assert record.params["count"] == 4 and record.params["strength"] == 0.6
        fitted = fit_size(200, 200)
        cost = Variations(job_id="x", image=b"", steps=4, strength=0.6, count=4).cost(fitted)
        assert record.cost == pytest.approx(cost)
        assert f"Cost {cost:.2f} units" in (inter.response.content or "")
        assert await scheduler.cancel(job_id)
    finally:
        scheduler.resume()
    await wait_status(studio, inter, "Cancelled")
    assert await ledger(studio, member) == [("reserve", cost, job_id), ("refund", cost, job_id)]


async def test_a_file_that_is_not_an_image_is_refused_and_nothing_charged(studio: Studio) -> None:
    member = studio.new_member("not-an-image")
    inter = await studio.command(
        member, "refine", attachments=[("notes.png", b"this is plain text, not a picture", "image/png")]
    )
    assert_refused(inter)
    assert await ledger(studio, member) == []
