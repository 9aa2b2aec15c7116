"""Editing through the sandbox with the real bot and engine: /edit (region or mask), /zoom, /pan,
the Vary Region picker, Zoom Out and the Pans on results, what is kept staying exactly, refusals
that cost nothing, Remix's modal (/settings), and /settings' defaults for /generate.

Edits keep a large source's resolution and scale a small one up to SDXL's ~1 MP, like img2img,
so the jobs here run at about a megapixel on the tiny model."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from engine import validate
from engine.jobs import Edit, Pan, Zoom
from engine.masks import region_mask
from engine.pnginfo import read_parameters
from sandbox import InteractionRecord, Message
from studio.harness import Studio, open_studio, tiny_settings
from tests.e2e.member_kit import (
    assert_nothing_charged,
    assert_queued,
    assert_refused,
    fields,
    generate,
    image,
    job,
    labels,
    ledger,
    sizes,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

# A 1024² source pans once (1536×1024) but not twice (2304×1024 is over this cap).
MAX_PIXELS = 1536 * 1024
EDITING = ["Vary Region", "Zoom Out", "Pan Left", "Pan Right", "Pan Up", "Pan Down"]
ONE_IMAGE = ["Reroll", "Upscale", "Variations", "Refine", "Delete", *EDITING]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(
        tiny_model_dir,
        studio_dir,
        generation={"max_attachment_pixels": MAX_PIXELS},
        moderation={"blocklist": [r"forbidden\w*"]},
    )
    async with open_studio(settings) as running:
        yield running


def picture(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC).save(out, "PNG")
    return out.getvalue()


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def fitted(studio: Studio, data: bytes) -> Image.Image:
    """The source as the bot fits it for an edit."""
    gen = studio.bot.settings.generation
    png, _ = validate.prepare_input_image(
        data, max_bytes=gen.max_attachment_bytes, max_pixels=gen.max_attachment_pixels, keep_resolution=True
    )
    return Image.open(io.BytesIO(png)).convert("RGB")


def far_from(mask: Image.Image, distance: int) -> np.ndarray:
    """Pixels further than `distance` px from the white part of a box-shaped mask."""
    ys, xs = np.nonzero(np.asarray(mask) > 0)
    near = np.zeros(mask.size[::-1], bool)
    y0, y1, x0, x1 = ys.min() - distance, ys.max() + distance + 1, xs.min() - distance, xs.max() + distance + 1
    near[max(0, y0) : y1, max(0, x0) : x1] = True
    return ~near


def result_image(studio: Studio, message: Message) -> Image.Image:
    (attachment,) = message.attachments
    return image(studio.sb, attachment).convert("RGB")


def diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int))


async def pick(studio: Studio, user: object, picker: InteractionRecord, regions: list[str]) -> InteractionRecord:
    """Choose regions in the Vary Region picker (the ephemeral answer to the click)."""
    message = picker.original
    assert message is not None and message.ephemeral
    (select,) = [c for c in message.iter_components() if c.get("type") == 3]
    inter = await studio.sb.click(user, message, select["custom_id"], values=regions)  # type: ignore[arg-type]
    await inter.wait_response(5)
    return inter


# ------------------------------------------------------------------------------------- /edit


async def test_edit_a_region_keeps_the_rest_exactly(studio: Studio) -> None:
    member = studio.new_member("region-editor")
    data = picture(640, 512, seed=1)
    options = {"prompt": "a round window", "region": "top-right"}
    inter = await studio.command(member, "edit", options, attachments=[("house.png", data, "image/png")])
    job_id = assert_queued(inter)
    result = await studio.result_of(job_id)
    source = fitted(studio, data)
    assert sizes(studio.sb, result) == [source.size]
    assert labels(result) == ONE_IMAGE
    f = fields(result)
    assert f["Region"] == "top-right" and f["Strength"] == "0.9"
    assert result.embeds[0]["author"]["name"].startswith("Vary Region")
    out = result_image(studio, result)
    mask = region_mask(["top-right"], source.size)
    assert diff(out, source)[far_from(mask, 32)].max() <= 8  # the contract (composited: exact)
    assert diff(out, source)[np.asarray(mask) == 255].mean() > 10
    params = read_parameters(studio.sb.file_bytes(result.attachments[0]))
    assert params is not None and (params["kind"], params["region"]) == ("edit", "top-right")
    record = await job(studio, job_id)
    cost = Edit(job_id="x", steps=4).cost(source.size)
    assert record.kind == "edit" and record.cost == pytest.approx(cost)
    assert await ledger(studio, member) == [("reserve", cost, job_id), ("commit", cost, job_id)]


async def test_edit_with_an_uploaded_mask(studio: Studio) -> None:
    """A mask painted on a transparent layer, at another size than the image."""
    member = studio.new_member("mask-editor")
    data = picture(1024, 768, seed=2)
    painted = Image.new("RGBA", (512, 384), (0, 0, 0, 0))
    painted.paste((0, 0, 0, 255), (64, 64, 192, 192))
    inter = await studio.command(
        member,
        "edit",
        {"prompt": "a cat", "strength": 1.0},
        attachments=[("photo.png", data, "image/png"), ("mask.png", encoded(painted), "image/png")],
    )
    job_id = assert_queued(inter)
    result = await studio.result_of(job_id)
    source = fitted(studio, data)
    assert fields(result)["Region"] == "mask"
    out = result_image(studio, result)
    mask = painted.getchannel("A").resize(source.size, Image.Resampling.NEAREST)
    assert diff(out, source)[far_from(mask, 32)].max() <= 8
    assert diff(out, source)[np.asarray(mask) == 255].mean() > 10
    record = await job(studio, job_id)
    assert record.params["mask"] and record.params["regions"] == [] and record.params["strength"] == 1.0


@pytest.mark.parametrize(
    ("options", "mask", "needle"),
    [
        ({"prompt": "a door"}, None, "give a `region`"),
        ({"prompt": "a door", "region": "top"}, encoded(Image.new("L", (64, 64), 0)), "not both"),
        ({"prompt": "a door"}, encoded(Image.new("L", (64, 64), 255)), "all white"),
        ({"prompt": "a door"}, encoded(Image.new("L", (64, 64), 0)), "all black"),
        ({"prompt": "a door"}, b"not an image at all", "mask"),
        ({"prompt": "a forbidden door", "region": "top"}, None, "blocked term"),
        ({"prompt": "a door", "region": "top", "model": "nope"}, None, "no model"),
    ],
)
async def test_edit_refusals_cost_nothing(
    studio: Studio, options: dict[str, object], mask: bytes | None, needle: str
) -> None:
    member = studio.new_member("refused-editor")
    files = [("photo.png", picture(256, 256), "image/png")]
    if mask is not None:
        files.append(("mask.png", mask, "image/png"))
    inter = await studio.command(member, "edit", options, attachments=files)
    assert needle.lower() in assert_refused(inter).lower()
    await assert_nothing_charged(studio, member)


async def test_a_source_that_is_not_an_image_or_too_large_is_refused(studio: Studio) -> None:
    member = studio.new_member("bad-source")
    for data in (b"plain text", picture(2048, 1024)):
        inter = await studio.command(member, "zoom", attachments=[("x.png", data, "image/png")])
        assert_refused(inter)
    await assert_nothing_charged(studio, member)


# ------------------------------------------------------------------------------ /zoom, /pan


async def test_zoom_keeps_the_shrunk_source_in_the_centre(studio: Studio) -> None:
    member = studio.new_member("zoomer")
    data = picture(1024, 1024, seed=3)
    inter = await studio.command(
        member, "zoom", {"factor": 1.5, "prompt": "a wide valley"}, attachments=[("v.png", data, "image/png")]
    )
    job_id = assert_queued(inter)
    result = await studio.result_of(job_id)
    assert sizes(studio.sb, result) == [(1024, 1024)]
    assert fields(result)["Zoom Out"] == "1.5×"
    out = result_image(studio, result)
    shrunk = Image.open(io.BytesIO(data)).convert("RGB").resize((682, 682), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out)[171:853, 171:853], np.asarray(shrunk))
    record = await job(studio, job_id)
    assert record.params["factor"] == 1.5 and record.cost == pytest.approx(Zoom(job_id="x", steps=4).cost((1024, 1024)))


async def test_pan_extends_and_a_second_pan_over_the_cap_is_refused(studio: Studio) -> None:
    member = studio.new_member("panner")
    data = picture(1024, 1024, seed=4)
    inter = await studio.command(member, "pan", {"direction": "up"}, attachments=[("p.png", data, "image/png")])
    job_id = assert_queued(inter)
    result = await studio.result_of(job_id)
    assert sizes(studio.sb, result) == [(1024, 1536)] and fields(result)["Pan"] == "up"
    out = result_image(studio, result)
    assert np.array_equal(np.asarray(out)[512:], np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    record = await job(studio, job_id)
    assert record.cost == pytest.approx(Pan(job_id="x", steps=4, direction="up").cost((1024, 1024)))
    before = await ledger(studio, member)
    # Up again would be 1024×2304: over this server's pixel cap, refused before anything is charged.
    refused = await studio.click(member, result, "Pan Up")
    assert_refused(refused, "1024×2304", "Pan another way")
    assert await ledger(studio, member) == before


# ------------------------------------------------------------------------ buttons on results


async def test_vary_region_picker_zoom_out_and_pan_buttons(studio: Studio) -> None:
    owner, clicker = studio.new_member("edit-owner"), studio.new_member("edit-clicker")
    parent_id, parent = await generate(studio, owner, {"prompt": "a lighthouse", "steps": 2, "seed": 5})
    assert labels(parent) == ONE_IMAGE

    picker = await studio.click(clicker, parent, "Vary Region")
    assert picker.response is not None and picker.response.ephemeral
    chosen = await pick(studio, clicker, picker, ["top-left", "center"])
    edit_id = assert_queued(chosen)
    edited = await studio.result_of(edit_id)
    assert fields(edited)["Region"] == "center, top-left"  # in the grid's order
    record = await job(studio, edit_id)
    assert record.owner_id == clicker.id and record.params["regions"] == ["center", "top-left"]
    assert record.params["parent"] == {"job": parent_id, "action": "edit", "index": 0}
    assert record.params["prompt"] == "a lighthouse"

    zoom_id = assert_queued(await studio.click(clicker, parent, "Zoom Out"))
    zoomed = await studio.result_of(zoom_id)
    assert fields(zoomed)["Zoom Out"] == "2×" and sizes(studio.sb, zoomed) == [(1024, 1024)]

    pan_id = assert_queued(await studio.click(clicker, parent, "Pan Left"))
    panned = await studio.result_of(pan_id)
    assert sizes(studio.sb, panned) == [(1536, 1024)] and fields(panned)["Pan"] == "left"
    kinds = {(await job(studio, i)).kind for i in (edit_id, zoom_id, pan_id)}
    assert kinds == {"edit", "zoom", "pan"}
    # Reroll of an edit: the same regions again from the same image, a new seed.
    again_id = assert_queued(await studio.click(clicker, edited, "Reroll"))
    again = await job(studio, again_id)
    assert again.kind == "edit" and again.params["regions"] == ["center", "top-left"]
    await studio.result_of(again_id)


# --------------------------------------------------------------------------- Remix, /settings


async def test_remix_opens_a_modal_and_runs_the_edited_prompt(studio: Studio) -> None:
    member = studio.new_member("remixer")
    _, parent = await generate(studio, member, {"prompt": "a red kite", "steps": 1})
    saved = await studio.command(member, "settings", {"remix": True})
    assert saved.response is not None and saved.response.ephemeral
    assert "Remix** on" in (saved.response.content or "")

    before = await ledger(studio, member)
    click = await studio.click(member, parent, "Reroll")
    assert click.modal is not None and click.modal["title"] == "Remix · Reroll"
    assert await ledger(studio, member) == before  # nothing starts before the modal is sent
    submit = await studio.sb.submit_modal(member, click, {"prompt": "a blue kite"})
    await submit.wait_response(5)
    reroll_id = assert_queued(submit)
    assert (await job(studio, reroll_id)).params["prompt"] == "a blue kite"
    await studio.result_of(reroll_id)

    # The picker, then the modal: the region job runs with the edited prompt.
    picker = await studio.click(member, parent, "Vary Region")
    chosen = await pick(studio, member, picker, ["bottom"])
    assert chosen.modal is not None and chosen.modal["title"] == "Remix · Vary Region"
    submit = await studio.sb.submit_modal(member, chosen, {"prompt": "a green kite"})
    await submit.wait_response(5)
    edit_id = assert_queued(submit)
    record = await job(studio, edit_id)
    assert record.params["prompt"] == "a green kite" and record.params["regions"] == ["bottom"]

    # The blocklist applies to the edited prompt; refused, nothing charged.
    click = await studio.click(member, parent, "Zoom Out")
    before = await ledger(studio, member)
    submit = await studio.sb.submit_modal(member, click, {"prompt": "a forbidden kite"})
    await submit.wait_response(5)
    assert_refused(submit, "blocked term")
    assert await ledger(studio, member) == before

    off = await studio.command(member, "settings", {"remix": False})
    assert "Remix** off" in (off.response.content or "")
    assert_queued(await studio.click(member, parent, "Pan Right"))  # straight to the queue again


async def test_settings_defaults_apply_to_generate(studio: Studio) -> None:
    member = studio.new_member("defaults")
    shown = await studio.command(member, "settings")
    assert "(server default)" in (shown.response.content or "")
    await studio.command(member, "settings", {"aspect": "4:5", "steps": 2, "sampler": "euler", "negative": "fog"})
    job_id, _ = await generate(studio, member, {"prompt": "a harbour"})
    record = await job(studio, job_id)
    assert (record.params["width"], record.params["height"]) == (256, 320)
    assert (record.params["steps"], record.params["sampler"], record.params["negative"]) == (2, "euler", "fog")
    explicit_id, _ = await generate(studio, member, {"prompt": "a harbour", "steps": 3, "aspect": "1:1"})
    explicit = await job(studio, explicit_id)
    assert (explicit.params["steps"], explicit.params["width"]) == (3, 256)
    reset = await studio.command(member, "settings", {"reset": "all"})
    assert "Saved" in (reset.response.content or "") and "`fog`" not in (reset.response.content or "")
    refused = await studio.command(member, "settings", {"negative": "forbidden things"})
    assert_refused(refused, "blocked term")
