"""Compute units: how much GPU work a job is, so quotas and ETAs speak one currency.

1.0 unit = one 1024×1024 image denoised for 30 steps. Cost scales with pixels × denoising steps
actually run × images. img2img jobs run only `strength × steps` steps (that is how diffusers
schedules them), and an upscale is priced by its output pixels.
"""

from __future__ import annotations

from engine.spec import JobBase, Refine, Text2Img, Upscale, Variations

REFERENCE_PIXELS = 1024 * 1024
REFERENCE_STEPS = 30


def img2img_steps(steps: int, strength: float) -> int:
    """Steps diffusers really runs for an img2img call (at least one)."""
    return max(1, int(steps * strength))


def cost_units(job: JobBase, *, input_size: tuple[int, int] | None = None) -> float:
    """Units a job costs. `input_size` (w, h) is needed for image jobs; it is the fitted size the
    engine will work at (see engine.validate.fit_size)."""
    if isinstance(job, Text2Img):
        pixels, steps, count = job.width * job.height, job.steps, job.count
    elif isinstance(job, Refine | Variations | Upscale):
        if input_size is None:
            raise ValueError("input_size is required to price an image job")
        w, h = input_size
        factor = job.factor if isinstance(job, Upscale) else 1
        pixels = w * factor * h * factor
        steps = img2img_steps(job.steps, job.strength)
        count = job.count if isinstance(job, Variations) else 1
    else:
        raise TypeError(f"unknown job type {type(job).__name__}")
    return round(pixels / REFERENCE_PIXELS * steps / REFERENCE_STEPS * count, 4)
