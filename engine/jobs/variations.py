"""Variations: the base's img2img of one image with `count` seeds; with a ControlNet when made
from a controlled result (engine.jobs.controlled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine import validate
from engine.jobs.base import ImageJob, JobKind, Limits
from engine.jobs.controlled import Controlled


@dataclass(frozen=True, kw_only=True)
class Variations(ImageJob, Controlled):
    strength: float = 0.6
    count: int = 4

    kind: ClassVar[str] = "variations"

    @property
    def image_count(self) -> int:
        return self.count

    def check(self, limits: Limits) -> None:
        super().check(limits)
        validate.check_count(self.count)
        self.check_control(limits)

    def result_fields(self) -> dict[str, str]:
        return self.control_result_fields()


VARIATIONS = JobKind(name="variations", label="Variations", spec=Variations, run="engine.kinds.variations:run")
