"""engine.pnginfo: A1111-style parameters in PNG, and the WebP/JPEG fallback under a size limit,
each format carrying the same parameters."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.options import SAMPLERS
from engine.pnginfo import (
    encode_image,
    format_parameters,
    parse_parameters,
    read_parameters,
    read_parameters_text,
)
from engine.validate import clean_text

PARAMS = {
    "prompt": "a lighthouse at dusk, (oil painting:1.2), 灯台 🌅",
    "negative": "blurry, lowres",
    "steps": 30,
    "sampler": "dpmpp_2m_karras",
    "cfg": 7.0,
    "seed": 123,
    "width": 256,
    "height": 128,
    "model": "sdxl",
    "refiner": "sd_xl_refiner_1.0",
    "refiner_switch": 0.8,
    "job_id": "k3x9a",
    "version": "Atelier 0.1.0",
}


def noise(width: int = 256, height: int = 128) -> Image.Image:
    return Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))


def test_format_is_a1111s() -> None:
    text = format_parameters(PARAMS)
    assert text.split("\n") == [
        "a lighthouse at dusk, (oil painting:1.2), 灯台 🌅",
        "Negative prompt: blurry, lowres",
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 256x128, Model: sdxl, "
        "Refiner: sd_xl_refiner_1.0, Refiner switch at: 0.8, Job: k3x9a, Version: Atelier 0.1.0",
    ]
    assert parse_parameters(text) == PARAMS


def test_no_negative_line_when_empty_and_values_quoted_when_needed() -> None:
    params = {"prompt": "cat", "negative": "", "steps": 4, "seed": 1, "model": "a, b: c", "note": 'say "hi"'}
    text = format_parameters(params)
    assert "Negative prompt" not in text
    assert 'Model: "a, b: c"' in text
    assert parse_parameters(text) == params


def test_parses_what_a1111_writes() -> None:
    text = (
        "masterpiece, (best quality:1.2)\nsecond line\n"
        "Negative prompt: worst quality\nmore negative\n"
        "Steps: 25, Sampler: Euler a, Schedule type: Karras, CFG scale: 6.5, Seed: 42, "
        'Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Lora hashes: "x: 1, y: 2", '
        "Denoising strength: 0.35, Version: v1.10.1"
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, (best quality:1.2)\nsecond line"
    assert parsed["negative"] == "worst quality\nmore negative"
    assert parsed["sampler"] == "euler_a"
    assert parsed["cfg"] == 6.5 and parsed["seed"] == 42 and parsed["steps"] == 25
    assert (parsed["width"], parsed["height"]) == (832, 1216)
    assert parsed["strength"] == 0.35
    assert parsed["lora_hashes"] == "x: 1, y: 2"  # A1111's label, read as what Atelier writes there
    assert parsed["Model hash"] == "31e35c80fc"


def test_text_without_parameters_line_is_all_prompt() -> None:
    assert parse_parameters("just a prompt") == {"prompt": "just a prompt", "negative": ""}
    assert parse_parameters("a\n(masterpiece:1.2), best") == {
        "prompt": "a\n(masterpiece:1.2), best",
        "negative": "",
    }


def test_long_line_without_pairs_parses_fast() -> None:
    # Many colons and commas that never form a parameters line: no catastrophic backtracking.
    text = "p\n" + "a:b:c:d, " * 5000 + "(x"
    parsed = parse_parameters(text)
    assert parsed["prompt"].startswith("p\n")


prompts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200).map(clean_text)


@given(
    prompt=prompts,
    negative=prompts,
    steps=st.integers(1, 60),
    cfg=st.floats(1, 20, allow_nan=False),
    seed=st.integers(0, 2**32 - 1),
    sampler=st.sampled_from(SAMPLERS),
    width=st.integers(64, 4096),
    height=st.integers(64, 4096),
    model=st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30).map(
        lambda text: text.strip() or "m"
    ),
    strength=st.none() | st.floats(0.05, 1.0),
)
@settings(max_examples=300, deadline=None)
def test_round_trip(prompt, negative, steps, cfg, seed, sampler, width, height, model, strength) -> None:
    params = {
        "prompt": prompt,
        "negative": negative,
        "steps": steps,
        "sampler": sampler,
        "cfg": cfg,
        "seed": seed,
        "width": width,
        "height": height,
        "model": model,
    }
    if strength is not None:
        params["strength"] = strength
    if prompt.startswith("Negative prompt: "):
        return  # A1111's format cannot tell such a prompt from an empty one
    assert parse_parameters(format_parameters(params)) == params


def test_png_carries_parameters_chunk() -> None:
    out = encode_image(noise(), PARAMS)
    assert out.format == "png" and out.filename_suffix == "png"
    assert (out.width, out.height, out.seed) == (256, 128, 123)
    with Image.open(io.BytesIO(out.data)) as image:
        assert image.format == "PNG"
        assert image.text["parameters"] == format_parameters(PARAMS)  # iTXt: the prompt is not Latin-1
    assert read_parameters(out.data) == PARAMS


def test_latin1_text_goes_in_a_plain_text_chunk() -> None:
    params = {**PARAMS, "prompt": "a café"}
    data = encode_image(noise(64, 64), params).data
    assert b"tEXtparameters\x00a caf\xe9" in data
    assert read_parameters(data)["prompt"] == "a café"


def test_width_height_default_to_the_image() -> None:
    params = {key: value for key, value in PARAMS.items() if key not in ("width", "height")}
    out = encode_image(noise(64, 96), params)
    parsed = read_parameters(out.data)
    assert (parsed["width"], parsed["height"]) == (64, 96)


def test_fallbacks_under_a_size_limit() -> None:
    image = noise()
    png = encode_image(image, PARAMS)
    webp = encode_image(image, PARAMS, max_bytes=len(png.data) - 1)
    assert webp.format == "webp" and len(webp.data) < len(png.data)
    jpeg = encode_image(image, PARAMS, max_bytes=len(webp.data) - 1)
    assert jpeg.format == "jpeg" and jpeg.filename_suffix == "jpg" and len(jpeg.data) < len(webp.data)
    for out in (png, webp, jpeg):
        assert read_parameters(out.data) == PARAMS, out.format
        assert (out.width, out.height) == (256, 128)
        with Image.open(io.BytesIO(out.data)) as decoded:
            assert decoded.format == out.format.upper()
    # JPEG quality drops until it fits.
    tight = encode_image(image, PARAMS, max_bytes=len(jpeg.data) // 2)
    assert tight.format == "jpeg" and len(tight.data) <= len(jpeg.data) // 2
    assert (tight.width, tight.height) == (256, 128)
    # Last resort: smaller JPEGs; the reported size follows.
    tiny = encode_image(image, PARAMS, max_bytes=6000)
    assert tiny.format == "jpeg" and len(tiny.data) <= 6000 and tiny.width < 256
    assert read_parameters(tiny.data)["prompt"] == PARAMS["prompt"]
    with pytest.raises(ValueError):
        encode_image(image, PARAMS, max_bytes=100)


def test_exif_user_comment_is_piexif_style() -> None:
    out = encode_image(noise(), PARAMS, max_bytes=60_000)
    assert out.format in ("webp", "jpeg")
    with Image.open(io.BytesIO(out.data)) as image:
        exif = image.getexif()
        assert exif.endian == ">"
        comment = exif.get_ifd(0x8769)[0x9286]
        assert comment.startswith(b"UNICODE\x00")
        assert comment[8:].decode("utf-16-be") == format_parameters(PARAMS)
        assert b"exif:UserComment" in image.info["xmp"]


def test_xmp_alone_is_enough() -> None:
    from engine.pnginfo import _xmp_bytes

    out = io.BytesIO()
    noise(32, 32).save(out, "JPEG", xmp=_xmp_bytes("p & <q>\nSteps: 3, Seed: 9"))
    assert read_parameters_text(out.getvalue()) == "p & <q>\nSteps: 3, Seed: 9"
    plain = io.BytesIO()
    noise(32, 32).save(plain, "JPEG")
    assert read_parameters(plain.getvalue()) is None
