"""/generate with a control image (ControlNet) through the real bot, engine process and sandbox: each
option and refusal, the control map shown to the member (an attachment, the embed's thumbnail,
re-posted by /job), its metadata, Reroll, and the control image kept for a retry or a restart.

The studio here has `[controlnets.edges]` and `[controlnets.depth]` (the tiny ControlNet and depth
estimator) and no `pose`, so one mode is not offered."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image, ImageDraw, ImageOps

from bot.intake import engine_job
from bot.storage import CONTROL
from engine import annotators, validate
from engine.jobs import Text2Img
from engine.tiny_addons import CONTROLNET, DEPTH_ANNOTATOR
from sandbox import InvocationError, Message
from studio.harness import Studio, open_studio, tiny_settings
from tests.e2e.member_kit import (
    assert_nothing_charged,
    assert_queued,
    assert_refused,
    fields,
    image,
    job,
    labels,
    ledger,
    pixels,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

SIZE = (256, 256)  # the studio's first aspect
MAX_BYTES = 200_000
MAX_PIXELS = 1_500_000  # above the ~1 MP inputs are fitted to


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_addons_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(
        tiny_addons_dir,
        studio_dir,
        controlnets={
            "edges": {"model": str(tiny_addons_dir / CONTROLNET)},
            "depth": {"model": str(tiny_addons_dir / CONTROLNET), "annotator": str(tiny_addons_dir / DEPTH_ANNOTATOR)},
        },
        generation={"max_attachment_bytes": MAX_BYTES, "max_attachment_pixels": MAX_PIXELS},
    )
    async with open_studio(settings) as running:
        yield running


def upload(size: tuple[int, int] = (200, 150)) -> bytes:
    """A member's picture: a white box and a circle on grey."""
    picture = Image.new("RGB", size, (60, 60, 60))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((30, 25, 130, 120), outline="white", width=4)
    draw.ellipse((110, 40, 190, 110), fill=(200, 120, 40))
    out = io.BytesIO()
    picture.save(out, "PNG")
    return out.getvalue()


def fitted(data: bytes) -> Image.Image:
    """The upload as the engine sees it: prepared like an img2img input by the bot, then fitted to
    the job's size (cover, centre crop) by the engine."""
    prepared, _ = validate.prepare_input_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    with Image.open(io.BytesIO(prepared)) as decoded:
        return ImageOps.fit(decoded.convert("RGB"), SIZE, Image.Resampling.LANCZOS)


async def control_job(studio: Studio, member: Any, options: dict[str, Any], data: bytes) -> tuple[str, Message]:
    inter = await studio.command(member, "generate", options, attachments=[("shape.png", data, "image/png")])
    job_id = assert_queued(inter)
    return job_id, await studio.result_of(job_id)


def assert_map_shown(result: Message, job_id: str, count: int = 1) -> Image.Image:
    """The images, then the control map as one more attachment that the embed shows as its thumbnail."""
    names = [a.filename for a in result.attachments]
    assert names == [f"{job_id}-{i + 1}.png" for i in range(count)] + [f"{job_id}-control.png"]
    assert result.embeds[0]["thumbnail"]["url"] == result.attachments[-1].url
    return result.attachments[-1]


