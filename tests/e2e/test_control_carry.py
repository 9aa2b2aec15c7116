"""A controlled result's Variations and Vary Region carry its ControlNet, through the real bot,
engine process and sandbox: the child job's mode, strength and map (the parent's stored map,
given as is), its PNG parameters, and its result posting the map; Zoom Out does not carry it.

Its own studio: results are worked on at ~1 MP, which needs the default attachment caps (the
control studio's are small, for its refusals)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from engine.tiny_addons import CONTROLNET, DEPTH_ANNOTATOR
from studio.harness import Studio, open_studio, tiny_settings
from tests.e2e.member_kit import assert_queued, fields, image, job
from tests.e2e.test_control import assert_map_shown, control_job, upload

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_addons_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(
        tiny_addons_dir,
        studio_dir,
        controlnets={
            "depth": {"model": str(tiny_addons_dir / CONTROLNET), "annotator": str(tiny_addons_dir / DEPTH_ANNOTATOR)},
        },
    )
    async with open_studio(settings) as running:
        yield running


def similar(a: Image.Image, b: Image.Image) -> bool:
    """The same map, scaled: mean |diff| under 8 on 0–255 at the smaller one's size."""
    size = min(a.size, b.size)
    pa = np.asarray(a.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    pb = np.asarray(b.convert("L").resize(size, Image.Resampling.BILINEAR), dtype=np.float64)
    return float(np.abs(pa - pb).mean()) < 8


async def test_variations_and_vary_region_of_a_controlled_result_follow_its_map(studio: Studio) -> None:
    """Variations and Vary Region on a controlled result carry its ControlNet: its mode, strength and its
    map (the stored one, given as is), shown again with the child's result; Zoom Out does not."""
    member = studio.new_member("carrier")
    options = {"prompt": "a lantern", "control": "depth", "control_strength": 1.1, "refiner": False}
    parent_id, parent = await control_job(studio, member, options, upload())
    parent_map = image(studio.sb, assert_map_shown(parent, parent_id))

    child_id = assert_queued(await studio.click(member, parent, "Variations"))
    child = await studio.result_of(child_id)
    child_map = image(studio.sb, assert_map_shown(child, child_id, count=4))
    assert child_map.size == image(studio.sb, child.attachments[0]).size  # fitted to the image worked on
    assert similar(child_map, parent_map)
    assert fields(child)["Control"] == "depth (map as given) · strength 1.1"
    info = image(studio.sb, child.attachments[0]).info["parameters"]
    assert "Control: depth" in info
    assert 'ControlNet 0: "Module: none, Model: controlnet, Weight: 1.1, Resize Mode: Crop and Resize,' in info
    p = (await job(studio, child_id)).params
    assert (p["control"], p["control_as_is"], p["control_strength"]) == ("depth", True, 1.1)
    assert "control_url" not in p and p["parent"] == {"job": parent_id, "action": "variations", "index": 0}

    picker = await studio.click(member, parent, "Vary Region")
    message = picker.original
    assert message is not None
    (select,) = [c for c in message.iter_components() if c.get("type") == 3]
    chosen = await studio.sb.click(member, message, select["custom_id"], values=["center"])  # type: ignore[arg-type]
    await chosen.wait_response(5)
    edit_id = assert_queued(chosen)
    edited = await studio.result_of(edit_id)
    names = [a.filename for a in edited.attachments]
    assert names == [f"{edit_id}-1.png", f"{edit_id}-control.png"]
    assert edited.embeds[0]["thumbnail"]["url"] == edited.attachments[-1].url
    assert fields(edited)["Control"] == "depth (map as given) · strength 1.1"
    assert "Control: depth" in image(studio.sb, edited.attachments[0]).info["parameters"]
    assert (await job(studio, edit_id)).params["control"] == "depth"

    zoom_id = assert_queued(await studio.click(member, parent, "Zoom Out"))
    assert "control" not in (await job(studio, zoom_id)).params
    await studio.result_of(zoom_id)
