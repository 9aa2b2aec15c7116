"""Upscaling helpers: the output size, the pixel upscaler (Lanczos or a spandrel model) and the
tiling arithmetic for processing a large image in overlapping, feathered tiles.

The diffusion part of an upscale (low-strength img2img on the enlarged image, tile by tile when it
is large) is `Runner._upscale` in engine/pipelines.py; everything here is plain image and array
math that can be tested without a model.

Tiling: a side of `length` px is covered by tiles of `tile` px whose starts are spread evenly and
rounded to multiples of 8 (the VAE's factor), so neighbours overlap by at least `overlap` px.
Inside an overlap each tile's weight ramps linearly towards its edge; edges on the image border
are not feathered. A tile's 2-D weight is the outer product of its two 1-D ramps, and blending
divides by the summed weights, so the weights at every pixel sum to exactly 1 and a constant
image stays constant.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from engine.weights import safetensors_file

log = logging.getLogger(__name__)

ALIGN = 8  # the VAE's downscale factor: tile boxes and image sides are multiples of it
MAX_TILE = 1024  # SDXL's native size: larger tiles gain nothing and cost memory


def upscaled_size(width: int, height: int, factor: float, max_side: int) -> tuple[int, int]:
    """(width, height) × factor, scaled down so no side exceeds `max_side`, rounded down to
    multiples of 8 (at least 8)."""
    scale = min(float(factor), max_side / max(width, height))
    return (
        max(ALIGN, int(width * scale) // ALIGN * ALIGN),
        max(ALIGN, int(height * scale) // ALIGN * ALIGN),
    )


def tile_side_for(threshold: int) -> int:
    """Tile side used when an image is larger than `threshold` px (engine.vae_tiling_above)."""
    return max(2 * ALIGN, min(threshold, MAX_TILE) // ALIGN * ALIGN)


def default_overlap(tile: int) -> int:
    """A quarter of the tile, as a multiple of 8: wide enough to hide seams."""
    return max(ALIGN, tile // 4 // ALIGN * ALIGN)


def spans(length: int, tile: int, overlap: int, *, align: int = ALIGN) -> list[tuple[int, int]]:
    """[start, end) intervals of side `tile` covering [0, length), neighbours overlapping by at
    least `overlap`; starts are multiples of `align` (the last tile ends exactly at `length`)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap} must be in [0, tile={tile})")
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    last = length - tile
    starts = [min(last, round(k * last / (count - 1) / align) * align) for k in range(count)]
    starts[-1] = last
    return [(start, start + tile) for start in starts]


def ramp(span: tuple[int, int], previous_end: int | None, next_start: int | None) -> np.ndarray:
    """1-D weights (float64, all > 0) of one span: 1 in the middle, a linear ramp down across the
    part shared with the previous span (ending at `previous_end`) and the next one (starting at
    `next_start`). None means the span touches the image border on that side: no feathering."""
    start, end = span
    position = np.arange(start, end, dtype=np.float64)
    weight = np.ones(end - start, dtype=np.float64)
    if previous_end is not None and previous_end > start:
        weight = np.minimum(weight, (position - start + 1) / (previous_end - start + 1))
    if next_start is not None and next_start < end:
        weight = np.minimum(weight, (end - position) / (end - next_start + 1))
    return weight


def ramps(intervals: list[tuple[int, int]]) -> list[np.ndarray]:
    """The feathering ramp of every span in an ordered list of spans."""
    out = []
    for k, span in enumerate(intervals):
        previous_end = intervals[k - 1][1] if k > 0 else None
        next_start = intervals[k + 1][0] if k + 1 < len(intervals) else None
        out.append(ramp(span, previous_end, next_start))
    return out


@dataclass(frozen=True)
class Tile:
    """A tile's box (left, top, right, bottom) in image pixels and its 2-D weight (h, w)."""

    box: tuple[int, int, int, int]
    weight: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        left, top, right, bottom = self.box
        return right - left, bottom - top


def tile_grid(width: int, height: int, tile: int, overlap: int) -> list[Tile]:
    """Overlapping tiles covering a width × height image, row by row."""
    xs, ys = spans(width, tile, overlap), spans(height, tile, overlap)
    wx, wy = ramps(xs), ramps(ys)
    return [
        Tile((x0, y0, x1, y1), np.outer(wy[j], wx[i])) for j, (y0, y1) in enumerate(ys) for i, (x0, x1) in enumerate(xs)
    ]


