"""bot.loras: the `lora` option's completions and how a request's style, LoRAs and draft settings
come together (the parts that need no Discord; tests/e2e/test_styling.py drives the real ones)."""

from __future__ import annotations

import pytest

from bot.loras import draft_settings, lora_choices, styled, with_loras
from config.settings import Settings, load_settings
from engine.styles import Catalog
from engine.validate import ValidationFailed


@pytest.fixture
def settings() -> Settings:
    return load_settings(
        models={
            "sdxl": {"base": "/m/sdxl", "default": True, "draft_lora": "/m/lightning.safetensors", "draft_steps": 6},
            "other": {"base": "/m/other"},
        },
        loras={
            "watercolor": {"file": "/l/w.safetensors", "weight": 0.8, "trigger": "watercolor painting"},
            "pixel": {"file": "/l/p.safetensors", "models": ["sdxl"], "description": "8-bit look"},
            "ink": {"file": "/l/i.safetensors"},
            "sketch": {"file": "/l/s.safetensors"},
        },
        embeddings={"negxl": {"file": "/e/n.safetensors"}},
        styles={"poster": {"prompt": "poster of {prompt}", "negative": "blurry", "loras": ["ink:0.4"], "cfg": 5.0}},
    )


def values(current: str, settings: Settings, model: str = "sdxl") -> list[str]:
    return [choice.value for choice in lora_choices(current, Catalog.from_settings(settings), model)]


def test_completions_keep_what_was_typed_and_skip_what_is_used(settings: Settings) -> None:
    assert values("", settings) == ["watercolor", "pixel", "ink", "sketch"]
    assert values("", settings, "other") == ["watercolor", "ink", "sketch"]  # pixel is for sdxl
    assert values("INK", settings) == ["ink"]
    assert values("ink:0.5, wat", settings) == ["ink:0.5, watercolor"]
    assert values("ink:0.5, watercolor:1.25", settings) == ["ink:0.5, watercolor:1.25", "ink:0.5, watercolor"]
    names = [c.name for c in lora_choices("", Catalog.from_settings(settings), "sdxl")]
    assert names[0] == "watercolor · weight 0.8 · adds “watercolor painting”" and "8-bit look" in names[1]


def test_completions_stop_at_three_and_at_discords_length(settings: Settings) -> None:
    full = "ink, pixel, sketch, "
    assert values(full, settings) == [full]
    assert values("x" * 101, settings) == []


def test_a_style_and_the_members_options(settings: Settings) -> None:
    asked = styled(settings, model="", prompt="a fox", negative="text", lora="watercolor", style="poster")
    assert asked.prompt == "poster of a fox, watercolor painting" and asked.negative == "text, blurry"
    assert asked.loras == (("ink", 0.4), ("watercolor", 0.8)) and asked.typed == "a fox"
    assert (asked.cfg, asked.steps, asked.sampler, asked.style) == (5.0, None, None, "poster")
    plain = styled(settings, model="", prompt="a fox", negative="", lora=None)
    assert plain.typed is None and plain.loras == () and plain.style == ""
    with pytest.raises(ValidationFailed, match="no embedding"):
        styled(settings, model="", prompt="a fox <neg>", negative="", lora=None)
    fields, typed = with_loras(settings, {"model": "sdxl", "prompt": "a fox"}, "pixel:1.5")
    assert fields["loras"] == (("pixel", 1.5),) and typed is None  # pixel has no trigger words


def test_draft_settings(settings: Settings) -> None:
    assert draft_settings(settings, "sdxl", sampler=None, refiner=None).draft_steps == 6
    with pytest.raises(ValidationFailed, match="no draft mode"):
        draft_settings(settings, "other", sampler=None, refiner=None)
    with pytest.raises(ValidationFailed, match="sampler"):
        draft_settings(settings, "sdxl", sampler="euler", refiner=None)
    with pytest.raises(ValidationFailed, match="refiner"):
        draft_settings(settings, "sdxl", sampler=None, refiner=True)
