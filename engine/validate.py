"""Pure checks shared by the bot (before a job is queued, so bad input costs nothing) and the
engine (defence in depth: a job that reaches the worker is checked again).

Every check raises `ValidationFailed(field, message)`; the message is meant for the user as is:
it says what was wrong and what to change. Nothing here imports torch or diffusers.

Attachments are decoded by their CONTENT, never by file name or content type: `probe_image`
reads only the header (Pillow's `Image.open` is lazy) and refuses a format we do not accept, a
file over the byte limit, or declared dimensions over the pixel limit BEFORE any pixel is decoded,
so a decompression bomb (a few hundred bytes declaring 100000×100000) is refused in microseconds.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Collection, Mapping
from typing import Any, cast

from PIL import Image, ImageFile, ImageOps

from config.settings import parse_size
from engine.blocklist import normalize_text
from engine.options import (
    CFG,
    CONTROL_GUIDANCE_END,
    CONTROL_GUIDANCE_START,
    CONTROL_STRENGTH,
    COUNT,
    MAX_SEED,
    SAMPLERS,
    STEPS,
    STRENGTH,
    Range,
)

SIZE_MULTIPLE = 64
MAX_SIDE = 4096
MIN_IMAGE_BYTES_LIMIT = 1024
# Inputs narrower than this (longest side / shortest side) are refused: SDXL has no bucket for them.
MAX_INPUT_ASPECT = 8.0
SDXL_PIXELS = 1024 * 1024

# The formats an attachment may be in, as the help says: PNG, JPEG and WebP. Every other decoder
# Pillow has (TIFF, BMP, GIF, EPS running Ghostscript, PSD, ICO, …) is attack surface for no use.
# MPO is how Pillow names a JPEG from a phone camera that carries extra frames.
Image.init()  # registers every plugin, so Image.OPEN below is complete
ACCEPTED_FORMATS: tuple[str, ...] = tuple(name for name in ("PNG", "JPEG", "MPO", "WEBP") if name in Image.OPEN)


class ValidationFailed(Exception):
    """Bad input. `field` names the option; `message` is the user-facing text."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def __str__(self) -> str:
        return self.message


# ---------------------------------------------------------------------------------------- text


def clean_text(text: str) -> str:
    """The text the model reads (and the blocklist checks): engine.blocklist.normalize_text, the
    one normalisation for both (NFKC, invisible characters and controls removed, breaks as spaces)."""
    return normalize_text(text)


def check_prompt(text: str | None, *, max_chars: int, field: str = "prompt", required: bool = True) -> str:
    """The cleaned prompt; refused when empty (if required) or longer than `max_chars`."""
    if text is not None and not isinstance(text, str):
        raise ValidationFailed(field, f"{field} must be text")
    cleaned = clean_text(text or "")
    if required and not cleaned:
        raise ValidationFailed(field, f"The {field} is empty: describe what you want to see.")
    if len(cleaned) > max_chars:
        over = len(cleaned) - max_chars
        raise ValidationFailed(
            field,
            f"The {field} is {len(cleaned)} characters long; the limit is {max_chars}. "
            f"Shorten it by {over} character{'s' if over != 1 else ''}.",
        )
    return cleaned


def check_negative(text: str | None, *, max_chars: int) -> str:
    return check_prompt(text, max_chars=max_chars, field="negative", required=False)


# ------------------------------------------------------------------------------------- numbers


def _int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailed(field, f"{field} must be a whole number.")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValidationFailed(field, f"{field} must be a whole number, not {value}.")
        value = int(value)
    return value


