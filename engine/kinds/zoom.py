"""Zoom Out: the source shrunk in the centre of a canvas of its size (engine.masks.zoom_canvas),
the frame around it inpainted; the shrunk source is pasted back exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.callbacks import JobSteps
from engine.inpaint import run_job
from engine.jobs import Zoom
from engine.masks import zoom_canvas
from engine.pipelines import Generated, Runner
from engine.vae import open_image


def run(runner: Runner, model: Any, job: Zoom, track: Callable[[int], JobSteps]) -> list[Generated]:
    # 1. The canvas: the source shrunk by `factor` in its centre, the frame pre-filled; the mask
    #    is 0 over the source and ramps up to 255 in the frame (the seam), so no blur is added.
    canvas, mask, _ = zoom_canvas(open_image(job.image), job.factor, seed=job.seed)
    # 2. The frame inpainted, the whole canvas worked on (it is the source's size).
    return run_job(runner, model, job, canvas, mask, track, blur=0)
