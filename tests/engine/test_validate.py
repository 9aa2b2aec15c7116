"""engine.validate: every bad input refused with a message that says what to change, attachments
decoded by content, decompression bombs refused before any pixel is decoded."""

from __future__ import annotations

import io
import math
import struct
import time
import tracemalloc
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine.jobs import JobBase, Limits, Refine, Text2Img, Upscale, Variations
from engine.validate import (
    MAX_SEED,
    ValidationFailed,
    check_aspect,
    check_attachment_size,
    check_cfg,
    check_count,
    check_model,
    check_negative,
    check_prompt,
    check_sampler,
    check_seed,
    check_size,
    check_steps,
    check_strength,
    clean_text,
    decode_image,
    fit_size,
    input_work_size,
    prepare_input_image,
    probe_image,
)

MB = 1024 * 1024
LIMITS = {"max_bytes": 20 * MB, "max_pixels": 4096 * 4096}
ASPECTS = {"1:1": "1024x1024", "4:5": "896x1152"}
MODELS = ("sdxl", "tiny")


def refused(field: str, call, *args, **kwargs) -> str:
    with pytest.raises(ValidationFailed) as info:
        call(*args, **kwargs)
    assert info.value.field == field
    assert str(info.value) == info.value.message
    return info.value.message


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR declaring width×height, a tiny IDAT, IEND: a bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------ text


def test_prompt_cleaned_and_required() -> None:
    assert check_prompt("  a cat\tin\na hat \x00\x1b[31m ", max_chars=100) == "a cat in a hat [31m"
    assert "empty" in refused("prompt", check_prompt, "   \n\t ", max_chars=100)
    assert "empty" in refused("prompt", check_prompt, "\x00\x07", max_chars=100)
    assert "empty" in refused("prompt", check_prompt, None, max_chars=100)
    assert "must be text" in refused("prompt", check_prompt, 42, max_chars=100)


def test_prompt_too_long_says_by_how_much() -> None:
    message = refused("prompt", check_prompt, "x" * 1503, max_chars=1500)
    assert "1503" in message and "1500" in message and "by 3 characters" in message
    assert check_prompt("x" * 1500, max_chars=1500) == "x" * 1500
    # Counted after cleaning: surrounding spaces do not count.
    assert check_prompt("  " + "x" * 1500 + "  ", max_chars=1500) == "x" * 1500


def test_control_characters_and_bidi_overrides_removed_emoji_kept() -> None:
    assert clean_text("a\u202eb\u2066c\x7fd\x85e") == "abcd e"
    assert clean_text("cat 🐈‍⬛ 猫") == "cat 🐈‍⬛ 猫"  # ZWJ (a format char) stays
    assert clean_text("lone \ud800 surrogate") == "lone  surrogate"


def test_negative_optional_and_limited() -> None:
    assert check_negative(None, max_chars=10) == ""
    assert check_negative("  blurry ", max_chars=10) == "blurry"
    assert "negative" in refused("negative", check_negative, "y" * 11, max_chars=10)


# ---------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("check", "field", "good", "bad"),
    [
        (check_steps, "steps", [1, 30, 60, 30.0], [0, 61, -5, 2.5, True, "30", None]),
        (check_cfg, "cfg", [1, 7.0, 20, 12.5], [0.99, 20.01, math.nan, math.inf, "7", False]),
        (check_seed, "seed", [0, 123, MAX_SEED], [-1, MAX_SEED + 1, 1.5, None]),
        (check_count, "count", [1, 4], [0, 5, 2.5]),
        (check_strength, "strength", [0.05, 0.3, 1.0, 1], [0.04, 1.01, 0, math.nan]),
    ],
)
def test_ranges(check, field: str, good: list, bad: list) -> None:
    for value in good:
        assert check(value) == value
    for value in bad:
        message = refused(field, check, value)
        assert field in message


def test_range_messages_say_the_range_and_the_value() -> None:
    assert refused("steps", check_steps, 61) == "steps must be between 1 and 60 (you gave 61)."
    assert refused("cfg", check_cfg, 25) == "cfg must be between 1 and 20 (you gave 25)."
    assert str(MAX_SEED) in refused("seed", check_seed, -1)
    assert "between 0.05 and 1" in refused("strength", check_strength, 2)