def _float(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationFailed(field, f"{field} must be a number.")
    value = float(value)
    if not math.isfinite(value):
        raise ValidationFailed(field, f"{field} must be a finite number.")
    return value


def _in_range(field: str, value: float, bounds: Range[Any]) -> None:
    """Refuse `value` outside `bounds` (inclusive); floats are shown with :g, ints as they are."""
    low, high = bounds.low, bounds.high
    if not low <= value <= high:
        shown = (lambda x: f"{x:g}") if isinstance(value, float) else str
        raise ValidationFailed(
            field, f"{field} must be between {shown(low)} and {shown(high)} (you gave {shown(value)})."
        )


def check_steps(steps: Any) -> int:
    steps = _int(steps, "steps")
    _in_range("steps", steps, STEPS)
    return steps


def check_cfg(cfg: Any) -> float:
    cfg = _float(cfg, "cfg")
    _in_range("cfg", cfg, CFG)
    return cfg


def check_seed(seed: Any) -> int:
    seed = _int(seed, "seed")
    if not 0 <= seed <= MAX_SEED:
        raise ValidationFailed("seed", f"seed must be between 0 and {MAX_SEED} (you gave {seed}).")
    return seed


def check_sampler(sampler: Any) -> str:
    if sampler not in SAMPLERS:
        raise ValidationFailed("sampler", f"Unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}.")
    return sampler


def check_count(count: Any) -> int:
    count = _int(count, "count")
    _in_range("count", count, COUNT)
    return count


def check_strength(strength: Any) -> float:
    strength = _float(strength, "strength")
    _in_range("strength", strength, STRENGTH)
    return strength


def check_control_strength(strength: Any) -> float:
    strength = _float(strength, "control_strength")
    _in_range("control_strength", strength, CONTROL_STRENGTH)
    return strength


def check_control_mode(mode: Any, configured: Collection[str]) -> str:
    """A ControlNet mode this bot offers (`[controlnets.<mode>]`)."""
    if mode in configured:
        return str(mode)
    if not configured:
        raise ValidationFailed("control", "Control images are not set up on this bot.")
    offered = ", ".join(f"`{name}`" for name in configured)
    raise ValidationFailed("control", f"The control mode `{mode}` is not set up here: pick one of {offered}.")


def check_control_guidance(start: Any, end: Any) -> tuple[float, float]:
    """The share of the schedule a ControlNet steers: 0 ≤ start < end ≤ 1."""
    start, end = _float(start, "control_guidance_start"), _float(end, "control_guidance_end")
    _in_range("control_guidance_start", start, CONTROL_GUIDANCE_START)
    _in_range("control_guidance_end", end, CONTROL_GUIDANCE_END)
    if start >= end:
        raise ValidationFailed("control_guidance_end", "control_guidance_end must be after control_guidance_start.")
    return start, end


def check_aspect(name: Any, aspects: Mapping[str, str] | Mapping[str, tuple[int, int]]) -> tuple[int, int]:
    """The (width, height) of a configured aspect name (`[generation.aspects]`)."""
    if not isinstance(name, str) or name not in aspects:
        raise ValidationFailed("aspect", f"Unknown aspect {name!r}: choose one of {', '.join(aspects)}.")
    size = aspects[name]
    return parse_size(size) if isinstance(size, str) else size


def check_model(name: Any, models: Collection[str], *, default: str | None = None) -> str:
    """A configured model name; "" (or None) means the default model and returns `default` ("" when
    not given)."""
    if name is None or name == "":
        return default or ""
    if not isinstance(name, str) or name not in models:
        listed = ", ".join(sorted(models)) or "none"
        raise ValidationFailed("model", f"Unknown model {name!r}: choose one of {listed} (see /model list).")
    return name


def check_size(width: Any, height: Any) -> tuple[int, int]:
    """A generation size: multiples of 64 between 64 and 4096 on each side."""
    width, height = _int(width, "width"), _int(height, "height")
    for field, value in (("width", width), ("height", height)):
        if value % SIZE_MULTIPLE or not SIZE_MULTIPLE <= value <= MAX_SIDE:
            raise ValidationFailed(
                field,
                f"{field} must be a multiple of {SIZE_MULTIPLE} between {SIZE_MULTIPLE} and {MAX_SIDE} "
                f"(you gave {value}).",
            )
    return width, height


# ---------------------------------------------------------------------------------- attachments


def _format_bytes(count: int) -> str:
    if count >= 1024 * 1024:
        return f"{count / (1024 * 1024):.1f} MB"
    if count >= 1024:
        return f"{count / 1024:.0f} KB"
    return f"{count} bytes"


def _format_pixels(count: int) -> str:
    return f"{count / 1_000_000:.1f} megapixels"


def _too_large(size: int, max_bytes: int) -> ValidationFailed:
    return ValidationFailed(
        "image",
        f"The attachment is {_format_bytes(size)}; the limit is {_format_bytes(max_bytes)}. "
        "Attach a smaller image (for example a JPEG).",
    )


def check_attachment_size(size: int, *, max_bytes: int) -> None:
    """Refuse an attachment by its announced size (Discord's `attachment.size`) before
    downloading it; `decode_image` checks the real bytes again."""
    if size <= 0:
        raise ValidationFailed("image", "The attachment is empty: attach a PNG, JPEG or WebP image.")
    if size > max_bytes:
        raise _too_large(size, max_bytes)


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ValidationFailed:
    return ValidationFailed(
        "image",
        f"The image is {width}×{height} ({_format_pixels(width * height)}); the limit is "
        f"{_format_pixels(max_pixels)}. Resize it and try again.",
    )


_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def _looks_like_image(data: bytes | bytearray | memoryview) -> bool:
    """Starts like a format we accept (so a failure to open it means damage, not a wrong file)."""
    head = bytes(data[:12])
    return head.startswith(_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def open_checked(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and check bytes, format and declared dimensions (images, and
    anything decoded like one: engine.masks reads uploaded masks through it)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValidationFailed("image", "The attachment is not a file.")
    if len(data) == 0:
        raise ValidationFailed("image", "The attachment is empty: attach a PNG, JPEG or WebP image.")
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns above MAX_IMAGE_PIXELS and raises above twice that;
            # make the warning an error too. Our own limit is checked right after, before decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValidationFailed(
            "image", f"The image declares too many pixels; the limit is {_format_pixels(max_pixels)}."
        ) from None
    except Image.UnidentifiedImageError:
        if _looks_like_image(data):
            raise ValidationFailed(
                "image", "The image file is truncated or damaged and cannot be read: attach another copy."
            ) from None
        raise ValidationFailed(
            "image", "The attachment is not an image we can read: attach a PNG, JPEG or WebP image."
        ) from None
    except Exception:
        raise ValidationFailed("image", "The image file is damaged and cannot be read: attach another copy.") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ValidationFailed("image", "The image has no pixels: attach another image.")
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, max_pixels)
    return image


def probe_image(data: bytes, *, max_bytes: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) of an attachment, from its header only (no pixel decoding)."""
    image = open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        return image.size
    finally:
        image.close()


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        low, high = cast(tuple[float, float], image.getextrema())
        span = (high - low) or 1
        image = image.point(lambda v: (v - low) * 255.0 / span, "F").convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an attachment by content into an RGB image (first frame of an animation, EXIF
    orientation applied, alpha composited on white). Raises ValidationFailed only."""
    with warnings.catch_warnings():
        # Pillow warns about damaged EXIF and the like; the image is still usable or refused.
        warnings.simplefilter("ignore", UserWarning)
        return _decode(data, max_bytes=max_bytes, max_pixels=max_pixels)


def _decode(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    image = open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # set process-wide by someone else: refuse anyway
            raise OSError("truncated images are not accepted")
        image.load()
        # A frame of an animation may declare its own size; check what was really decoded.
        if image.size[0] * image.size[1] > max_pixels:
            raise _too_many_pixels(*image.size, max_pixels)
        oriented = ImageOps.exif_transpose(image)
        rgb = _to_rgb(oriented if oriented is not None else image)
        rgb.load()
        return rgb
    except ValidationFailed:
        raise
    except MemoryError:
        raise _too_many_pixels(*image.size, max_pixels) from None
    except Exception:
        raise ValidationFailed(
            "image", "The image file is truncated or damaged and cannot be read: attach another copy."
        ) from None
    finally:
        image.close()


def fit_size(
    width: int,
    height: int,
    max_pixels: int = SDXL_PIXELS,
    *,
    max_side: int | None = None,
    allow_upscale: bool = True,
    multiple: int = SIZE_MULTIPLE,
) -> tuple[int, int]:
    """An SDXL-friendly working size for an input of `width`×`height`: multiples of `multiple`,
    area about `max_pixels` and never over it (smaller inputs are scaled UP to it unless
    `allow_upscale` is False), each side at most `max_side`, the aspect ratio kept as well as the
    rounding allows. Every side is at least `multiple`."""
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    floor_area = multiple * multiple
    max_pixels = max(max_pixels, floor_area)
    scale = math.sqrt(max_pixels / (width * height))
    if max_side is not None:
        max_side = max(multiple, max_side)
        scale = min(scale, max_side / max(width, height))
    if not allow_upscale:
        scale = min(scale, 1.0)
    target_w, target_h = width * scale, height * scale
    limit = max_side // multiple * multiple if max_side is not None else None

    def snap(value: float) -> int:
        snapped = max(multiple, round(value / multiple) * multiple)
        return min(snapped, limit) if limit is not None else snapped

    out_w, out_h = snap(target_w), snap(target_h)
    # Rounding may push the area over the limit: shrink the side that overshoots its target most.
    while out_w * out_h > max_pixels and (out_w > multiple or out_h > multiple):
        if out_h == multiple or (out_w > multiple and out_w / target_w >= out_h / target_h):
            out_w -= multiple
        else:
            out_h -= multiple
    return out_w, out_h


def input_work_size(
    width: int,
    height: int,
    *,
    upscale_factor: int | None = None,
    upscale_max_side: int = MAX_SIDE,
    target_pixels: int = SDXL_PIXELS,
    keep_resolution: bool = False,
) -> tuple[int, int]:
    """The size an input image is worked at: ~1 MP for an img2img job; for an upscale (factor
    given) the input's own size (never enlarged) capped so the output side ≤ `upscale_max_side`.
    With `keep_resolution` (edits: Vary Region, Zoom Out, Pan) a source larger than ~1 MP keeps
    its size, sides trimmed to multiples of 8 (the VAE's factor): it is worked on around the
    region to redo, and what is kept keeps its resolution."""
    if upscale_factor:
        side = max(SIZE_MULTIPLE, upscale_max_side // upscale_factor)
        return fit_size(width, height, side * side, max_side=side, allow_upscale=False)
    if keep_resolution and width * height > target_pixels:
        return fit_size(width, height, width * height, max_side=MAX_SIDE, allow_upscale=False, multiple=8)
    return fit_size(width, height, target_pixels)


def prepare_input_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    upscale_factor: int | None = None,
    upscale_max_side: int = MAX_SIDE,
    target_pixels: int = SDXL_PIXELS,
    keep_resolution: bool = False,
) -> tuple[bytes, tuple[int, int]]:
    """Decode an attachment, resize it to its working size (see `input_work_size`) and return it
    as PNG bytes with that (width, height): what a job that starts from an image carries."""
    image = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    width, height = image.size
    if max(width, height) / min(width, height) > MAX_INPUT_ASPECT:
        raise ValidationFailed(
            "image",
            f"The image is {width}×{height}, too long and narrow; crop it to at most {MAX_INPUT_ASPECT:g}:1.",
        )
    size = input_work_size(
        width,
        height,
        upscale_factor=upscale_factor,
        upscale_max_side=upscale_max_side,
        target_pixels=target_pixels,
        keep_resolution=keep_resolution,
    )
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "PNG", compress_level=1)
    return out.getvalue(), size


# ------------------------------------------------------------------------------------- whole jobs


def check_image_byte_limit(limit: Any) -> int:
    """A job's largest encoded image size (each image's share of Discord's upload limit)."""
    limit = _int(limit, "max_image_bytes")
    if limit < MIN_IMAGE_BYTES_LIMIT:
        raise ValidationFailed("max_image_bytes", f"max_image_bytes must be at least {MIN_IMAGE_BYTES_LIMIT}.")
    return limit


__all__ = [
    "ACCEPTED_FORMATS",
    "MAX_SEED",
    "ValidationFailed",
    "check_aspect",
    "check_attachment_size",
    "check_cfg",
    "check_control_guidance",
    "check_control_mode",
    "check_control_strength",
    "check_count",
    "check_image_byte_limit",
    "check_model",
    "check_negative",
    "check_prompt",
    "check_sampler",
    "check_seed",
    "check_size",
    "check_steps",
    "check_strength",
    "clean_text",
    "decode_image",
    "fit_size",
    "input_work_size",
    "open_checked",
    "prepare_input_image",
    "probe_image",
]
