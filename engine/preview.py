"""Cheap progress previews: SDXL latents → a small RGB JPEG without touching the VAE.

A fixed 4×3 linear map (plus bias) approximates the VAE decoder's colours well enough for a
"what is it turning into" thumbnail (the factors are the widely used SDXL ones from ComfyUI).
A batch becomes a grid. The map runs on the latent grid itself (1/8 of the image side), so a
1024² image gives a 128² preview before any resizing: about a millisecond on a CPU.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image

# Rows: latent channels 0..3; columns: R, G, B. Applied to latents in the UNet's (scaled) space.
SDXL_LATENT_RGB = torch.tensor(
    [
        [0.3651, 0.4232, 0.4341],
        [-0.2533, -0.0042, 0.1068],
        [0.1076, 0.1111, -0.0362],
        [-0.3165, -0.2492, -0.2188],
    ]
)
SDXL_LATENT_RGB_BIAS = torch.tensor([0.1084, -0.0175, -0.0011])


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4, h, w) latents → (B, h, w, 3) uint8 on the CPU."""
    lat = latents.detach()[:, :4].to(device="cpu", dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->bhwr", lat, SDXL_LATENT_RGB) + SDXL_LATENT_RGB_BIAS
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def grid(images: torch.Tensor) -> torch.Tensor:
    """(B, h, w, 3) → one (rows·h, cols·w, 3) image, as square as possible (4 → 2×2)."""
    count, height, width, channels = images.shape
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    padded = torch.zeros((rows * cols, height, width, channels), dtype=images.dtype)
    padded[:count] = images
    return (
        padded.view(rows, cols, height, width, channels)
        .permute(0, 2, 1, 3, 4)
        .reshape(rows * height, cols * width, channels)
    )


def preview_image(latents: torch.Tensor, max_side: int) -> Image.Image:
    """A PIL preview of a latent batch (a grid when B > 1), no side longer than `max_side`."""
    pixels = grid(latents_to_rgb(latents))
    image = Image.fromarray(pixels.numpy(), "RGB")
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return image


def preview_jpeg(latents: torch.Tensor, max_side: int, *, quality: int = 70) -> bytes:
    """`preview_image` encoded as JPEG bytes, ready for Progress.preview."""
    buffer = io.BytesIO()
    preview_image(latents, max_side).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


__all__ = ["latents_to_rgb", "preview_image", "preview_jpeg"]
