"""Masks and canvases for editing: Vary Region (inpainting), Zoom Out and Pan (outpainting).

Pure PIL + numpy (no torch), so the bot can check and preview edits without the engine.

Masks are "L" images: 255 = redo, 0 = keep, values between blend (a soft seam).

Uploaded masks (`decode_mask`) follow one rule, stated to members as "paint the area to redo in
white": without real transparency the BRIGHTNESS decides (at least 50% grey = redo). With real
transparency (some pixel less than fully opaque) the COVERAGE decides: painted (alpha at least 50%)
= redo, transparent = keep, whatever the colour. That is what a paint app exports from a mask
drawn on a transparent layer: strokes opaque in the brush colour (black is a common default, so
brightness would lose them) and the rest transparent, its colour undefined (apps store black, white
or whatever was erased). An exported layer mask (white opaque, black transparent) reads the same
under both rules. Not supported: OpenAI's convention of sending the photo with the area to redo
erased (transparent); under this rule the erased hole is kept and the photo redone.

Outpainting canvases put the source (shrunk for Zoom Out, as is for Pan) on a larger or equal
canvas whose new area is pre-filled with its edges smeared outwards, blurred and lightly noised,
and return a mask that is exactly 0 over the source and ramps up to 255 inside the new area only:
`composite` then puts every source pixel back bit for bit.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterable
from typing import Literal, cast

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from engine.validate import ValidationFailed, open_checked

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive, like PIL
Direction = Literal["left", "right", "up", "down"]

# The 3×3 grid cells (column, row) each region covers: sides are whole rows or columns.
_CELLS: dict[str, tuple[tuple[int, int], ...]] = {
    "center": ((1, 1),),
    "top": ((0, 0), (1, 0), (2, 0)),
    "bottom": ((0, 2), (1, 2), (2, 2)),
    "left": ((0, 0), (0, 1), (0, 2)),
    "right": ((2, 0), (2, 1), (2, 2)),
    "top-left": ((0, 0),),
    "top-right": ((2, 0),),
    "bottom-left": ((0, 2),),
    "bottom-right": ((2, 2),),
}
REGIONS: tuple[str, ...] = tuple(_CELLS)

ZOOM_FACTORS = (1.5, 2.0)
PAN_MULTIPLE = 64  # SDXL-friendly sides
SEAM = 32  # px of the new area over which the mask ramps from keep to redo
PREFILL_NOISE = 6.0  # std-dev (0–255 levels) of the noise on the pre-filled area


# --- regions -------------------------------------------------------------------------------------


def _grid_edges(length: int) -> tuple[int, int, int, int]:
    """Where the 3×3 grid's lines fall along one side (integer, so cells tile exactly)."""
    return 0, length // 3, 2 * length // 3, length


def region_mask(regions: Iterable[str], size: tuple[int, int]) -> Image.Image:
    """The union of the named grid regions as an "L" mask of `size` (white = redo)."""
    names = list(regions)
    unknown = [name for name in names if name not in _CELLS]
    if unknown or not names:
        raise ValueError(f"unknown region(s) {unknown or names!r}: choose among {', '.join(REGIONS)}")
    width, height = size
    xs, ys = _grid_edges(width), _grid_edges(height)
    mask = np.zeros((height, width), np.uint8)
    for name in names:
        for col, row in _CELLS[name]:
            mask[ys[row] : ys[row + 1], xs[col] : xs[col + 1]] = 255
    return Image.fromarray(mask, "L")


# --- uploaded masks ------------------------------------------------------------------------------


def _as_mask_field(error: ValidationFailed) -> ValidationFailed:
    """engine.validate's image messages, reworded for the mask option."""
    message = re.sub(r"^The (attachment|image)\b", "The mask", error.message)
    return ValidationFailed("mask", message)


