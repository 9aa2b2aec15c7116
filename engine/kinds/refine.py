"""Refine: the refiner's img2img at `job.strength` (the base's when the model has no refiner)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.callbacks import JobSteps
from engine.jobs import Refine
from engine.jobs.events import Phase
from engine.pipelines import Generated, Runner
from engine.vae import open_image


def run(runner: Runner, model: Any, job: Refine, track: Callable[[int], JobSteps]) -> list[Generated]:
    image = open_image(job.image)
    expert = model.refiner if model.refiner is not None else model.img2img
    phase: Phase = "refiner" if model.refiner is not None else "base"
    images = runner.img2img(expert, job, image, [job.seed], phase=phase, strength=job.strength, track=track)
    return [Generated(images[0], job.seed)]
