"""Vary Region: redo part of an image (SDXL inpainting), the rest kept pixel for pixel.

The part to redo is either grid regions (`regions`: the /edit `region` option, the Vary Region
picker) or the member's own mask (`mask`: PNG bytes, white = redo, already decoded and checked by
engine.masks.decode_mask at the source's fitted size). A job has exactly one of the two. Made
from a controlled result, it carries that result's ControlNet (engine.jobs.controlled).

Price: pixels denoised × steps run. An edit is denoised at SDXL's ~1 MP at most (a larger source
is worked on around its region, engine.inpaint), so the pixels are the source's, capped at that.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from engine import validate
from engine.jobs.base import ImageJob, JobKind, Limits, img2img_steps, units
from engine.jobs.controlled import Controlled
from engine.masks import REGIONS, decode_mask, region_mask

EDIT_STRENGTH = 0.9  # the contract's default
NO_AREA = (
    "Say what to redo: give a `region` (a part of the image), or a `mask` "
    "(an image the same shape: white where to redo, black where to keep)."
)
MASK_BLUR = 8  # px of Gaussian softening at the mask's edge (the seam), well inside the 32 px promise


def worked_pixels(size: tuple[int, int]) -> int:
    """Pixels an edit denoises for a source (or canvas) of `size`: all of them up to SDXL's
    ~1 MP; a larger one is worked on at that size around what is redone."""
    return min(size[0] * size[1], validate.SDXL_PIXELS)


def check_regions(regions: tuple[str, ...]) -> tuple[str, ...]:
    """Known region names, each once, in grid order; refused when they cover the whole image."""
    unknown = [name for name in regions if name not in REGIONS]
    if unknown or not regions:
        raise validate.ValidationFailed(
            "region", f"Unknown region {', '.join(unknown) or '(none)'}: choose among {', '.join(REGIONS)}."
        )
    chosen = tuple(name for name in REGIONS if name in regions)
    if region_mask(chosen, (3, 3)).getextrema()[0] == 255:
        raise validate.ValidationFailed(
            "region", "Those regions cover the whole image: leave one out, or use Variations to redo it all."
        )
    return chosen


@dataclass(frozen=True, kw_only=True)
class Edit(ImageJob, Controlled):
    strength: float = EDIT_STRENGTH
    regions: tuple[str, ...] = ()
    mask: bytes = field(default=b"", repr=False)

    kind: ClassVar[str] = "edit"
    keep_resolution: ClassVar[bool] = True

    def cost(self, input_size: tuple[int, int] | None = None) -> float:
        if input_size is None:
            raise ValueError("input_size is required to price a job that starts from an image")
        return units(worked_pixels(input_size), img2img_steps(self.steps, self.strength), self.image_count)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        self.check_control(limits)
        if not self.regions and not self.mask:
            raise validate.ValidationFailed("mask", NO_AREA)
        if self.regions and self.mask:
            raise validate.ValidationFailed("mask", "Give a mask or a region to redo, not both.")
        if self.regions:
            check_regions(self.regions)
            return
        size = validate.probe_image(
            self.image, max_bytes=limits.max_attachment_bytes, max_pixels=limits.max_attachment_pixels
        )
        decode_mask(self.mask, size, max_bytes=limits.max_attachment_bytes, max_pixels=limits.max_attachment_pixels)

    @property
    def area(self) -> str:
        """What is redone, as members and the PNG metadata name it."""
        return ", ".join(self.regions) if self.regions else "mask"

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        return {"strength": self.strength, "kind": self.kind, "region": self.area, "mask_blur": MASK_BLUR}

    def result_fields(self) -> dict[str, str]:
        return {"Region": self.area, **self.control_result_fields()}

    # ------------------------------------------------------------------ storage
    # The mask travels in the stored job (base64 PNG; a drawn mask is a few KB), so it survives a
    # restart and a retry exactly like the job's other parameters.
    def to_params(self) -> dict[str, Any]:
        params = super().to_params()
        params["regions"] = list(self.regions)
        params["mask"] = base64.b64encode(self.mask).decode("ascii") if self.mask else ""
        return params

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, job_id: str, image: bytes | None = None) -> Self:
        data = dict(params)
        data["regions"] = tuple(str(name) for name in data.get("regions") or ())
        encoded = data.get("mask") or ""
        try:
            data["mask"] = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else bytes(encoded)
        except (binascii.Error, ValueError, TypeError):
            data["mask"] = b""  # refused by check(): the stored job is damaged
        return super().from_params(data, job_id=job_id, image=image)


EDIT = JobKind(name="edit", label="Vary Region", spec=Edit, run="engine.kinds.edit:run")