async def test_edges_follow_the_upload_and_the_map_is_shown(studio: Studio) -> None:
    member = studio.new_member("edges")
    data = upload()
    job_id, result = await control_job(studio, member, {"prompt": "a lantern", "control_strength": 1.2}, data)

    shown = assert_map_shown(result, job_id)
    edge_map = image(studio.sb, shown)
    assert edge_map.size == SIZE
    assert np.array_equal(np.asarray(edge_map.convert("RGB")), np.asarray(annotators.edges(fitted(data))))
    assert fields(result)["Control"] == "edges · strength 1.2"
    assert "Reroll" in labels(result) and "U1" not in labels(result)  # a one-image result's buttons
    info = image(studio.sb, result.attachments[0]).info["parameters"]
    assert "Control: edges" in info
    assert (
        'ControlNet 0: "Module: canny, Model: controlnet, Weight: 1.2, Resize Mode: Crop and Resize, '
        'Guidance Start: 0, Guidance End: 0.8"'
    ) in info

    record = await job(studio, job_id)
    p = record.params
    assert (p["control"], p["control_strength"], p["control_as_is"]) == ("edges", 1.2, False)
    assert "control_image" not in p and p["control_url"].startswith("http")  # for a Reroll
    cost = Text2Img(job_id="x", width=SIZE[0], height=SIZE[1], steps=4).cost()  # as text2img, nothing more
    assert record.cost == pytest.approx(cost)
    assert await ledger(studio, member) == [("reserve", cost, job_id), ("commit", cost, job_id)]
    # The map is kept with the images (for /job), the upload only while the job could need it.
    outputs = studio.bot.wiring.outputs
    stored = [entry for entry in record.images if entry.get("role") == CONTROL]
    assert len(stored) == 1 and outputs.read(stored[0]["path"]) is not None
    assert not outputs.input_path(job_id, CONTROL).exists()

    # /job re-posts the result with its map.
    inter = await studio.command(member, "job", {"id": job_id})
    repost = await inter.wait_original(lambda m: bool(m.attachments) and not m.loading, timeout=10)
    assert_map_shown(repost, job_id)
    assert pixels(studio.sb, repost.attachments[-1]) == pixels(studio.sb, shown)

    # Reroll: the same control image again (fetched where it was uploaded), a new seed.
    clicker = studio.new_member("edges-reroller")
    again_id = assert_queued(await studio.click(clicker, result, "Reroll"))
    again = await studio.result_of(again_id)
    assert pixels(studio.sb, assert_map_shown(again, again_id)) == pixels(studio.sb, shown)
    again_record = await job(studio, again_id)
    assert again_record.params["control"] == "edges" and again_record.params["control_strength"] == 1.2
    assert again_record.params["seed"] != p["seed"] and again_record.owner_id == clicker.id
    assert pixels(studio.sb, again.attachments[0]) != pixels(studio.sb, result.attachments[0])


async def test_strength_0_gives_the_image_without_control(studio: Studio) -> None:
    member = studio.new_member("strength-0")
    common = {"prompt": "a quiet street", "seed": 99}
    _, off = await control_job(studio, member, {**common, "control_strength": 0.0}, upload())
    _, on = await control_job(studio, member, {**common, "control_strength": 1.0}, upload())
    plain_inter = await studio.command(member, "generate", common)
    plain = await studio.result_of(assert_queued(plain_inter))
    assert pixels(studio.sb, off.attachments[0]) == pixels(studio.sb, plain.attachments[0])
    assert pixels(studio.sb, on.attachments[0]) != pixels(studio.sb, plain.attachments[0])


async def test_depth_with_two_images_and_the_default_strength(studio: Studio) -> None:
    member = studio.new_member("depth")
    data = upload((160, 200))
    options = {"prompt": "a tower", "control": "depth", "count": 2, "refiner": False}
    job_id, result = await control_job(studio, member, options, data)
    shown = assert_map_shown(result, job_id, count=2)
    assert labels(result)[:4] == ["U1", "U2", "V1", "V2"] and "U3" not in labels(result)  # the map adds none
    assert fields(result)["Control"] == "depth · strength 0.8"
    depth = annotators.load_annotator("depth", str(studio.bot.settings.controlnets["depth"].annotator))
    expected = np.asarray(depth(fitted(data)), dtype=np.float64)
    # The engine runs the estimator on one torch thread, this process maybe on more: ±1 at most.
    assert np.abs(np.asarray(image(studio.sb, shown).convert("RGB"), dtype=np.float64) - expected).max() <= 1
    info = image(studio.sb, result.attachments[1]).info["parameters"]
    assert 'ControlNet 0: "Module: depth, Model: controlnet, Weight: 0.8,' in info
    record = await job(studio, job_id)
    assert record.cost == pytest.approx(Text2Img(job_id="x", width=256, height=256, steps=4, count=2).cost())


async def test_a_map_given_as_is_is_followed_as_it_is(studio: Studio) -> None:
    member = studio.new_member("as-is")
    data = upload()
    options = {"prompt": "a cave", "control": "depth", "control_as_is": True, "control_strength": 0.5}
    job_id, result = await control_job(studio, member, options, data)
    shown = image(studio.sb, assert_map_shown(result, job_id))
    assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(fitted(data)))
    assert fields(result)["Control"] == "depth (map as given) · strength 0.5"
    assert 'ControlNet 0: "Module: none,' in image(studio.sb, result.attachments[0]).info["parameters"]


