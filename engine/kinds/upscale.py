"""Upscale: Lanczos (or a spandrel model) to the output size, then low-strength base img2img
that adds the detail Lanczos cannot; above `engine.vae_tiling_above` px in overlapping feathered
tiles (engine.upscale), each with its own seed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from engine.callbacks import JobSteps
from engine.jobs import Upscale, image_seeds
from engine.pipelines import (
    Generated,
    Runner,
    fresh_pipeline,
    generators,
    img2img_call_steps,
    micro_conditioning,
    planned_steps,
)
from engine.prompts import Conditioning, encode_prompt
from engine.upscale import Tile, blend_images, default_overlap, tile_grid, tile_side_for, upscaled_size
from engine.vae import decode_latents, encode_image, open_image, vae_tiling

log = logging.getLogger(__name__)


def run(runner: Runner, model: Any, job: Upscale, track: Callable[[int], JobSteps]) -> list[Generated]:
    # 1. Enlarge the pixels: Lanczos, or the configured super-resolution model.
    image = open_image(job.image)
    width, height = upscaled_size(
        image.width,
        image.height,
        job.factor,
        max(runner.generation.upscale_max_side, image.width, image.height),
    )
    enlarged = runner.upscaler(image, (width, height))

    # 2. Plan: one img2img pass over the whole image, or over overlapping tiles when large.
    tiled = max(width, height) > runner.engine.vae_tiling_above
    if tiled:
        side = tile_side_for(runner.engine.vae_tiling_above)
        tiles = tile_grid(width, height, side, default_overlap(side))
    else:
        tiles = [Tile((0, 0, width, height), np.ones((height, width)))]
    source = model.img2img
    call_steps = img2img_call_steps(job.steps, job.strength)
    per_tile = planned_steps(source, job.sampler, call_steps, strength=job.strength)
    steps = track(per_tile * len(tiles))
    log.debug("upscale %s: %dx%d → %dx%d in %d tile(s)", job.job_id, *image.size, width, height, len(tiles))

    # 3. Low-strength img2img adds the detail Lanczos cannot; each tile has its own seed.
    cond = encode_prompt(source, job.prompt, job.negative, guidance=job.cfg > 1)
    done: list[tuple[Tile, Image.Image]] = []
    with vae_tiling(source.vae, tiled):
        for tile, seed in zip(tiles, image_seeds(job.seed, len(tiles)), strict=True):
            steps.check_cancelled()
            crop = enlarged.crop(tile.box)
            done.append((tile, _detail_pass(runner, source, job, crop, seed, cond, call_steps, per_tile, steps)))

    # 4. Feather the tiles together.
    result = blend_images(done, width, height) if tiled else done[0][1]
    return [Generated(result, job.seed)]


def _detail_pass(
    runner: Runner,
    source: Any,
    job: Upscale,
    image: Image.Image,
    seed: int,
    cond: Conditioning,
    call_steps: int,
    planned: int,
    steps: JobSteps,
) -> Image.Image:
    pipe, tap = fresh_pipeline(source, job.sampler)
    callback = steps.callback(
        "upscale", planned=planned, tap=tap, cfg_off_after=runner.cfg_cutoff_step(planned, job.cfg)
    )
    latents = pipe(
        **cond.pipeline_kwargs(),
        image=encode_image(source, image),
        strength=job.strength,
        num_inference_steps=call_steps,
        guidance_scale=job.cfg,
        generator=generators([seed]),
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=callback.tensor_inputs,
        **micro_conditioning(image.width, image.height),
    ).images
    steps.check_cancelled()
    return decode_latents(source, latents)[0]
