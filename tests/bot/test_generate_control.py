"""/generate's ControlNet options follow the operator's `[controlnets]`: only configured modes are
offered, and with none configured the command has no control option at all (what Discord shows)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import discord
import pytest
from discord import app_commands

from bot.commands.generate import CONTROL_OPTIONS, Generate, control_fields
from bot.errors import Refused
from config.settings import load_settings
from engine.validate import ValidationFailed

MODEL = {"tiny": {"base": "org/model"}}


def schema(controlnets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The /generate options as they are synced to Discord, for a bot with these ControlNets."""
    settings = load_settings(models=MODEL, controlnets=controlnets)
    cog = Generate(SimpleNamespace(settings=settings))  # type: ignore[arg-type]
    tree = app_commands.CommandTree(discord.Client(intents=discord.Intents.none()))
    return {option["name"]: option for option in cog.generate.to_dict(tree)["options"]}


def test_no_controlnet_configured_no_control_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    options = schema({})
    assert not set(CONTROL_OPTIONS) & set(options)
    assert "prompt" in options


def test_only_the_configured_modes_are_choices_and_each_bot_has_its_own(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    depth_only = schema({"depth": {"model": "org/cn", "annotator": "org/depth"}})
    both = schema({"pose": {"model": "org/cn", "annotator": "org/pose"}, "edges": {"model": "org/cn"}})
    assert [c["value"] for c in depth_only["control"]["choices"]] == ["depth"]
    assert [c["value"] for c in both["control"]["choices"]] == ["edges", "pose"]
    assert depth_only["control_image"]["type"] == 11 and both["control_as_is"]["type"] == 5
    assert (both["control_strength"]["min_value"], both["control_strength"]["max_value"]) == (0.0, 2.0)
    assert schema({}).keys() & set(CONTROL_OPTIONS) == set()  # the command class itself is untouched


def test_control_fields_defaults_and_refusals() -> None:
    image: Any = object()  # an attachment: only its presence matters here
    assert control_fields(["edges", "depth"], None, None, None, None) == {}
    assert control_fields(["edges", "depth"], image, None, None, None) == {
        "control": "edges",
        "control_as_is": False,
        "control_strength": 0.8,
    }
    assert control_fields(["depth"], image, None, True, 1.5)["control"] == "depth"  # no edges: the first
    with pytest.raises(Refused, match="go with a `control_image`"):
        control_fields(["edges"], None, None, None, 1.0)
    with pytest.raises(ValidationFailed, match="`pose` is not set up here"):
        control_fields(["edges"], image, "pose", None, None)
    with pytest.raises(ValidationFailed, match="not set up on this bot"):
        control_fields([], image, None, None, None)
