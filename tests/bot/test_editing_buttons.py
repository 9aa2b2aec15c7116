"""The editing buttons on a result (Vary Region, Zoom Out, the four Pans), the region picker, and
the Remix modal: layout, custom_ids that survive a restart, payloads within Discord's limits."""

from __future__ import annotations

import importlib

import discord
import pytest

from bot.buttons import ROW_WIDTH, is_issued_custom_id, result_view
from bot.commands.edit import RegionPicker, decode_regions, encode_regions
from bot.remix import PREFIX, RemixModal, Target, _submitted_text
from engine.masks import REGIONS

# Loading the cogs' modules is what offers their buttons (the bot does it in setup_hook).
for module in ("account", "images", "results", "upscale", "edit", "zoom", "pan"):
    importlib.import_module(f"bot.commands.{module}")

EDITING = ["Vary Region", "Zoom Out", "Pan Left", "Pan Right", "Pan Up", "Pan Down"]


def rows(view: discord.ui.View) -> list[list[str]]:
    out: dict[int, list[str]] = {}
    for item in view.children:
        assert isinstance(item, discord.ui.DynamicItem)
        out.setdefault(item.item.row or 0, []).append(item.item.label or "")
    return [out[row] for row in sorted(out)]


def test_one_image_gains_the_editing_buttons_after_the_contracts_five() -> None:
    layout = rows(result_view("ABCD1234", 1))
    assert layout == [
        ["Reroll", "Upscale", "Variations", "Refine", "Delete"],
        ["Vary Region", "Zoom Out"],
        ["Pan Left", "Pan Right", "Pan Up", "Pan Down"],
    ]
    assert all(len(row) <= ROW_WIDTH for row in layout)
    ids = [item.item.custom_id or "" for item in result_view("ABCD1234", 1).children]  # type: ignore[attr-defined]
    assert "atelier:edit:ABCD1234:0" in ids and "atelier:pan-down:ABCD1234:0" in ids
    assert all(is_issued_custom_id(custom_id) for custom_id in ids)


def test_several_images_have_no_editing_buttons() -> None:
    labels = [label for row in rows(result_view("ABCD1234", 2)) for label in row]
    assert not set(EDITING) & set(labels)


def test_region_picker_offers_the_nine_regions_and_survives_restarts() -> None:
    picker = RegionPicker("ABCD1234", 0)
    data = picker.item.to_component_dict()
    assert data["custom_id"] == "atelier:regions:ABCD1234:0" and is_issued_custom_id(data["custom_id"])
    assert [option["value"] for option in data["options"]] == list(REGIONS)
    assert (data["min_values"], data["max_values"]) == (1, 9)
    assert not is_issued_custom_id("atelier:regions:ABCD1234:7")


@pytest.mark.parametrize("regions", [("center",), ("top", "bottom-right"), REGIONS[:-1]])
def test_regions_travel_in_a_short_code(regions: tuple[str, ...]) -> None:
    assert decode_regions(encode_regions(regions)) == regions


def test_remix_target_round_trips_within_discords_custom_id_limit() -> None:
    longest = Target("pan-right", "ABCDEFGHIJKLMNOP", 3, encode_regions(REGIONS))
    assert longest.custom_id.startswith(PREFIX) and len(longest.custom_id) <= 100
    assert Target.parse(longest.custom_id) == longest
    for forged in ("atelier:remix:edit:abc:0:", "atelier:remix:edit:ABCD1234:9:", "atelier:reroll:ABCD1234"):
        assert Target.parse(forged) is None


async def test_remix_modal_holds_the_prompt_within_discords_limits() -> None:
    prompt = "a lighthouse, " * 200  # 2800 characters
    modal = RemixModal(Target("reroll", "ABCD1234"), prompt, max_chars=1500, required=True)
    payload = modal.to_dict()
    assert len(payload["title"]) <= 45 and payload["title"] == "Remix · Reroll"
    (label,) = payload["components"]
    text_input = label["component"]
    assert text_input["custom_id"] == "prompt" and text_input["max_length"] == 1500
    assert text_input["value"] == prompt[:1500] and text_input["required"] is True
    submitted = {"components": [{"type": 18, "component": {"type": 4, "custom_id": "prompt", "value": "a boat"}}]}
    assert _submitted_text(submitted, "prompt") == "a boat"
    classic = {"components": [{"type": 1, "components": [{"type": 4, "custom_id": "prompt", "value": "x"}]}]}
    assert _submitted_text(classic, "prompt") == "x"
    assert _submitted_text({"components": []}, "prompt") is None
