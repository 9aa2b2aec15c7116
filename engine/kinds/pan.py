"""Pan: the source extended on one side (engine.masks.pan_canvas), the new strip inpainted with
as much of the source beside it for context; the source is pasted back exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.callbacks import JobSteps
from engine.inpaint import run_job
from engine.jobs import Pan
from engine.masks import Box, pan_canvas
from engine.pipelines import Generated, Runner
from engine.vae import open_image
from engine.validate import MAX_SIDE


def run(runner: Runner, model: Any, job: Pan, track: Callable[[int], JobSteps]) -> list[Generated]:
    # 1. The canvas: the source on the far side, the new strip pre-filled; the mask is 0 over
    #    the source and ramps up to 255 in the strip (the seam), so no blur is added.
    canvas, mask, keep = pan_canvas(open_image(job.image), job.direction, max_side=MAX_SIDE, seed=job.seed)  # type: ignore[arg-type]
    # 2. The strip inpainted, worked on with as wide a band of the source beside it.
    return run_job(runner, model, job, canvas, mask, track, blur=0, work_box=strip_with_context(canvas.size, keep))


def strip_with_context(size: tuple[int, int], keep: Box) -> Box:
    """The new strip of a pan canvas of `size` (everything outside `keep`) plus a band of the
    source as wide as the strip: the model sees what it continues, at the best resolution."""
    width, height = size
    x0, y0, x1, y1 = keep
    if x0 > 0:  # left: the strip is [0, x0)
        return (0, 0, min(width, 2 * x0), height)
    if x1 < width:  # right
        return (max(0, width - 2 * (width - x1)), 0, width, height)
    if y0 > 0:  # up
        return (0, 0, width, min(height, 2 * y0))
    return (0, max(0, height - 2 * (height - y1)), width, height)  # down
