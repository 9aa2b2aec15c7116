"""Inpainting on an SDXL base: Vary Region, and the generating half of Zoom Out and Pan.

`inpaint(base, image=..., mask=..., ...)` returns one image per seed at the SOURCE's resolution,
every pixel where the (blurred) mask is 0 identical to the source. Read top to bottom:

1. The mask is blurred (`blur`, diffusers' `mask_processor.blur`) into the compositing mask.
2. Work region: around the mask (`padding_mask_crop` px of context, the crop grown to the
   source's aspect as diffusers does) when that is smaller than the image, else the whole image;
   worked on at an SDXL size (`work_pixels`, multiples of 64; a whole image that already fits is
   worked on at its own size, untouched).
3. The denoising mask is every latent cell (8×8 px) where the compositing mask is non-zero: every
   pixel that takes anything from the result was really generated, never a VAE round trip.
4. One diffusers StableDiffusionXLInpaintPipeline call over the base's OWN modules (a new object:
   no copy, no cast; `from_pipe` would cast every shared module to fp32 unless given a dtype, and
   to that one dtype if given, also the fp32 VAE of a bf16 model), with a fresh scheduler, the
   source handed over as latents (engine.vae.encode_image: the VAE's mean, in the safe
   precision, with latents_mean/std; the pipeline's own encoder samples the latent distribution
   with the seed generators, ignores latents_mean/std, and upcasts the shared VAE in place).
5. Latents decoded here (engine.vae.decode_latents), scaled back into the region, and
   composited onto the source with engine.masks.composite (kept pixels bit-exact).

With a plain 4-channel SDXL UNet the pipeline blends the re-noised source latents outside the mask
after every step; a 9-channel inpainting UNet also gets the masked source's latents.

With `control` (engine.control_edit: an edit made from a controlled result), step 4 is diffusers'
ControlNet inpainting pipeline over the same modules, given the source as pixels (it encodes them
as engine.vae does) and the control map cut to the work box and scaled to the work size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionXLInpaintPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from engine.callbacks import JobSteps, StepCallback
from engine.jobs import ImageJob, image_seeds
from engine.jobs.events import Phase
from engine.masks import Box, composite
from engine.pipelines import (
    Generated,
    Runner,
    fresh_pipeline,
    generators,
    img2img_call_steps,
    micro_conditioning,
    planned_steps,
)
from engine.prompts import encode_prompt
from engine.vae import decode_latents, encode_image
from engine.validate import SDXL_PIXELS, SIZE_MULTIPLE, fit_size

LATENT_CELL = 8  # px per latent cell (SDXL's VAE factor)


def inpaint_steps(pipe: Any, sampler: str, steps: int, strength: float) -> tuple[int, int]:
    """(num_inference_steps to pass, steps the call really runs) for `steps` at `strength`: like
    img2img, diffusers runs the last int(n·strength) of n steps (at least one here)."""
    call_steps = img2img_call_steps(steps, strength)
    return call_steps, planned_steps(pipe, sampler, call_steps, strength=strength)


def inpaint_view(base: Any) -> StableDiffusionXLInpaintPipeline:
    """An inpainting pipeline object over `base`'s modules (nothing copied or cast), for
    engine.pipelines.fresh_pipeline to clone per call."""
    config = base.config
    view = StableDiffusionXLInpaintPipeline(
        **base.components,
        requires_aesthetics_score=bool(config.get("requires_aesthetics_score", False)),
        force_zeros_for_empty_prompt=bool(config.get("force_zeros_for_empty_prompt", True)),
        add_watermarker=False,
    )
    view.set_progress_bar_config(disable=True)
    return view


def work_region(mask: Image.Image, padding_mask_crop: int | None) -> Box:
    """The part of the image to work on: the whole image, or (with `padding_mask_crop`) the
    mask's bounding box plus that many px of context, grown to the image's aspect (diffusers'
    `get_crop_region`). Falls back to the whole image when the crop would be all of it."""
    width, height = mask.size
    whole = (0, 0, width, height)
    if padding_mask_crop is None or mask.getbbox() is None:
        return whole
    box = VaeImageProcessor.get_crop_region(mask, width, height, pad=padding_mask_crop)
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    return whole if (x1 - x0) * (y1 - y0) >= width * height or x1 <= x0 or y1 <= y0 else (x0, y0, x1, y1)


def work_size(region: tuple[int, int], work_pixels: int, *, whole: bool) -> tuple[int, int]:
    """The SDXL size a region is denoised at: a whole image that fits `work_pixels` at multiples
    of 8 stays as is (no resampling at all); anything else is fitted to about `work_pixels`
    (a crop is scaled UP to it: the point of working around the region), multiples of 64."""
    width, height = region
    if whole and width * height <= work_pixels and width % LATENT_CELL == 0 and height % LATENT_CELL == 0:
        return width, height
    return fit_size(width, height, work_pixels, allow_upscale=not whole, multiple=SIZE_MULTIPLE)


def denoise_mask(soft: Image.Image) -> Image.Image:
    """255 on every 8×8 latent cell that holds a non-zero pixel of `soft`, else 0. The pipeline
    binarises its mask at 0.5 and shrinks it to latents by nearest neighbour (one pixel per cell),
    so whole uniform cells reach it unchanged."""
    width, height = soft.size
    values = np.asarray(soft.convert("L"))
    cells = values.reshape(height // LATENT_CELL, LATENT_CELL, width // LATENT_CELL, LATENT_CELL).max(axis=(1, 3))
    full = np.repeat(np.repeat(np.where(cells > 0, 255, 0).astype(np.uint8), LATENT_CELL, 0), LATENT_CELL, 1)
    return Image.fromarray(full, "L")


class _InpaintCallback:
    """A StepCallback that also halves the inpainting pipeline's `mask` (and masked-image
    latents) when the CFG cutoff turns guidance off: the pipeline doubles them for CFG and, once
    guidance is off, would use the doubled mask as is (it chunks it only while CFG is on), which
    doubles the batch of latents."""

    def __init__(self, inner: StepCallback) -> None:
        self.inner = inner
        self.cfg_off_after = inner.cfg_off_after
        extra = ["mask", "masked_image_latents"] if inner.cfg_off_after is not None else []
        self.tensor_inputs = [*inner.tensor_inputs, *extra]

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        guided = pipe.do_classifier_free_guidance
        kwargs = self.inner(pipe, i, t, kwargs)
        if guided and not pipe.do_classifier_free_guidance:
            for name in ("mask", "masked_image_latents"):
                if kwargs.get(name) is not None:
                    kwargs[name] = kwargs[name].chunk(2)[1]
        return kwargs


@torch.inference_mode()
def inpaint(
    base_pipe: Any,
    *,
    image: Image.Image,
    mask: Image.Image,
    prompt: str,
    negative: str = "",
    steps: int,
    cfg: float,
    sampler: str,
    strength: float,
    seeds: list[int],
    blur: int = 8,
    padding_mask_crop: int | None = None,
    work_box: Box | None = None,
    steps_tracker: JobSteps | None = None,
    phase: Phase = "base",
    cfg_off_after: int | None = None,
    work_pixels: int = SDXL_PIXELS,
    control: Any = None,
) -> list[Image.Image]:
    """Redo the white part of `mask` on `image` (an RGB source of any size) once per seed.

    `blur`: the Gaussian radius (px) softening the mask's edge (0: none; give 0 for outpainting
    masks, which are soft already and must stay 0 over the source). `work_box`: the part of the
    image to work on, given (it must hold the whole mask; Pan: the new strip and as much of the
    source for context), instead of the one `padding_mask_crop` finds. `steps_tracker`: progress,
    previews and cancellation (JobCancelled), sized by `inpaint_steps`. Same arguments → same
    bytes; image i is the image of the one-seed call with seeds[i]. `control`: an
    engine.control.Control whose map is at the source's size."""
    if not seeds:
        raise ValueError("at least one seed is needed")
    source = image.convert("RGB")
    hard = mask.convert("L")
    if hard.size != source.size:
        hard = hard.resize(source.size, Image.Resampling.BILINEAR)
    soft = VaeImageProcessor.blur(hard, blur_factor=blur) if blur > 0 else hard

    # 1. Work region and size.
    box = work_box if work_box is not None else work_region(soft, padding_mask_crop)
    x0, y0, x1, y1 = box
    whole = box == (0, 0, *source.size)
    size = work_size((x1 - x0, y1 - y0), work_pixels, whole=whole)
    region = source.crop(box)
    work_image = region if region.size == size else region.resize(size, Image.Resampling.LANCZOS)
    region_mask = soft.crop(box)
    work_mask = denoise_mask(
        region_mask if region_mask.size == size else region_mask.resize(size, Image.Resampling.BILINEAR)
    )
    if work_mask.getbbox() is None:  # nothing to redo: the source itself, once per seed
        return [source.copy() for _ in seeds]

    # 2. One pipeline call, all seeds batched (PerImageUNet keeps each image batch-independent).
    call_steps, planned = inpaint_steps(base_pipe, sampler, steps, strength)
    pipe, tap = fresh_pipeline(inpaint_view(base_pipe) if control is None else control.view, sampler, images=len(seeds))
    cond = encode_prompt(base_pipe, prompt, negative, guidance=cfg > 1)
    extra: dict[str, Any] = {}
    if control is not None:
        # The pipeline masks the source in pixel space (and encodes it as engine.vae does).
        source_input: Any = work_image
        hint = control.map.crop(box)
        extra.update(control.call_kwargs(hint if hint.size == size else hint.resize(size, Image.Resampling.LANCZOS)))
        cfg_off_after = control.cfg_off(cfg_off_after)
    else:
        source_input = encode_image(base_pipe, work_image)
    if control is None and pipe.unet.config.in_channels == 9:  # an inpainting UNet also sees the masked source
        # As diffusers masks it: image · (mask < 0.5) in [-1, 1], i.e. the redo area mid-grey.
        keep = Image.fromarray(np.where(np.asarray(work_mask) < 128, 255, 0).astype(np.uint8), "L")
        masked = Image.composite(work_image, Image.new("RGB", size, (128, 128, 128)), keep)
        extra["masked_image_latents"] = encode_image(base_pipe, masked)
    if steps_tracker is not None:
        callback: Any = _InpaintCallback(
            steps_tracker.callback(phase, planned=planned, tap=tap, cfg_off_after=cfg_off_after)
        )
        if control is not None:
            callback = control.wrap(callback)
        extra["callback_on_step_end"] = callback
        extra["callback_on_step_end_tensor_inputs"] = callback.tensor_inputs
    out = pipe(
        **cond.pipeline_kwargs(),
        image=source_input,
        mask_image=work_mask,
        width=size[0],
        height=size[1],
        strength=strength,
        num_images_per_prompt=len(seeds),
        num_inference_steps=call_steps,
        guidance_scale=cfg,
        generator=generators(seeds),
        output_type="latent",
        **micro_conditioning(*size),
        **extra,
    ).images
    if steps_tracker is not None:
        steps_tracker.check_cancelled()

    # 3. Decode, put back into the region at the source's resolution, keep the kept pixels.
    results = []
    for generated in decode_latents(base_pipe, out):
        if generated.size != region.size:
            generated = generated.resize(region.size, Image.Resampling.LANCZOS)
        canvas = source.copy()
        canvas.paste(generated, (x0, y0))
        outside = Image.new("L", source.size, 0)
        outside.paste(soft.crop(box), (x0, y0))  # nothing generated outside the region is used
        results.append(composite(source, canvas, outside))
    return results


