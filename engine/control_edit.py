"""ControlNet for the kinds that start from an image: Variations / V1…Vn (img2img) and Vary Region
(inpainting), made from a controlled result and following its control map (docs/control.md).

The pipelines are diffusers' `StableDiffusionXLControlNetImg2ImgPipeline` and
`StableDiffusionXLControlNetInpaintPipeline` (their Union variants for a Union model), built over
the base's own modules by engine.control.control_view like text2img's, with its loading, map,
exact batches and strength. What differs:

- img2img: the call takes the source as latents (engine.vae.encode_image), as the plain img2img
  call does; the map is fitted to the source's size.
- inpainting: diffusers' ControlNet inpainting pipelines take the source only as pixels (they mask
  it in pixel space), and would encode it themselves by sampling the latent distribution with the
  seeds' generators. `_engine_encoded` makes them encode as engine.vae does (the distribution's
  mean, latents_mean/std, the safe precision), so at strength 0 the image is exactly the one of
  the same edit without control (in fp32; in half precision the source passes the pipeline's
  half-precision cast first). The map is fitted to the source, then cut to the inpainting work
  box and scaled to its work size (engine.inpaint), as the source is.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
)

from engine.control import Control, Pipelines, prepare
from engine.jobs.controlled import Controlled
from engine.models import LoadedModel
from engine.vae import encode_pixels


@functools.cache
def _engine_encoded(cls: Any) -> type:
    """`cls` with `_encode_vae_image` as engine.vae encodes (no randomness). Same class name."""

    def _encode_vae_image(self: Any, image: torch.Tensor, generator: Any) -> torch.Tensor:
        return encode_pixels(self, image)

    namespace = {"_encode_vae_image": _encode_vae_image, "__module__": cls.__module__, "__doc__": cls.__doc__}
    return type(cls.__name__, (cls,), namespace)


IMG2IMG = Pipelines(StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetUnionImg2ImgPipeline)
INPAINT = Pipelines(
    _engine_encoded(StableDiffusionXLControlNetInpaintPipeline),
    _engine_encoded(StableDiffusionXLControlNetUnionInpaintPipeline),
)


def prepare_img2img(
    runner: Any, model: LoadedModel, job: Controlled, *, images: int, size: tuple[int, int]
) -> Control | None:
    """A Variations job's ControlNet over the model's img2img pipeline (None without control)."""
    if not job.control:
        return None
    return prepare(runner, model, job, images=images, size=size, base=model.img2img, pipelines=IMG2IMG)


def prepare_inpaint(
    runner: Any, model: LoadedModel, job: Controlled, *, base: Any, images: int, size: tuple[int, int]
) -> Control | None:
    """An edit's ControlNet over the pipeline it inpaints with (`base`: the model's base or its
    inpainting checkpoint), the map at the source's `size` (None without control)."""
    if not job.control:
        return None
    return prepare(runner, model, job, images=images, size=size, base=base, pipelines=INPAINT)


__all__ = ["IMG2IMG", "INPAINT", "prepare_img2img", "prepare_inpaint"]
