"""Refine: the refiner's img2img over an image (the base's when the model has no refiner)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from engine.jobs.base import ImageJob, JobKind


@dataclass(frozen=True, kw_only=True)
class Refine(ImageJob):
    strength: float = 0.3

    kind: ClassVar[str] = "refine"


REFINE = JobKind(name="refine", label="Refine", spec=Refine, run="engine.kinds.refine:run")
