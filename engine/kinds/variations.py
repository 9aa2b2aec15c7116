"""Variations: the base's img2img of one image, `count` seeds in one batched call; made from a
controlled result, with its ControlNet (engine.control_edit)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.callbacks import JobSteps
from engine.control_edit import prepare_img2img
from engine.jobs import Variations, image_seeds
from engine.pipelines import Generated, Runner
from engine.vae import open_image


def run(runner: Runner, model: Any, job: Variations, track: Callable[[int], JobSteps]) -> list[Generated]:
    image = open_image(job.image)
    seeds = image_seeds(job.seed, job.count)
    control = prepare_img2img(runner, model, job, images=len(seeds), size=image.size)
    images = runner.img2img(
        model.img2img, job, image, seeds, phase="base", strength=job.strength, track=track, control=control
    )
    made = [Generated(image, seed) for image, seed in zip(images, seeds, strict=True)]
    return made if control is None else control.outputs(made)
