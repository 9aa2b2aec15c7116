"""Pan: the image extended by about half its width (left, right) or height (up, down), the new
strip generated to fit, the image unchanged on the other side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, get_args

from engine import validate
from engine.jobs.base import JobKind
from engine.jobs.outpaint import Outpaint
from engine.masks import Direction, pan_size

DIRECTIONS: tuple[str, ...] = get_args(Direction)


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise validate.ValidationFailed("direction", f"Pan {', '.join(DIRECTIONS)}.")
    return direction


@dataclass(frozen=True, kw_only=True)
class Pan(Outpaint):
    direction: str = "right"

    kind: ClassVar[str] = "pan"

    def canvas_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return pan_size(size, check_direction(self.direction))  # type: ignore[arg-type]

    def check_canvas(self, size: tuple[int, int], *, max_pixels: int) -> tuple[int, int]:
        """Refused over MAX_SIDE a side or over the attachment pixel cap: a result must be usable
        as an input again (its buttons, /edit)."""
        width, height = self.canvas_size(size)
        if max(width, height) > validate.MAX_SIDE or width * height > max_pixels:
            raise validate.ValidationFailed(
                "direction",
                f"Panning {self.direction} would make the image {width}×{height}; the largest is "
                f"{validate.MAX_SIDE} px a side and {max_pixels / 1e6:.1f} megapixels. "
                "Pan another way, or start from a smaller image.",
            )
        return width, height

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        return {"strength": self.strength, "kind": self.kind, "pan": self.direction}

    def result_fields(self) -> dict[str, str]:
        return {"Pan": self.direction}


PAN = JobKind(name="pan", label="Pan", spec=Pan, run="engine.kinds.pan:run")