def run_job(
    runner: Runner,
    model: Any,
    job: ImageJob,
    image: Image.Image,
    mask: Image.Image,
    track: Callable[[int], JobSteps],
    *,
    blur: int,
    padding_mask_crop: int | None = None,
    work_box: Box | None = None,
    control: Any = None,
) -> list[Generated]:
    """An editing job's inpainting call (Vary Region, Zoom Out, Pan): on the model's dedicated
    inpainting pipeline when the operator configured one, else on the base's own modules; one
    image per `image_seeds` seed, progress, previews, CFG cutoff and cancellation like every kind.
    `control`: an engine.control.Control over `inpaint_source(model)`, its map at the image's size."""
    pipe = inpaint_source(model)
    seeds = image_seeds(job.seed, job.image_count)
    _, planned = inpaint_steps(pipe, job.sampler, job.steps, job.strength)
    steps = track(planned)
    images = inpaint(
        pipe,
        image=image,
        mask=mask,
        prompt=job.prompt,
        negative=job.negative,
        steps=job.steps,
        cfg=job.cfg,
        sampler=job.sampler,
        strength=job.strength,
        seeds=seeds,
        blur=blur,
        padding_mask_crop=padding_mask_crop,
        work_box=work_box,
        steps_tracker=steps,
        cfg_off_after=runner.cfg_cutoff_step(planned, job.cfg),
        control=control,
    )
    made = [Generated(result, seed) for result, seed in zip(images, seeds, strict=True)]
    return made if control is None else control.outputs(made)


def inpaint_source(model: Any) -> Any:
    """The pipeline a model inpaints with: its dedicated inpainting checkpoint, else its base."""
    return model.inpaint if getattr(model, "inpaint", None) is not None else model.base


__all__ = [
    "LATENT_CELL",
    "denoise_mask",
    "inpaint",
    "inpaint_source",
    "inpaint_steps",
    "inpaint_view",
    "run_job",
    "work_region",
    "work_size",
]
