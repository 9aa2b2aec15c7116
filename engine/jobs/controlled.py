"""The ControlNet fields a job may carry (engine.control): text2img's from /generate, and the
img2img and inpainting kinds' (Variations, V1…Vn, Vary Region) carried over from a controlled
result, its control map given as is. One definition, so every kind checks, stores and shows
them the same way; the ranges are engine.options'."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine import validate
from engine.jobs.base import Limits
from engine.options import CONTROL_GUIDANCE_END, CONTROL_GUIDANCE_START, CONTROL_MODES, CONTROL_STRENGTH

# The fields a controlled job passes on to the jobs made from its results.
CONTROL_FIELDS = ("control", "control_as_is", "control_strength", "control_guidance_start", "control_guidance_end")


@dataclass(frozen=True, kw_only=True)
class Controlled:
    """A job's ControlNet: the control image (PNG, fitted like an img2img input; kept in the
    inputs folder, not in the params: JobBase.to_params), the mode ("": none), whether the image
    already is an edge, depth or pose map, and how strongly and over which share of the steps it
    steers."""

    control_image: bytes = field(default=b"", repr=False)
    control: str = ""
    control_as_is: bool = False
    control_strength: float = CONTROL_STRENGTH.default
    control_guidance_start: float = CONTROL_GUIDANCE_START.default
    control_guidance_end: float = CONTROL_GUIDANCE_END.default

    def check_control(self, limits: Limits) -> None:
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

    def control_result_fields(self) -> dict[str, str]:
        """The result embed's **Control** field (none without control)."""
        if not self.control:
            return {}
        given = " (map as given)" if self.control_as_is else ""
        return {"Control": f"{self.control}{given} · strength {self.control_strength:g}"}


__all__ = ["CONTROL_FIELDS", "Controlled"]
