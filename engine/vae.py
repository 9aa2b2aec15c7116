"""Images in and out of the latent space, as every kind's call needs them: a job's input image
opened and aligned to the VAE's factor, encoded to latents (the distribution's mean: no
randomness) and latents decoded one image at a time, the VAE in the precision it needs."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_latents
from PIL import Image

from engine import accel
from engine.upscale import ALIGN


def open_image(data: bytes) -> Image.Image:
    """A job's input image as RGB, sides trimmed to multiples of 8 (the VAE's factor; the caller
    normally sends multiples of 64 already)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    aligned = (max(ALIGN, width // ALIGN * ALIGN), max(ALIGN, height // ALIGN * ALIGN))
    return rgb if aligned == rgb.size else rgb.resize(aligned, Image.Resampling.LANCZOS)


@contextmanager
def _vae_precision(vae: Any, dtype: torch.dtype) -> Iterator[None]:
    """Run the VAE in `dtype` for a moment (an fp16 SDXL VAE must encode/decode in fp32)."""
    original = vae.dtype
    if dtype != original:
        vae.to(dtype=dtype)
    try:
        yield
    finally:
        if dtype != original:
            vae.to(dtype=original)


@contextmanager
def vae_tiling(vae: Any, enabled: bool) -> Iterator[None]:
    """VAE tiling on for the duration (large upscales), then back to what it was."""
    before = getattr(vae, "use_tiling", False)
    if enabled and not before:
        vae.enable_tiling()
    try:
        yield
    finally:
        if enabled and not before:
            vae.disable_tiling()


@torch.inference_mode()
def encode_image(pipe: Any, image: Image.Image) -> torch.Tensor:
    """RGB image → scaled latents (1, 4, h/8, w/8) in the UNet's dtype. Uses the latent
    distribution's mean: no randomness, so the per-image generators only drive the noise."""
    return encode_pixels(pipe, pipe.image_processor.preprocess(image, height=image.height, width=image.width))


@torch.inference_mode()
def encode_pixels(pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, h, w) in [-1, 1], as the pipeline's image processor makes them → scaled
    latents, as `encode_image`."""
    vae = pipe.vae
    dtype = accel.decode_dtype(pipe)
    with _vae_precision(vae, dtype):
        latents = retrieve_latents(vae.encode(pixels.to(vae.device, dtype)), sample_mode="argmax")
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = (latents - mean_t) * config.scaling_factor / std_t
    else:
        latents = latents * config.scaling_factor
    return latents.to(pipe.unet.dtype)


@torch.inference_mode()
def decode_latents(pipe: Any, latents: torch.Tensor) -> list[Image.Image]:
    """Latents (B, 4, h, w) → B RGB images, decoded one at a time (VAE slicing: the peak memory
    of one image, and an image's pixels do not depend on the batch it came from)."""
    images = []
    for i in range(latents.shape[0]):
        pixels = accel.decode_latents(pipe, latents[i : i + 1])
        images.extend(pipe.image_processor.postprocess(pixels.float(), output_type="pil"))
    return images


__all__ = ["decode_latents", "encode_image", "encode_pixels", "open_image", "vae_tiling"]
