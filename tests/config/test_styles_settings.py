"""[loras], [embeddings], [styles] and a model's draft_* keys: what loads, and the one-line error
naming the key for what does not (checked when the settings load, before anything runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.addons import parse_lora_ref
from config.settings import ConfigError, Settings, load_settings

GOOD = """
[models.sdxl]
base = "/models/sdxl"
default = true
draft_lora = "/models/lightning.safetensors"
draft_steps = 6
draft_sampler = "lcm"
[models.turbo]
base = "/models/turbo"
draft_unet = "/models/turbo-unet.safetensors"

[loras.watercolor]
file = "/models/loras/watercolor.safetensors"
weight = 0.8
trigger = "watercolor painting"
models = ["sdxl"]
[loras.ink-2]
file = "/models/loras/ink.safetensors"

[embeddings.negxl]
file = "/models/negxl.safetensors"

[styles.cinematic]
prompt = "cinematic still of {prompt}"
negative = "cartoon"
loras = ["watercolor:0.5", "ink-2"]
sampler = "euler_a"
steps = 20
cfg = 5.5
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("ATELIER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Settings:
    path = tmp_path / "atelier.toml"
    path.write_text(text)
    monkeypatch.setenv("ATELIER_CONFIG", str(path))
    return load_settings()


def error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> str:
    with pytest.raises(ConfigError) as failure:
        load(tmp_path, monkeypatch, text)
    message = str(failure.value)
    assert "\n" not in message
    return message


def test_the_styling_tables_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(tmp_path, monkeypatch, GOOD)
    assert settings.loras["watercolor"].weight == 0.8 and settings.loras["ink-2"].weight == 1.0
    assert settings.loras["ink-2"].models == []
    assert settings.embeddings["negxl"].file.endswith("negxl.safetensors")
    style = settings.styles["cinematic"]
    assert (style.sampler, style.steps, style.cfg, style.loras) == ("euler_a", 20, 5.5, ["watercolor:0.5", "ink-2"])
    sdxl, turbo = settings.models["sdxl"], settings.models["turbo"]
    assert (sdxl.draft_steps, sdxl.draft_sampler, sdxl.draft_cfg, sdxl.has_draft) == (6, "lcm", 1.0, True)
    assert turbo.has_draft and turbo.draft_sampler == "euler_trailing" and turbo.draft_steps == 4


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        ('[loras."water.color"]\nfile = "/a.safetensors"', ["loras.water.color", "letters"]),
        ('[loras.x]\nfile = "/a.ckpt"', ["loras.x.file", "pickle"]),
        ('[loras.x]\nfile = "/a.bin"', ["loras.x.file", "pickle"]),
        ('[loras.x]\nfile = "/a.pt2"', ["loras.x.file", ".safetensors"]),
        ('[loras.x]\nfile = "/a.safetensors"\nweight = 2.5', ["loras.x.weight"]),
        ('[loras.x]\nfile = "/a.safetensors"\nmodels = ["sd15"]', ["loras.x.models", "sd15"]),
        ('[embeddings.x]\nfile = "/a.pt"', ["embeddings.x.file", "pickle"]),
        ('[styles.x]\nprompt = "no placeholder"', ["styles.x.prompt", "{prompt}"]),
        ('[styles.x]\nloras = ["nope:0.5"]', ["styles.x.loras", "nope"]),
        ('[styles.x]\nloras = ["watercolor:3"]', ["styles.x.loras", "0 to 2"]),
        ('[styles.x]\nsampler = "lcm"', ["styles.x.sampler"]),
        ("[styles.x]\nsteps = 0", ["styles.x.steps"]),
    ],
)
def test_bad_styling_keys_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: str, needles: list[str]
) -> None:
    message = error(tmp_path, monkeypatch, GOOD + "\n" + extra + "\n")
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ('draft_lora = "/a.safetensors"\ndraft_unet = "/b.safetensors"', ["not both"]),
        ('draft_lora = "/a.ckpt"', ["draft_lora", "pickle"]),
        ('draft_sampler = "dpmpp_2m_karras"', ["draft_sampler", "euler_trailing"]),
        ("draft_steps = 0", ["draft_steps"]),
    ],
)
def test_bad_draft_keys_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, needles: list[str]
) -> None:
    message = error(tmp_path, monkeypatch, f'[models.m]\nbase = "/m"\n{model}\n')
    for needle in needles:
        assert needle in message, message


def test_at_most_25_styles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    styles = "\n".join(f'[styles.s{i}]\nprompt = "{{prompt}} {i}"' for i in range(26))
    assert "at most 25" in error(tmp_path, monkeypatch, styles)


def test_parse_lora_ref() -> None:
    assert parse_lora_ref(" ink ") == ("ink", None)
    assert parse_lora_ref("ink:0.25") == ("ink", 0.25)
    for bad in ("", "ink:", ":0.5", "i k", "ink:x", "ink:inf"):
        with pytest.raises(ValueError):
            parse_lora_ref(bad)