def _coverage(image: Image.Image) -> Image.Image:
    """The mask's grey levels before scaling, by the rule in the module docstring."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: stretch to 8 bits (a plain convert would clip nearly all to white).
        low, high = cast(tuple[float, float], image.getextrema())
        span = (high - low) or 1
        return image.point(lambda v: (v - low) * 255.0 / span, "F").convert("L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        alpha = image.convert("RGBA").getchannel("A")
        if cast(tuple[int, int], alpha.getextrema())[0] < 255:  # real transparency: what was painted is the redo area
            return alpha
    return image.convert("L")  # 1, L, P, RGB, CMYK…: ITU-R 601 luminance


def decode_mask(data: bytes, size: tuple[int, int], *, max_bytes: int, max_pixels: int) -> Image.Image:
    """An uploaded mask, decoded by content under the image caps, as a binary "L" mask of `size`.

    Any size: scaled with a smooth filter then thresholded at 128, so a mask drawn on a smaller
    or larger copy of the image, or antialiased, lands on the right pixels. Refuses non-images,
    oversized files, and masks that would redo nothing or everything."""
    try:
        image = open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ValidationFailed as error:
        raise _as_mask_field(error) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # damaged EXIF etc.: usable or refused
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            image.load()
            if image.size[0] * image.size[1] > max_pixels:  # a frame may declare its own size
                raise ValidationFailed("mask", "The mask has too many pixels: attach a smaller mask.")
            # Same orientation as the image it goes with (decode_image applies EXIF too).
            image = ImageOps.exif_transpose(image) or image
            grey = _coverage(image)
    except ValidationFailed:
        raise
    except Exception:
        raise ValidationFailed("mask", "The mask file is truncated or damaged and cannot be read.") from None
    if grey.size != tuple(size):
        grey = grey.resize(size, Image.Resampling.BILINEAR)
    mask = grey.point(lambda v: 255 if v >= 128 else 0)
    low, high = mask.getextrema()
    if high == 0:
        raise ValidationFailed(
            "mask",
            "The mask is all black: there is nothing to redo. Paint the area to redo in white "
            "(or opaque, on a transparent background) and the rest black.",
        )
    if low == 255:
        raise ValidationFailed("mask", "The mask is all white: use /generate to make a new image.")
    return mask


def encode_mask(mask: Image.Image) -> bytes:
    """A mask as PNG bytes (what a job carries)."""
    out = io.BytesIO()
    mask.convert("L").save(out, "PNG", compress_level=1)
    return out.getvalue()


# --- outpainting ---------------------------------------------------------------------------------


def _ramp_mask(size: tuple[int, int], keep: Box, seam: int) -> Image.Image:
    """0 inside `keep`, rising with the distance from it to 255 at `seam` px: the soft seam lies
    in the new area only, so every kept pixel can be pasted back exactly."""
    width, height = size
    x0, y0, x1, y1 = keep
    xs, ys = np.arange(width), np.arange(height)
    dx = np.maximum(np.maximum(x0 - xs, xs - (x1 - 1)), 0).astype(np.float64)
    dy = np.maximum(np.maximum(y0 - ys, ys - (y1 - 1)), 0).astype(np.float64)
    distance = np.hypot(dx[None, :], dy[:, None])
    ramp = np.clip(np.ceil(distance * 255.0 / max(seam, 1)), 0, 255).astype(np.uint8)
    return Image.fromarray(ramp, "L")


def _outpaint(kept: Image.Image, size: tuple[int, int], keep: Box, seed: int) -> tuple[Image.Image, Image.Image, Box]:
    """Canvas of `size` with `kept` at `keep`, the rest pre-filled; its mask; the kept box.

    Pre-fill: the kept image's edge pixels repeated outwards (the colours the new area should
    continue), a strong blur (no streaks or hard shapes for the model to copy), a little seeded
    noise (the denoiser makes flat texture out of perfectly flat areas)."""
    width, height = size
    x0, y0, x1, y1 = keep
    pixels = np.asarray(kept.convert("RGB"))
    padded = np.pad(pixels, ((y0, height - y1), (x0, width - x1), (0, 0)), mode="edge")
    margin = max(x0, y0, width - x1, height - y1)
    blurred = Image.fromarray(padded, "RGB").filter(ImageFilter.GaussianBlur(max(2.0, margin / 4)))
    noise = np.random.default_rng(seed).normal(0.0, PREFILL_NOISE, (height, width, 3))
    filled = np.clip(np.asarray(blurred, np.float64) + noise, 0, 255).round().astype(np.uint8)
    canvas = Image.fromarray(filled, "RGB")
    canvas.paste(kept.convert("RGB"), (x0, y0))  # the kept pixels exactly, over the smear
    new_extent = max(1, min(extent for extent in (x0, y0, width - x1, height - y1) if extent > 0))
    seam = max(1, min(SEAM, new_extent // 2))
    return canvas, _ramp_mask(size, keep, seam), keep


def zoom_size(size: tuple[int, int], factor: float) -> tuple[int, int]:
    """The size the source is shrunk to for Zoom Out: each side / factor, rounded so the margins
    on both sides are equal whole pixels (the shrunk source sits at integer coordinates)."""
    if factor not in ZOOM_FACTORS:
        raise ValidationFailed("factor", f"Zoom Out works by {' or '.join(f'{f:g}' for f in ZOOM_FACTORS)}.")
    return tuple(side - 2 * round((side - side / factor) / 2) for side in size)  # type: ignore[return-value]


def zoom_canvas(source: Image.Image, factor: float, *, seed: int = 0) -> tuple[Image.Image, Image.Image, Box]:
    """Zoom Out: a canvas of the source's size with the source shrunk by `factor` (Lanczos) in the
    centre; (canvas, mask, keep_box)."""
    width, height = source.size
    small_w, small_h = zoom_size(source.size, factor)
    kept = source.convert("RGB").resize((small_w, small_h), Image.Resampling.LANCZOS)
    x0, y0 = (width - small_w) // 2, (height - small_h) // 2
    return _outpaint(kept, (width, height), (x0, y0, x0 + small_w, y0 + small_h), seed)


def pan_size(size: tuple[int, int], direction: Direction) -> tuple[int, int]:
    """The canvas size for a pan: the side along `direction` grown by about half, to a multiple
    of 64 (by at least 1 px; the other side unchanged)."""
    width, height = size
    horizontal = direction in ("left", "right")
    side = width if horizontal else height
    grown = int(np.floor(side * 1.5 / PAN_MULTIPLE + 0.5)) * PAN_MULTIPLE
    if grown <= side:
        grown = (side // PAN_MULTIPLE + 1) * PAN_MULTIPLE
    return (grown, height) if horizontal else (width, grown)


def pan_canvas(
    source: Image.Image, direction: Direction, *, max_side: int, seed: int = 0
) -> tuple[Image.Image, Image.Image, Box]:
    """Pan: the source extended on the `direction` side by about half its width (left/right) or
    height (up/down), the canvas sides multiples of 64 when the source's are; the source unchanged
    on the opposite side. Refused when the canvas would exceed `max_side`."""
    if direction not in ("left", "right", "up", "down"):
        raise ValidationFailed("direction", "Pan left, right, up or down.")
    width, height = source.size
    new_w, new_h = pan_size(source.size, direction)
    if max(new_w, new_h) > max_side:
        raise ValidationFailed(
            "direction",
            f"Panning {direction} would make the image {new_w}×{new_h}; the maximum is {max_side} px a side. "
            "Pan the other way, or start from a smaller image.",
        )
    x0 = new_w - width if direction == "left" else 0
    y0 = new_h - height if direction == "up" else 0
    return _outpaint(source.convert("RGB"), (new_w, new_h), (x0, y0, x0 + width, y0 + height), seed)


# --- compositing ---------------------------------------------------------------------------------


def composite(source_canvas: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """`source_canvas` where the mask is 0 (bit for bit), `generated` where it is 255, a rounded
    linear blend in between. All three must have one size."""
    if not source_canvas.size == generated.size == mask.size:
        raise ValueError(f"sizes differ: source {source_canvas.size}, generated {generated.size}, mask {mask.size}")
    src = np.asarray(source_canvas.convert("RGB"), np.uint32)
    gen = np.asarray(generated.convert("RGB"), np.uint32)
    alpha = np.asarray(mask.convert("L"), np.uint32)[..., None]
    # Integer arithmetic: alpha 0 gives (src·255 + 127) // 255 = src exactly; 255 gives gen.
    out = (src * (255 - alpha) + gen * alpha + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


__all__ = [
    "PAN_MULTIPLE",
    "REGIONS",
    "SEAM",
    "ZOOM_FACTORS",
    "Box",
    "Direction",
    "composite",
    "decode_mask",
    "encode_mask",
    "pan_canvas",
    "pan_size",
    "region_mask",
    "zoom_canvas",
    "zoom_size",
]
