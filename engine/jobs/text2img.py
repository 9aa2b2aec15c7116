"""Generate: text to image with the base → refiner ensemble of experts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from engine import validate
from engine.jobs.base import JobBase, JobKind, Limits, units
from engine.jobs.controlled import Controlled
from engine.options import COUNT


@dataclass(frozen=True, kw_only=True)
class Text2Img(JobBase, Controlled):
    """Base → refiner (or base alone when `refiner` is False or the model has none); with a
    ControlNet (engine.jobs.controlled: the member's upload and how it steers) on the base."""

    width: int = 1024
    height: int = 1024
    count: int = COUNT.default
    # None: use the refiner when the model has one.
    refiner: bool | None = None

    kind: ClassVar[str] = "text2img"
    prompt_required: ClassVar[bool] = True
    batchable: ClassVar[bool] = True

    @property
    def image_count(self) -> int:
        return self.count

    def cost(self, input_size: tuple[int, int] | None = None) -> float:
        return units(self.width * self.height, self.steps, self.count)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        validate.check_size(self.width, self.height)
        validate.check_count(self.count)
        if self.refiner is not None and not isinstance(self.refiner, bool):
            raise validate.ValidationFailed("refiner", "refiner must be true or false.")
        self.check_control(limits)

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        if self.refiner is False or refiner is None:
            return {}
        return {"refiner": refiner, "refiner_switch": refiner_switch}

    def result_fields(self) -> dict[str, str]:
        return self.control_result_fields()


TEXT2IMG = JobKind(name="text2img", label="Generate", spec=Text2Img, run="engine.kinds.text2img:run")
