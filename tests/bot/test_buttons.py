"""bot.buttons: a result's buttons, laid out from what each kind's module offers."""

from __future__ import annotations

import importlib

import discord

from bot.buttons import ROW_WIDTH, is_issued_custom_id, progress_view, result_view

# Loading the cogs' modules is what offers their buttons (the bot does it in setup_hook).
for module in ("account", "images", "results", "upscale"):
    importlib.import_module(f"bot.commands.{module}")


def rows(view: discord.ui.View) -> list[list[str]]:
    out: dict[int, list[str]] = {}
    for item in view.children:
        assert isinstance(item, discord.ui.DynamicItem)
        out.setdefault(item.item.row or 0, []).append(item.item.label or "")
    return [out[row] for row in sorted(out)]


def custom_ids(view: discord.ui.View) -> list[str]:
    return [item.item.custom_id or "" for item in view.children if isinstance(item, discord.ui.DynamicItem)]


def test_one_image_has_the_contracts_buttons_in_order() -> None:
    view = result_view("ABCD1234", 1)
    labels = [label for row in rows(view) for label in row]
    assert labels[:5] == ["Reroll", "Upscale", "Variations", "Refine", "Delete"]
    assert all(len(row) <= ROW_WIDTH for row in rows(view))
    assert len(set(custom_ids(view))) == len(custom_ids(view))


def test_several_images_have_a_row_per_action_then_reroll_and_delete() -> None:
    view = result_view("ABCD1234", 4)
    assert rows(view) == [["U1", "U2", "U3", "U4"], ["V1", "V2", "V3", "V4"], ["Reroll", "Delete"]]
    assert "atelier:upscale:ABCD1234:3" in custom_ids(view)
    assert len(set(custom_ids(view))) == len(custom_ids(view))


def test_issued_custom_ids_and_the_cancel_button() -> None:
    assert custom_ids(progress_view("ABCD1234")) == ["atelier:cancel:ABCD1234"]
    for custom_id in custom_ids(result_view("ABCD1234", 4)) + custom_ids(result_view("ABCD1234", 1)):
        assert is_issued_custom_id(custom_id)
    for forged in ("atelier:upscale:ABCD1234:9", "atelier:nope:ABCD1234", "atelier:reroll:abc", ""):
        assert not is_issued_custom_id(forged)
