"""Editing across a bot restart: /edit (with an uploaded mask) and /pan jobs queued when the bot
stops finish on the next bot, exactly as asked; a Vary Region picker and a Remix modal opened on
the first bot's messages still work on the second."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from db.moderation import EVERYWHERE
from engine import validate
from sandbox import Sandbox
from studio.harness import Studio, build_world, open_bot, tiny_settings
from tests.e2e.member_kit import assert_queued, generate, image, job

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


def picture(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small, "RGB").resize((width, height), Image.Resampling.BICUBIC).save(out, "PNG")
    return out.getvalue()


async def test_edits_survive_a_restart(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path)
    sb = await Sandbox().start()
    world: dict[str, Any] = build_world(sb)
    alice, bob = world["alice"], world["bob"]
    source = picture(1024, 1024, seed=1)
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 64, 64))  # the top-left 16th of the image
    mask_png = io.BytesIO()
    mask.save(mask_png, "PNG")
    try:
        async with open_bot(sb, settings) as first:
            await sb.wait_for_commands("generate", "edit", "pan", "settings")
            studio = Studio(sb=sb, bot=first, **world)
            _, parent = await generate(studio, alice, {"prompt": "a garden", "steps": 1})
            await first.wiring.set_paused(EVERYWHERE, True)
            edit_id = assert_queued(
                await studio.command(
                    alice,
                    "edit",
                    {"prompt": "a pond"},
                    attachments=[("garden.png", source, "image/png"), ("mask.png", mask_png.getvalue(), "image/png")],
                )
            )
            pan_id = assert_queued(
                await studio.command(bob, "pan", {"direction": "down"}, attachments=[("g.png", source, "image/png")])
            )
            picker = await studio.click(bob, parent, "Vary Region")
            await studio.command(alice, "settings", {"remix": True})
            remixed = await studio.click(alice, parent, "Zoom Out")
            assert remixed.modal is not None
        # The first bot is gone with two jobs queued, a picker and a modal open.

        async with open_bot(sb, settings) as second:
            studio = Studio(sb=sb, bot=second, **world)
            await second.wiring.set_paused(EVERYWHERE, False)
            edited, panned = await studio.result_of(edit_id), await studio.result_of(pan_id)
            original = Image.open(io.BytesIO(source)).convert("RGB")
            out = image(sb, edited.attachments[0]).convert("RGB")
            d = np.abs(np.asarray(out).astype(int) - np.asarray(original).astype(int))
            assert d[:, 300:].max() <= 8 and d[300:, :].max() <= 8  # kept, the mask came through
            assert d[:256, :256].mean() > 10  # redone where the mask was white
            out = image(sb, panned.attachments[0]).convert("RGB")
            assert out.size == (1024, 1536) and np.array_equal(np.asarray(out)[:1024], np.asarray(original))

            message = picker.original
            assert message is not None
            (select,) = [c for c in message.iter_components() if c.get("type") == 3]
            chosen = await sb.click(bob, message, select["custom_id"], values=["bottom-right"])
            await chosen.wait_response(5)
            region_id = assert_queued(chosen)
            assert (await job(studio, region_id)).params["regions"] == ["bottom-right"]

            submit = await sb.submit_modal(alice, remixed, {"prompt": "a wider garden"})
            await submit.wait_response(5)
            zoom_id = assert_queued(submit)
            record = await job(studio, zoom_id)
            assert record.kind == "zoom" and record.params["prompt"] == "a wider garden"
            for job_id in (region_id, zoom_id):
                await studio.result_of(job_id)
            assert validate.probe_image(
                sb.file_bytes((await studio.result_of(zoom_id)).attachments[0]), max_bytes=10**8, max_pixels=10**8
            ) == (1024, 1024)
    finally:
        await sb.stop()