def test_sampler_aspect_model_size() -> None:
    assert check_sampler("euler_a") == "euler_a"
    message = refused("sampler", check_sampler, "k_lms")
    assert "dpmpp_2m_karras" in message and "k_lms" in message
    assert check_aspect("4:5", ASPECTS) == (896, 1152)
    assert check_aspect("1:1", {"1:1": (512, 512)}) == (512, 512)
    assert "1:1, 4:5" in refused("aspect", check_aspect, "3:1", ASPECTS)
    assert check_model("tiny", MODELS) == "tiny"
    assert check_model("", MODELS, default="sdxl") == "sdxl"
    assert check_model(None, MODELS) == ""
    assert "sdxl, tiny" in refused("model", check_model, "sd15", MODELS)
    assert check_size(1024, 768) == (1024, 768)
    assert "multiple of 64" in refused("width", check_size, 1000, 1024)
    assert "4096" in refused("height", check_size, 1024, 8192)


# ------------------------------------------------------------------------------ attachments


def test_non_images_refused_by_content() -> None:
    for data in (b"hello, this is text", b"%PDF-1.7\n...", b"GIF89a", b"\x89PNG\r\n\x1a\n"):
        message = refused("image", decode_image, data, **LIMITS)
        assert "not an image" in message or "damaged" in message
    assert "not an image" in refused("image", decode_image, b"<svg xmlns='http://www.w3.org/2000/svg'/>", **LIMITS)
    assert "empty" in refused("image", decode_image, b"", **LIMITS)
    # A format Pillow could open but we do not accept (EPS would run Ghostscript).
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    assert "not an image" in refused("image", decode_image, eps, **LIMITS)
    ico = encode(Image.new("RGB", (16, 16)), "ICO")
    assert "not an image" in refused("image", decode_image, ico, **LIMITS)


def test_jpeg_bytes_decode_whatever_they_are_called() -> None:
    # Only content matters: there is no file name or content type to get wrong.
    image = decode_image(encode(Image.new("RGB", (40, 30), "red"), "JPEG"), **LIMITS)
    assert image.mode == "RGB" and image.size == (40, 30)


def test_over_max_bytes_refused_before_decoding() -> None:
    data = encode(Image.new("RGB", (64, 64)), "PNG")
    message = refused("image", decode_image, data + b"\0" * 4096, max_bytes=2048, max_pixels=10**6)
    assert "KB" in message and "limit is 2 KB" in message


def test_announced_attachment_size_checked_before_download() -> None:
    check_attachment_size(5 * MB, max_bytes=20 * MB)
    assert "25.0 MB" in refused("image", check_attachment_size, 25 * MB, max_bytes=20 * MB)
    assert "empty" in refused("image", check_attachment_size, 0, max_bytes=20 * MB)


def test_decompression_bomb_refused_fast_without_allocating() -> None:
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    tracemalloc.start()
    started = time.perf_counter()
    message = refused("image", decode_image, bomb, **LIMITS)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert "too many pixels" in message
    assert elapsed < 1.0  # decoding 10^10 pixels would take minutes (or fail to allocate)
    assert peak < 5 * MB
    # Under Pillow's own guard but over ours: our message names the size and the limit.
    message = refused("image", decode_image, png_header_only(5000, 5000), **LIMITS)
    assert "5000×5000" in message and "16.8 megapixels" in message
    assert "5000×5000" in refused("image", probe_image, png_header_only(5000, 5000), **LIMITS)


