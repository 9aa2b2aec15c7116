"""Upscale: ×2 by Lanczos (or a configured super-resolution model), then a low-strength img2img
that adds the detail Lanczos cannot; in tiles when large."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from engine import validate
from engine.jobs.base import ImageJob, JobKind, Limits


@dataclass(frozen=True, kw_only=True)
class Upscale(ImageJob):
    strength: float = 0.3
    factor: int = 2

    kind: ClassVar[str] = "upscale"

    @property
    def output_scale(self) -> int:
        return self.factor

    def check(self, limits: Limits) -> None:
        super().check(limits)
        if self.factor != 2:
            raise validate.ValidationFailed("factor", "Only ×2 upscaling is supported.")
        width, height = validate.probe_image(
            self.image, max_bytes=limits.max_attachment_bytes, max_pixels=limits.max_attachment_pixels
        )
        if max(width, height) * self.factor > limits.upscale_max_side:
            raise validate.ValidationFailed(
                "image",
                f"Upscaling {width}×{height} ×{self.factor} would exceed {limits.upscale_max_side} pixels a side.",
            )

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        return {**super().image_params(refiner=refiner, refiner_switch=refiner_switch), "upscale": self.factor}


UPSCALE = JobKind(name="upscale", label="Upscale", spec=Upscale, run="engine.kinds.upscale:run")
