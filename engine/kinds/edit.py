"""Vary Region: the grid regions or the member's mask redone by SDXL inpainting, the rest of the
image kept pixel for pixel; a source larger than SDXL's size is worked on around its region."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from PIL import Image

from engine.callbacks import JobSteps
from engine.control_edit import prepare_inpaint
from engine.inpaint import inpaint_source, run_job
from engine.jobs import Edit
from engine.jobs.edit import MASK_BLUR
from engine.masks import region_mask
from engine.pipelines import Generated, Runner
from engine.vae import open_image
from engine.validate import SDXL_PIXELS

# Context around the region when a large source is worked on in part (diffusers' padding_mask_crop).
CONTEXT = 64


def run(runner: Runner, model: Any, job: Edit, track: Callable[[int], JobSteps]) -> list[Generated]:
    # 1. The source as the bot fitted it, and what to redo on it (white).
    image = open_image(job.image)
    if job.regions:
        mask = region_mask(job.regions, image.size)
    else:
        with Image.open(io.BytesIO(job.mask)) as stored:
            mask = stored.convert("L")
        if mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.NEAREST)

    # 2. A controlled result's ControlNet, its map at the source's size (engine.control_edit).
    control = prepare_inpaint(runner, model, job, base=inpaint_source(model), images=job.image_count, size=image.size)

    # 3. Inpaint: the whole image at SDXL size, or a larger one around its region.
    large = image.width * image.height > SDXL_PIXELS
    crop = CONTEXT if large else None
    return run_job(runner, model, job, image, mask, track, blur=MASK_BLUR, padding_mask_crop=crop, control=control)