def test_truncated_and_corrupt_files_refused() -> None:
    png = encode(Image.effect_noise((128, 128), 50).convert("RGB"), "PNG")
    assert "truncated or damaged" in refused("image", decode_image, png[: len(png) // 2], **LIMITS)
    jpeg = bytearray(encode(Image.effect_noise((128, 128), 50).convert("RGB"), "JPEG"))
    jpeg[200:260] = b"\xff" * 60
    try:
        decode_image(bytes(jpeg), **LIMITS)  # libjpeg may recover from a damaged scan
    except ValidationFailed as exc:
        assert exc.field == "image"
    assert "damaged" in refused("image", decode_image, png[:40], **LIMITS)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_only_png_jpeg_and_webp_are_decoded(fmt: str) -> None:
    """The help promises PNG, JPEG and WebP; every other decoder is attack surface for no use."""
    frames = [Image.new("RGB", (32, 32), color) for color in ("red", "lime", "blue")]
    out = io.BytesIO()
    frames[0].save(out, fmt, **({} if fmt == "BMP" else {"save_all": True, "append_images": frames[1:]}))
    assert "PNG, JPEG or WebP" in refused("image", decode_image, out.getvalue(), **LIMITS)


def test_exif_orientation_applied() -> None:
    source = Image.new("RGB", (60, 20), "white")
    source.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    image = decode_image(encode(source, "JPEG", exif=exif.tobytes(), quality=95), **LIMITS)
    assert image.size == (20, 60)
    red, green, blue = image.getpixel((10, 5))  # the band is now at the top
    assert red > 200 and green < 60 and blue < 60


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),  # transparent → white
        (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), (255, 0, 0)),
        (Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)),
        (Image.new("L", (8, 8), 128), (128, 128, 128)),
        (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
    ],
)
def test_modes_become_rgb_with_alpha_on_white(image: Image.Image, expected: tuple[int, int, int]) -> None:
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    decoded = decode_image(encode(image, fmt), **LIMITS)
    assert decoded.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(decoded.getpixel((4, 4)), expected, strict=True))


def test_palette_transparency_and_16_bit() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 255] * 256)
    decoded = decode_image(encode(palette, "PNG", transparency=0), **LIMITS)
    assert decoded.getpixel((1, 1)) == (255, 255, 255)
    deep = Image.new("I;16", (8, 8), 40000)
    deep.putpixel((0, 0), 0)
    decoded = decode_image(encode(deep, "PNG"), **LIMITS)
    assert decoded.mode == "RGB" and decoded.getpixel((3, 3))[0] > 200 and decoded.getpixel((0, 0))[0] == 0


