"""What Zoom Out and Pan share: a canvas around the source (engine.masks), its new area inpainted
with a blended seam (engine.inpaint), the source unchanged where it is kept.

Price: pixels denoised × steps run, as for every kind: the canvas, capped at SDXL's ~1 MP (a
larger canvas is worked on at that size), × int(steps × strength).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine import validate
from engine.jobs.base import ImageJob, Limits, img2img_steps, units
from engine.jobs.edit import worked_pixels

# Just under 1: the new area starts from its pre-fill (the source's edges smeared outwards)
# drowned in noise, so the model keeps the source's colours going instead of starting blind.
OUTPAINT_STRENGTH = 0.95


@dataclass(frozen=True, kw_only=True)
class Outpaint(ImageJob):
    strength: float = OUTPAINT_STRENGTH

    keep_resolution: ClassVar[bool] = True

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The result's size for a source of `size`."""
        raise NotImplementedError

    def check_canvas(self, size: tuple[int, int], *, max_pixels: int) -> tuple[int, int]:
        """The canvas for a source of `size`; refused when it would be too large."""
        return self.canvas_size(size)

    def cost(self, input_size: tuple[int, int] | None = None) -> float:
        if input_size is None:
            raise ValueError("input_size is required to price a job that starts from an image")
        pixels = worked_pixels(self.canvas_size(input_size))
        return units(pixels, img2img_steps(self.steps, self.strength), self.image_count)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        size = validate.probe_image(
            self.image, max_bytes=limits.max_attachment_bytes, max_pixels=limits.max_attachment_pixels
        )
        self.check_canvas(size, max_pixels=limits.max_attachment_pixels)


__all__ = ["OUTPAINT_STRENGTH", "Outpaint"]
