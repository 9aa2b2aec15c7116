"""Generate: the base denoises the first `engine.high_noise_frac` of the schedule and hands its
latents to the refiner for the rest ("ensemble of experts"); the base alone when the job says
`refiner=False` or the model has none. All `count` images run as ONE batched call with one
torch.Generator per image seeded `image_seeds(seed, count)`, so image i is the same image as the
job with seed+i and count 1.

Queued jobs of one shape (`Text2Img.batch_key`) run together the same way: `run_batch` is the one
text2img call, and a job alone is a batch of one (engine.batch: each job's own prompts, seeds,
progress and cancel)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from engine.batch import batch_steps, joined, shape_groups, split_outputs
from engine.callbacks import JobSteps
from engine.control import prepare as prepare_control
from engine.jobs import Text2Img, image_seeds
from engine.pipelines import Generated, Runner, fresh_pipeline, generators, micro_conditioning, planned_steps
from engine.prompts import encode_prompt
from engine.vae import decode_latents


def run(runner: Runner, model: Any, job: Text2Img, track: Callable[[int], JobSteps]) -> list[Generated]:
    return run_batch(runner, model, [job], [track])[0]


def run_batch(
    runner: Runner, model: Any, jobs: Sequence[Text2Img], tracks: Sequence[Callable[[int], JobSteps]]
) -> list[list[Generated]]:
    """Each job's images; `jobs` share one `batch_key`, so `job` (the first) speaks for all in
    everything but prompts, seeds and counts."""
    job = jobs[0]
    frac = runner.engine.high_noise_frac
    counts = [j.count for j in jobs]
    seeds = [seed for j in jobs for seed in image_seeds(j.seed, j.count)]
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
    cfg_off = runner.cfg_cutoff_step(base_steps + refiner_steps, job.cfg)
    guidance = job.cfg if cfg_off is None or cfg_off > base_steps else 1.0  # the refiner's: cut off already?
    base_conds = [encode_prompt(model.base, j.prompt, j.negative, guidance=job.cfg > 1) for j in jobs]
    refiner_conds = [
        encode_prompt(model.refiner, j.prompt, j.negative, guidance=guidance > 1) for j in jobs if use_refiner
    ]
    if len(jobs) > 1 and len(groups := shape_groups(base_conds, refiner_conds)) > 1:
        # Embeddings of different lengths would have to be padded, changing the images: one call each.
        out: list[list[Generated]] = [[] for _ in jobs]
        for group in groups:
            parts = run_batch(runner, model, [jobs[i] for i in group], [tracks[i] for i in group])
            for i, made in zip(group, parts, strict=True):
                out[i] = made
        return out
    steps = batch_steps(tracks, base_steps + refiner_steps, counts)
    # A ControlNet steers the base (engine.control); such a job runs alone (its batch_key is None).
    control = (
        prepare_control(runner, model, job, images=len(seeds), size=(job.width, job.height)) if job.control else None
    )

    # 1. Base: all of the schedule, or its high-noise part.
    base_pipe = control.view if control is not None else model.base
    base, tap = fresh_pipeline(base_pipe, job.sampler, images=len(seeds), exact=runner.exact_batches)
    if control is not None:
        callback = control.callback(steps, planned=base_steps, tap=tap, cfg_off_after=cfg_off)
    else:
        callback = steps.callback("base", planned=base_steps, tap=tap, cfg_off_after=cfg_off)
    noise = generators(seeds)
    latents = base(
        **joined(base_conds, counts),
        width=job.width,
        height=job.height,
        num_inference_steps=job.steps,
        denoising_end=frac if use_refiner else None,
        guidance_scale=job.cfg,
        generator=noise,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=callback.tensor_inputs,
        **(control.kwargs if control is not None else {}),
        **micro,
    ).images

    # 2. Refiner: the low-noise rest of the schedule, on the base's latents.
    if use_refiner:
        steps.check_cancelled()
        refiner, tap = fresh_pipeline(model.refiner, job.sampler, images=len(seeds), exact=runner.exact_batches)
        callback = steps.callback(
            "refiner",
            planned=refiner_steps,
            tap=tap,
            cfg_off_after=cfg_off - base_steps if guidance > 1 and cfg_off is not None else None,
        )
        latents = refiner(
            **joined(refiner_conds, counts),
            image=latents,
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
    made = [Generated(image, seed) for image, seed in zip(images, seeds, strict=True)]
    return split_outputs(control.outputs(made) if control is not None else made, counts)