async def test_annotators_run_in_the_engine_process_never_in_the_bots(
    studio: Studio, monkeypatch: pytest.MonkeyPatch
) -> None:
    def not_here(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an annotator ran in the bot's process")

    for name in ("edges", "load_annotator", "DepthEstimator", "PoseEstimator"):
        monkeypatch.setattr(annotators, name, not_here)
    member = studio.new_member("loop-guard")
    for mode in ("edges", "depth"):
        job_id, result = await control_job(studio, member, {"prompt": f"{mode} away", "control": mode}, upload())
        assert_map_shown(result, job_id)


async def test_the_control_image_is_kept_for_a_retry_or_a_restart(studio: Studio) -> None:
    member = studio.new_member("retry")
    scheduler, outputs = studio.bot.wiring.scheduler, studio.bot.wiring.outputs
    scheduler.pause()
    try:
        inter = await studio.command(
            member, "generate", {"prompt": "later", "control": "edges"}, attachments=[("a.png", upload(), "image/png")]
        )
        job_id = assert_queued(inter)
        saved = outputs.input_path(job_id, CONTROL).read_bytes()
        # What the scheduler hands the engine (now, after a retry, or after a restart): the spec
        # rebuilt from the job row, with the control image read back from the inputs folder.
        rebuilt = engine_job(await job(studio, job_id), outputs)
        assert isinstance(rebuilt, Text2Img)
        assert rebuilt.control == "edges" and rebuilt.control_image == saved
    finally:
        scheduler.resume()
    result = await studio.result_of(job_id)
    assert_map_shown(result, job_id)
    assert not outputs.input_path(job_id, CONTROL).exists()


async def test_only_configured_modes_are_offered(studio: Studio) -> None:
    command = studio.sb.commands.find("generate", studio.guild.id)
    assert command is not None
    options = {option["name"]: option for option in command.options}
    assert [choice["value"] for choice in options["control"]["choices"]] == ["edges", "depth"]
    assert options["control_image"]["type"] == 11  # ATTACHMENT
    strength = options["control_strength"]
    assert (strength["min_value"], strength["max_value"]) == (0.0, 2.0)
    member = studio.new_member("picky")
    with pytest.raises(InvocationError):  # Discord's client offers no `pose`
        await studio.sb.slash(
            member,
            studio.channel,
            "generate",
            {"prompt": "x", "control": "pose"},
            attachments=[("a.png", upload(), "image/png")],
        )


async def refused(studio: Studio, options: dict[str, Any], *needles: str, raw: bool = False) -> None:
    member = studio.new_member("refused")
    if raw:  # a modified client: the bot's own checks
        inter = await studio.sb.raw_slash(member, studio.channel, "generate", options)
        await inter.wait_response(5.0)
    else:
        attachments = options.pop("attachments", None)
        inter = await studio.command(member, "generate", options, attachments=attachments)
    assert_refused(inter, *needles)
    await assert_nothing_charged(studio, member)


async def test_refusals_cost_nothing(studio: Studio) -> None:
    await refused(studio, {"prompt": "no image", "control_strength": 1.0}, "go with a `control_image`")
    await refused(studio, {"prompt": "no image", "control": "depth"}, "go with a `control_image`")
    await refused(
        studio,
        {"prompt": "text", "attachments": [("notes.png", b"plain text, not a picture", "image/png")]},
        "control_image:",
    )
    large = Image.new("RGB", (1300, 1200), "white")
    buffer = io.BytesIO()
    large.save(buffer, "PNG")
    await refused(
        studio,
        {"prompt": "big", "attachments": [("big.png", buffer.getvalue(), "image/png")]},
        "control_image",
        "megapixels",
    )
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    assert len(buffer.getvalue()) > MAX_BYTES
    await refused(
        studio, {"prompt": "heavy", "attachments": [("heavy.png", buffer.getvalue(), "image/png")]}, "control_image"
    )
    await refused(
        studio,
        {"prompt": "a pose", "control": "pose", "control_image": ("p.png", upload(), "image/png")},
        "`pose` is not set up here",
        "`edges`, `depth`",
        raw=True,
    )
    await refused(
        studio,
        {"prompt": "too strong", "control_strength": 2.5, "control_image": ("p.png", upload(), "image/png")},
        "control_strength must be between 0 and 2",
        raw=True,
    )