@given(
    data=st.binary(max_size=2048),
    prefix=st.sampled_from(
        [b"", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM", b"II*\x00"]
    ),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_bytes_only_ever_raise_validation_failed(data: bytes, prefix: bytes) -> None:
    try:
        image = decode_image(prefix + data, max_bytes=64 * 1024, max_pixels=1024 * 1024)
    except ValidationFailed as exc:
        assert exc.field == "image" and exc.message
    else:
        assert image.mode == "RGB"


@given(
    data=st.data(),
    width=st.integers(1, 48),
    height=st.integers(1, 48),
    fmt=st.sampled_from(["PNG", "WEBP"]),
)
@settings(max_examples=60, deadline=None)
def test_valid_images_round_trip(data: st.DataObject, width: int, height: int, fmt: str) -> None:
    pixels = data.draw(st.binary(min_size=width * height * 3, max_size=width * height * 3))
    image = Image.frombytes("RGB", (width, height), pixels)
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(image, fmt, **params), max_bytes=MB, max_pixels=64 * 64)
    assert decoded.size == (width, height)
    assert decoded.tobytes() == image.tobytes()


# ---------------------------------------------------------------------------------- sizing


def test_fit_size_examples() -> None:
    assert fit_size(1024, 1024) == (1024, 1024)
    assert fit_size(512, 512) == (1024, 1024)  # small inputs scaled up to SDXL's area
    assert fit_size(512, 512, allow_upscale=False) == (512, 512)
    assert fit_size(4000, 3000) == (1152, 896)
    assert fit_size(1, 1) == (1024, 1024)
    assert fit_size(1, 1, allow_upscale=False) == (64, 64)
    assert fit_size(3000, 3000, 4096 * 4096, max_side=2048) == (2048, 2048)


@given(
    width=st.integers(1, 20000),
    height=st.integers(1, 20000),
    max_pixels=st.sampled_from([256 * 256, 512 * 512, 1024 * 1024, 2048 * 2048]),
    allow_upscale=st.booleans(),
)
@settings(max_examples=500, deadline=None)
def test_fit_size_properties(width: int, height: int, max_pixels: int, allow_upscale: bool) -> None:
    out_w, out_h = fit_size(width, height, max_pixels, allow_upscale=allow_upscale)
    assert out_w % 64 == 0 and out_h % 64 == 0 and out_w >= 64 and out_h >= 64
    assert out_w * out_h <= max_pixels
    aspect = width / height
    if 1 / 4 <= aspect <= 4 and min(out_w, out_h) >= 256:
        assert abs(math.log((out_w / out_h) / aspect)) < 0.25  # aspect kept
        if allow_upscale:
            assert out_w * out_h >= 0.7 * max_pixels  # area ≈ the target
    if not allow_upscale and width >= 64 and height >= 64:
        assert out_w <= width + 32 and out_h <= height + 32  # never enlarged beyond rounding


def test_prepare_input_image_refine_and_upscale() -> None:
    source = encode(Image.effect_noise((600, 400), 40).convert("RGB"), "JPEG")
    data, size = prepare_input_image(source, **LIMITS)
    assert size == (1216, 832) or size[0] * size[1] <= 1024 * 1024
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.size == size
    # Upscale: the input keeps its size (rounded to 64); ×2 must fit upscale_max_side.
    _, size = prepare_input_image(source, **LIMITS, upscale_factor=2)
    assert size == (576, 384)
    big = encode(Image.new("RGB", (3000, 2000), "gray"), "PNG")
    _, size = prepare_input_image(big, **LIMITS, upscale_factor=2, upscale_max_side=2048)
    assert max(size) * 2 <= 2048 and size == (1024, 704)
    assert input_work_size(4000, 4000, upscale_factor=2, upscale_max_side=4096) == (2048, 2048)
    narrow = encode(Image.new("RGB", (1000, 100)), "PNG")
    assert "narrow" in refused("image", prepare_input_image, narrow, **LIMITS)


# ------------------------------------------------------------------------------- whole jobs


def job_limits() -> dict:
    return {
        "models": MODELS,
        "max_prompt_chars": 100,
        "max_attachment_bytes": MB,
        "max_attachment_pixels": 2048 * 2048,
        "upscale_max_side": 2048,
    }


def validate_job(job: JobBase, **limits: Any) -> None:
    job.check(Limits(**limits))


def test_validate_job_accepts_good_jobs() -> None:
    image = encode(Image.new("RGB", (256, 256)), "PNG")
    for job in (
        Text2Img(job_id="a", prompt="a cat", width=128, height=256, count=4),
        Refine(job_id="b", image=image),
        Variations(job_id="c", image=image, prompt="", count=2, model="tiny"),
        Upscale(job_id="d", image=image, strength=0.3),
    ):
        validate_job(job, **job_limits())


@pytest.mark.parametrize(
    ("job", "field"),
    [
        (Text2Img(job_id="a", prompt=""), "prompt"),
        (Text2Img(job_id="a", prompt="x" * 101), "prompt"),
        (Text2Img(job_id="a", prompt="a\x00b"), "prompt"),
        (Text2Img(job_id="a", prompt="ok", negative="n" * 101), "negative"),
        (Text2Img(job_id="a", prompt="ok", steps=0), "steps"),
        (Text2Img(job_id="a", prompt="ok", cfg=30.0), "cfg"),
        (Text2Img(job_id="a", prompt="ok", seed=-3), "seed"),
        (Text2Img(job_id="a", prompt="ok", sampler="plms"), "sampler"),
        (Text2Img(job_id="a", prompt="ok", model="nope"), "model"),
        (Text2Img(job_id="a", prompt="ok", count=5), "count"),
        (Text2Img(job_id="a", prompt="ok", width=1000), "width"),
        (Text2Img(job_id="a", prompt="ok", max_image_bytes=10), "max_image_bytes"),
        (Text2Img(job_id="", prompt="ok"), "job_id"),
        (Refine(job_id="a", image=b"not an image"), "image"),
        (Refine(job_id="a", image=png_header_only(100_000, 100_000)), "image"),
        (Variations(job_id="a", image=b"", strength=0.6), "image"),
        (Variations(job_id="a", image=b"x", strength=2.0), "strength"),
        (Upscale(job_id="a", image=png_header_only(1500, 1000)), "image"),
        (Upscale(job_id="a", image=png_header_only(100, 100), factor=3), "factor"),
    ],
)
def test_validate_job_refuses(job, field: str) -> None:
    refused(field, validate_job, job, **job_limits())
