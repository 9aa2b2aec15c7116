"""Generate: the base denoises the first `engine.high_noise_frac` of the schedule and hands its
latents to the refiner for the rest ("ensemble of experts"); the base alone when the job says
`refiner=False` or the model has none. All `count` images run as ONE batched call with one
torch.Generator per image seeded `image_seeds(seed, count)`, so image i is the same image as the
job with seed+i and count 1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.callbacks import JobSteps
from engine.jobs import Text2Img, image_seeds
from engine.pipelines import (
    Generated,
    Runner,
    decode_latents,
    fresh_pipeline,
    generators,
    micro_conditioning,
    planned_steps,
)
from engine.prompts import encode_prompt


def run(runner: Runner, model: Any, job: Text2Img, track: Callable[[int], JobSteps]) -> list[Generated]:
    frac = runner.engine.high_noise_frac
    seeds = image_seeds(job.seed, job.count)
    micro = micro_conditioning(job.width, job.height)

    # Plan: which experts run, and how many steps each.
    use_refiner = model.refiner is not None and job.refiner is not False
    base_steps = planned_steps(model.base, job.sampler, job.steps, denoising_end=frac if use_refiner else None)
    refiner_steps = planned_steps(model.refiner, job.sampler, job.steps, denoising_start=frac) if use_refiner else 0
    if use_refiner and (base_steps == 0 or refiner_steps == 0):
        # So few steps that one expert would get none: run the base alone.
        use_refiner = False
        base_steps = planned_steps(model.base, job.sampler, job.steps)
        refiner_steps = 0
    steps = track(base_steps + refiner_steps)
    cfg_off = runner.cfg_cutoff_step(steps.total, job.cfg)

    # 1. Base: all of the schedule, or its high-noise part.
    base, tap = fresh_pipeline(model.base, job.sampler, images=job.count, exact=runner.exact_batches)
    cond = encode_prompt(model.base, job.prompt, job.negative, guidance=job.cfg > 1)
    callback = steps.callback("base", planned=base_steps, tap=tap, cfg_off_after=cfg_off)
    noise = generators(seeds)
    latents = base(
        **cond.pipeline_kwargs(),
        num_images_per_prompt=job.count,
        width=job.width,
        height=job.height,
        num_inference_steps=job.steps,
        denoising_end=frac if use_refiner else None,
        guidance_scale=job.cfg,
        generator=noise,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=callback.tensor_inputs,
        **micro,
    ).images

    # 2. Refiner: the low-noise rest of the schedule, on the base's latents.
    if use_refiner:
        steps.check_cancelled()
        refiner, tap = fresh_pipeline(model.refiner, job.sampler, images=job.count, exact=runner.exact_batches)
        guidance = job.cfg if cfg_off is None or cfg_off > base_steps else 1.0  # cut off already?
        cond = encode_prompt(model.refiner, job.prompt, job.negative, guidance=guidance > 1)
        callback = steps.callback(
            "refiner",
            planned=refiner_steps,
            tap=tap,
            cfg_off_after=cfg_off - base_steps if guidance > 1 and cfg_off is not None else None,
        )
        latents = refiner(
            **cond.pipeline_kwargs(),
            image=latents,
            num_images_per_prompt=job.count,
            num_inference_steps=job.steps,
            denoising_start=frac,
            guidance_scale=guidance,
            aesthetic_score=runner.generation.aesthetic_score,
            negative_aesthetic_score=runner.generation.negative_aesthetic_score,
            generator=noise,
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=callback.tensor_inputs,
            **micro,
        ).images

    # 3. Decode.
    steps.check_cancelled()
    images = decode_latents(model.base, latents)
    return [Generated(image, seed) for image, seed in zip(images, seeds, strict=True)]
