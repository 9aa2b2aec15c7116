"""Per-step hooks for the pipeline calls of one job: progress, previews, cancellation, CFG cutoff.

One `JobSteps` lives for a whole job and numbers steps across all its pipeline calls (base then
refiner continue one count; `total` is every step the job will run). Each pipeline call gets its
own `callback_on_step_end` from `JobSteps.callback(phase, ...)`.

Cancelling RAISES `JobCancelled` from the callback instead of setting `pipe._interrupt`: the
interrupt flag skips the remaining steps but still runs the VAE decode, and it would not stop
a base → refiner chain; an exception aborts at once and unwinds the whole job.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.api import JobCancelled
from engine.jobs.events import Phase, Progress
from engine.preview import preview_jpeg

# The tensors a CFG cutoff has to shrink from [negative; positive] to [positive].
CFG_TENSORS = ["prompt_embeds", "add_text_embeds", "add_time_ids"]


class X0Tap:
    """Remembers the scheduler's latest prediction of the clean latents (x0) for previews.

    Wraps `step` on a scheduler instance that belongs to one pipeline call (see engine.samplers:
    a fresh scheduler per call), so nothing shared is modified. Euler, Euler a and DDIM return
    `pred_original_sample`; the DPM-Solver++ and UniPC multistep solvers keep the x0 they just
    computed as `model_outputs[-1]`. When neither is available `latest` stays None and the
    preview falls back to the noisy latents.
    """

    def __init__(self, scheduler: SchedulerMixin) -> None:
        self.latest: torch.Tensor | None = None
        self._scheduler = scheduler
        self._step = scheduler.step
        config = scheduler.config
        self._x0_in_history = str(config.get("algorithm_type", "")).endswith("dpmsolver++") or bool(
            config.get("predict_x0", False)
        )

        # `wraps` keeps step()'s signature visible: pipelines inspect it to decide whether to pass
        # `generator` (ancestral samplers would silently fall back to the global RNG without it).
        @functools.wraps(self._step)
        def tapped_step(*args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
            out = self._step(*args, return_dict=True, **kwargs)
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None and self._x0_in_history:
                history = getattr(self._scheduler, "model_outputs", None)
                x0 = history[-1] if history else None
            self.latest = x0
            return out if return_dict else (out.prev_sample,)

        scheduler.step = tapped_step


class JobSteps:
    """Step numbering, progress reports, previews and cancellation for one job."""

    def __init__(
        self,
        job_id: str,
        total: int,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: Callable[[], bool],
        preview_every: int = 0,
        preview_size: int = 128,
    ) -> None:
        self.job_id = job_id
        self.total = total
        self.done = 0
        self.on_progress = on_progress
        self.cancelled = cancelled
        self.preview_every = preview_every
        self.preview_size = preview_size

    def check_cancelled(self) -> None:
        """Raise JobCancelled if the job was cancelled (also called between pipeline calls)."""
        if self.cancelled():
            raise JobCancelled(self.job_id)

    def report(self, phase: Phase, preview: bytes | None = None) -> None:
        self.on_progress(Progress(self.job_id, self.done, self.total, phase, preview))

    def advance(self, phase: Phase, latents: torch.Tensor | None = None) -> None:
        """Count one step done outside a pipeline callback (or inside one) and report it."""
        self.done += 1
        preview = None
        if latents is not None and self.preview_every and self.done % self.preview_every == 0:
            preview = preview_jpeg(latents, self.preview_size)
        self.report(phase, preview)

    def callback(
        self,
        phase: Phase,
        *,
        planned: int,
        tap: X0Tap | None = None,
        cfg_off_after: int | None = None,
    ) -> StepCallback:
        """The `callback_on_step_end` for one pipeline call that should run `planned` steps.

        `cfg_off_after`: turn classifier-free guidance off after this many steps of THIS call
        (None: never)."""
        return StepCallback(self, phase, planned=planned, tap=tap, cfg_off_after=cfg_off_after)


class Steps(Protocol):
    """What a pipeline call's callback tells: one job's `JobSteps`, or a batch's (engine.batch)."""

    total: int

    def check_cancelled(self) -> None: ...

    def advance(self, phase: Phase, latents: torch.Tensor | None = None) -> None: ...


class StepCallback:
    """`callback_on_step_end(pipe, i, t, kwargs) -> kwargs` for one pipeline call."""

    def __init__(
        self,
        steps: Steps,
        phase: Phase,
        *,
        planned: int,
        tap: X0Tap | None,
        cfg_off_after: int | None,
    ) -> None:
        self.steps = steps
        self.phase = phase
        self.planned = planned
        self.tap = tap
        self.cfg_off_after = cfg_off_after
        self.tensor_inputs = ["latents", *CFG_TENSORS] if cfg_off_after is not None else ["latents"]

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == 0:
            # The plan counts steps the way diffusers does; if a scheduler ever disagrees, keep
            # the total honest instead of reporting step 12/10.
            actual = getattr(pipe, "_num_timesteps", None) or self.planned
            self.steps.total += actual - self.planned
        self.steps.check_cancelled()
        if self.cfg_off_after is not None and i + 1 == self.cfg_off_after:
            kwargs = cfg_cutoff(pipe, kwargs)
        x0 = self.tap.latest if self.tap is not None else None
        self.steps.advance(self.phase, x0 if x0 is not None else kwargs["latents"])
        return kwargs


def cfg_cutoff(pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Stop classifier-free guidance for the remaining steps of this pipeline call.

    Batch-safe: under CFG each conditioning tensor is [negatives (B); positives (B)], so the
    positives are `chunk(2)[1]`, whatever B is. (diffusers' SDXLCFGCutoffCallback keeps `[-1:]`,
    one row, which breaks batches.)"""
    if not pipe.do_classifier_free_guidance:
        return kwargs
    pipe._guidance_scale = 0.0  # the pipeline object is private to this call (engine.pipelines)
    for name in CFG_TENSORS:
        if name in kwargs:
            kwargs[name] = kwargs[name].chunk(2)[1]
    return kwargs


__all__ = ["CFG_TENSORS", "JobSteps", "StepCallback", "Steps", "X0Tap", "cfg_cutoff"]
