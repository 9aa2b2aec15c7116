"""Generate: text to image with the base → refiner ensemble of experts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine import validate
from engine.jobs.base import JobBase, JobKind, Limits, units
from engine.options import CONTROL_GUIDANCE_END, CONTROL_GUIDANCE_START, CONTROL_MODES, CONTROL_STRENGTH, COUNT


@dataclass(frozen=True, kw_only=True)
class Text2Img(JobBase):
    """Base → refiner (or base alone when `refiner` is False or the model has none)."""

    width: int = 1024
    height: int = 1024
    count: int = COUNT.default
    # None: use the refiner when the model has one.
    refiner: bool | None = None
    # ControlNet (engine.control): the member's upload (PNG, fitted like an img2img input; kept
    # in the inputs folder, not in the params), the mode ("": none), whether the upload already
    # is an edge, depth or pose map, and how strongly and over which share of the steps it steers.
    control_image: bytes = field(default=b"", repr=False)
    control: str = ""
    control_as_is: bool = False
    control_strength: float = CONTROL_STRENGTH.default
    control_guidance_start: float = CONTROL_GUIDANCE_START.default
    control_guidance_end: float = CONTROL_GUIDANCE_END.default

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
        if self.control or self.control_image:
            validate.check_control_mode(self.control, CONTROL_MODES)
            if not self.control_image:
                raise validate.ValidationFailed("control_image", "A control mode needs a control image.")
            validate.probe_image(
                self.control_image, max_bytes=limits.max_attachment_bytes, max_pixels=limits.max_attachment_pixels
            )
        if not isinstance(self.control_as_is, bool):
            raise validate.ValidationFailed("control_as_is", "control_as_is must be true or false.")
        validate.check_control_strength(self.control_strength)
        validate.check_control_guidance(self.control_guidance_start, self.control_guidance_end)

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        if self.refiner is False or refiner is None:
            return {}
        return {"refiner": refiner, "refiner_switch": refiner_switch}

    def result_fields(self) -> dict[str, str]:
        if not self.control:
            return {}
        given = " (map as given)" if self.control_as_is else ""
        return {"Control": f"{self.control}{given} · strength {self.control_strength:g}"}

    def to_params(self) -> dict[str, Any]:
        params = super().to_params()
        del params["control_image"]  # the upload lives in the inputs folder, like an img2img input
        return params


TEXT2IMG = JobKind(name="text2img", label="Generate", spec=Text2Img, run="engine.kinds.text2img:run")
