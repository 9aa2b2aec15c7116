"""engine.styles: how members write LoRAs, embeddings and styles, the checks every job passes (bot
and engine alike), and what a result's metadata says about them. Pure: no model needed."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from config.addons import EmbeddingSettings, LoraSettings, ModelSettings, StyleSettings
from engine.jobs import Limits, Refine, Text2Img
from engine.options import MAX_LORAS
from engine.pnginfo import format_parameters, parse_parameters
from engine.styles import (
    Catalog,
    check_embeddings,
    check_loras,
    check_style,
    embedding_hash,
    lora_hash,
    merge_loras,
    parse_loras,
    result_params,
    style_texts,
    with_triggers,
)
from engine.validate import ValidationFailed


def catalog(tmp_path: Path | None = None) -> Catalog:
    folder = tmp_path or Path("/models")
    return Catalog(
        loras={
            "watercolor": LoraSettings(file=str(folder / "w.safetensors"), weight=0.8, trigger="watercolor painting"),
            "pixel": LoraSettings(file=str(folder / "p.safetensors"), trigger="pixel art", models=["sdxl"]),
            "ink": LoraSettings(file=str(folder / "i.safetensors")),
            "other": LoraSettings(file=str(folder / "o.safetensors"), models=["turbo"]),
        },
        embeddings={"negxl": EmbeddingSettings(file=str(folder / "n.safetensors"))},
        styles={"cinematic": StyleSettings(prompt="cinematic still of {prompt}, film grain", negative="cartoon")},
        models={
            "sdxl": ModelSettings(base="/m/sdxl", default=True, draft_lora=str(folder / "d.safetensors")),
            "turbo": ModelSettings(base="/m/turbo"),
        },
        default_model="sdxl",
    )


def refused(field: str, call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ValidationFailed) as error:
        call(*args, **kwargs)  # type: ignore[operator]
    assert error.value.field == field
    return error.value.message


def test_parse_loras() -> None:
    assert parse_loras(None) == [] and parse_loras("  ") == []
    assert parse_loras("watercolor") == [("watercolor", None)]
    assert parse_loras(" watercolor:0.5 , pixel, ink:1.25,") == [("watercolor", 0.5), ("pixel", None), ("ink", 1.25)]
    assert "name:weight" in refused("lora", parse_loras, "watercolor:lots")
    assert "name:weight" in refused("lora", parse_loras, "water color")
    assert "finite" in refused("lora", parse_loras, "ink:nan")
    assert "twice" in refused("lora", parse_loras, "ink, ink:0.5")


def test_check_loras_fills_weights_and_refuses_with_what_exists() -> None:
    cat = catalog()
    assert check_loras([("watercolor", None), ("pixel", 1.5)], cat, "") == (("watercolor", 0.8), ("pixel", 1.5))
    text = refused("lora", check_loras, [("sepia", None)], cat, "sdxl")
    assert "`sepia`" in text and "`watercolor`, `pixel`, `ink`" in text and "`other`" not in text
    text = refused("lora", check_loras, [("other", None)], cat, "sdxl")
    assert "does not fit the model `sdxl`" in text and "`turbo`" in text
    assert "twice" in refused("lora", check_loras, [("ink", 1.0), ("ink", 0.5)], cat, "")
    text = refused("lora", check_loras, [("ink", 2.5)], cat, "")
    assert "between 0 and 2" in text and "ink:0.8" in text
    assert "between 0 and 2" in refused("lora", check_loras, [("ink", -0.1)], cat, "")
    four = [(name, None) for name in ("watercolor", "pixel", "ink")] + [("other", None)]
    four_cat = Catalog(loras={**cat.loras, "other": LoraSettings(file="/x.safetensors")}, models=cat.models)
    text = refused("lora", check_loras, four, four_cat, "sdxl")
    assert f"At most {MAX_LORAS} LoRAs" in text
    assert check_loras([("ink", 0.0)], cat, "") == (("ink", 0.0),)


def test_style_and_member_loras_merge_with_the_members_weight_winning() -> None:
    merged = merge_loras([("watercolor", 0.5), ("ink", None)], [("ink", 1.2), ("pixel", None)])
    assert merged == [("watercolor", 0.5), ("ink", 1.2), ("pixel", None)]


def test_trigger_words_are_added_once_and_not_for_weight_0() -> None:
    cat = catalog()
    assert with_triggers("a fox", [("watercolor", 0.8), ("pixel", 1.0)], cat) == "a fox, watercolor painting, pixel art"
    assert with_triggers("a fox, Watercolor Painting", [("watercolor", 0.8)], cat) == "a fox, Watercolor Painting"
    assert with_triggers("a fox", [("watercolor", 0.0), ("ink", 1.0)], cat) == "a fox"


def test_embeddings_are_known_names_in_angle_brackets() -> None:
    cat = catalog()
    assert check_embeddings(cat, "a fox, (<negxl>)1.2", "<negxl>, blurry") == ["negxl"]
    assert check_embeddings(cat, "a fox") == []
    text = refused("prompt", check_embeddings, cat, "a <fox>")
    assert "`<fox>`" in text and "`<negxl>`" in text
    assert "`lora` option" in refused("prompt", check_embeddings, cat, "a fox <lora:ink:0.5>")
    assert "none" in refused("prompt", check_embeddings, Catalog(), "a <fox>")


def test_styles() -> None:
    cat = catalog()
    style = check_style("cinematic", cat)
    assert style is not None and check_style(None, cat) is None
    assert style_texts(style, "a fox", "") == ("cinematic still of a fox, film grain", "cartoon")
    assert style_texts(style, "a fox", "blurry") == ("cinematic still of a fox, film grain", "blurry, cartoon")
    assert "`cinematic`" in refused("style", check_style, "noir", cat)


def test_jobs_are_checked_against_the_catalog() -> None:
    limits = Limits(
        models=["sdxl", "turbo"],
        max_prompt_chars=200,
        max_attachment_bytes=1 << 20,
        max_attachment_pixels=1 << 22,
        upscale_max_side=2048,
        catalog=catalog(),
    )
    Text2Img(job_id="a", prompt="a fox <negxl>", loras=(("watercolor", 0.8),)).check(limits)
    Text2Img(job_id="a", prompt="a fox", draft=True, sampler="euler_trailing", steps=4, cfg=1.0).check(limits)
    with pytest.raises(ValidationFailed, match="no LoRA `sepia`"):
        Text2Img(job_id="a", prompt="a fox", loras=(("sepia", 1.0),)).check(limits)
    with pytest.raises(ValidationFailed, match="no embedding"):
        Refine(job_id="a", prompt="a fox", negative="<bad>").check(limits)
    with pytest.raises(ValidationFailed, match="no draft mode"):
        Text2Img(job_id="a", prompt="a fox", model="turbo", draft=True, sampler="euler_trailing").check(limits)
    with pytest.raises(ValidationFailed, match="draft sampler"):
        Text2Img(job_id="a", prompt="a fox", draft=True, sampler="euler").check(limits)
    with pytest.raises(ValidationFailed, match="sampler"):
        Text2Img(job_id="a", prompt="a fox", sampler="lcm").check(limits)  # not a member's sampler
    with pytest.raises(ValidationFailed, match="pairs"):
        Text2Img(job_id="a", prompt="a fox", loras=("watercolor",)).check(limits)  # type: ignore[arg-type]
    # Nothing configured: nothing may be used.
    bare = Limits(["sdxl"], 200, 1 << 20, 1 << 22, 2048)
    with pytest.raises(ValidationFailed, match="no LoRA"):
        Text2Img(job_id="a", prompt="a fox", loras=(("watercolor", 1.0),)).check(bare)


def test_loras_survive_storage_as_pairs() -> None:
    job = Text2Img(job_id="a", prompt="a fox", loras=(("watercolor", 0.8), ("ink", 1.0)), style="cinematic")
    again = Text2Img.from_params(json.loads(json.dumps(job.to_params())), job_id="a")
    assert again == job and again.loras == (("watercolor", 0.8), ("ink", 1.0))


def _safetensors(path: Path) -> Path:
    save_file({"a": torch.arange(6, dtype=torch.float32)}, str(path), metadata={"note": "header bytes"})
    return path


def test_a1111_short_hashes(tmp_path: Path) -> None:
    file = _safetensors(tmp_path / "w.safetensors")
    data = file.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert lora_hash(str(file)) == hashlib.sha256(data[8 + length :]).hexdigest()[:12]  # after the header
    assert embedding_hash(str(file)) == hashlib.sha256(data).hexdigest()[:12]  # the whole file


def test_result_params_say_loras_embeddings_style_and_draft(tmp_path: Path) -> None:
    cat = catalog(tmp_path)
    for name in ("w", "n", "d"):
        _safetensors(tmp_path / f"{name}.safetensors")
    params = result_params(
        cat,
        model="",
        prompt="a fox <negxl>",
        negative="",
        loras=(("watercolor", 0.8), ("ink", 1.0)),  # ink's file is missing: named without a hash
        style="cinematic",
        draft=True,
    )
    assert params["loras"] == [("watercolor", 0.8), ("ink", 1.0)]
    assert params["lora_hashes"] == f"watercolor: {lora_hash(str(tmp_path / 'w.safetensors'))}"
    assert params["ti_hashes"] == f"negxl: {embedding_hash(str(tmp_path / 'n.safetensors'))}"
    assert params["style"] == "cinematic" and params["draft"] == "d"
    text = format_parameters({"prompt": "a fox <negxl>", "steps": 4, "seed": 1, **params})
    first, last = text.split("\n")
    assert first == "a fox <negxl> <lora:watercolor:0.8> <lora:ink:1>"
    assert 'Lora hashes: "watercolor: ' in last and 'TI hashes: "negxl: ' in last
    assert "Style: cinematic" in last and "Draft: d" in last
    back = parse_parameters(text)
    assert back["prompt"] == "a fox <negxl>" and back["loras"] == [("watercolor", 0.8), ("ink", 1.0)]
    assert result_params(cat, model="", prompt="a fox", negative="", loras=()) == {}
