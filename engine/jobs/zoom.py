"""Zoom Out: the image shrunk by `factor` in the centre of a canvas of its own size, the frame
around it generated to fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from engine import validate
from engine.jobs.base import JobKind
from engine.jobs.outpaint import Outpaint
from engine.masks import ZOOM_FACTORS

DEFAULT_FACTOR = 2.0  # the contract's default, and the Zoom Out button's


def check_factor(factor: float) -> float:
    if factor not in ZOOM_FACTORS:
        choices = " or ".join(f"{choice:g}" for choice in ZOOM_FACTORS)
        raise validate.ValidationFailed("factor", f"Zoom Out works by {choices}.")
    return float(factor)


@dataclass(frozen=True, kw_only=True)
class Zoom(Outpaint):
    factor: float = DEFAULT_FACTOR

    kind: ClassVar[str] = "zoom"

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size

    def check_canvas(self, size: tuple[int, int], *, max_pixels: int) -> tuple[int, int]:
        check_factor(self.factor)
        return size

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        return {"strength": self.strength, "kind": self.kind, "zoom": self.factor}

    def result_fields(self) -> dict[str, str]:
        return {"Zoom Out": f"{self.factor:g}×"}


ZOOM = JobKind(name="zoom", label="Zoom Out", spec=Zoom, run="engine.kinds.zoom:run")