def blend(tiles: list[tuple[Tile, np.ndarray]], width: int, height: int) -> np.ndarray:
    """Weighted average of processed tiles, each (h, w) or (h, w, c) float, into one
    (height, width[, c]) float64 array. Weights are normalised per pixel (they sum to 1)."""
    first = tiles[0][1]
    acc = np.zeros((height, width, *first.shape[2:]), dtype=np.float64)
    total = np.zeros((height, width), dtype=np.float64)
    for tile, pixels in tiles:
        left, top, right, bottom = tile.box
        weight = tile.weight if pixels.ndim == 2 else tile.weight[..., None]
        acc[top:bottom, left:right] += pixels * weight
        total[top:bottom, left:right] += tile.weight
    if np.any(total <= 0):
        raise ValueError("tiles do not cover the image")
    return acc / (total if acc.ndim == 2 else total[..., None])


def blend_images(tiles: list[tuple[Tile, Image.Image]], width: int, height: int) -> Image.Image:
    """`blend` for RGB PIL tiles → one RGB PIL image."""
    arrays = [(tile, np.asarray(image.convert("RGB"), dtype=np.float64)) for tile, image in tiles]
    pixels = blend(arrays, width, height)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# --- pixel upscalers ---------------------------------------------------------------------------


class Upscaler(Protocol):
    """Enlarges an RGB image to exactly `size` (width, height)."""

    name: str

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image: ...


class LanczosUpscaler:
    name = "lanczos"

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


class SpandrelUpscaler:
    """A super-resolution model (Real-ESRGAN, SwinIR, ...) loaded with spandrel from .safetensors.

    spandrel does no tiling itself; large inputs are split into overlapping feathered tiles here.
    The model's output is resized with Lanczos to the exact requested size (a ×4 model serves a
    ×2 upscale)."""

    def __init__(self, path: str, *, device: Any = "cpu", tile: int = 512) -> None:
        import torch
        from spandrel import ImageModelDescriptor, ModelLoader

        descriptor = ModelLoader(device=torch.device(device)).load_from_file(safetensors_file(path, role="upscaler"))
        if not isinstance(descriptor, ImageModelDescriptor):
            raise ValueError(f"{path} is not an image-to-image upscaling model")
        descriptor.eval()
        self.model = descriptor
        self.scale = int(descriptor.scale)
        self.device = torch.device(device)
        self.tile = tile
        self.name = f"spandrel:{Path(path).name}"

    def _run(self, image: Image.Image) -> np.ndarray:
        import torch

        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        dtype = next(self.model.model.parameters()).dtype
        with torch.inference_mode():
            out = self.model(pixels.to(self.device, dtype))
        return out[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0

    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        image = image.convert("RGB")
        width, height = image.size
        if max(width, height) <= self.tile:
            pixels = self._run(image)
        else:
            parts = []
            for tile in tile_grid(width, height, self.tile, default_overlap(self.tile) // 2):
                left, top, right, bottom = tile.box
                scaled = Tile(
                    tuple(v * self.scale for v in tile.box),  # type: ignore[arg-type]
                    np.kron(tile.weight, np.ones((self.scale, self.scale))),
                )
                parts.append((scaled, self._run(image.crop((left, top, right, bottom)))))
            pixels = blend(parts, width * self.scale, height * self.scale)
        out = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
        return out if out.size == size else out.resize(size, Image.Resampling.LANCZOS)


def load_upscaler(path: str = "", *, device: Any = "cpu") -> Upscaler:
    """The configured pixel upscaler (engine.upscaler): a spandrel model when `path` is set and
    spandrel is installed, else Lanczos (logged, never an error: upscaling still works)."""
    if not path:
        return LanczosUpscaler()
    try:
        import spandrel  # noqa: F401
    except ImportError:
        log.warning("engine.upscaler is set but spandrel is not installed (pip install spandrel); using Lanczos")
        return LanczosUpscaler()
    return SpandrelUpscaler(path, device=device)


__all__ = [
    "LanczosUpscaler",
    "SpandrelUpscaler",
    "Tile",
    "Upscaler",
    "blend",
    "blend_images",
    "load_upscaler",
    "ramp",
    "ramps",
    "spans",
    "tile_grid",
    "tile_side_for",
    "upscaled_size",
]
