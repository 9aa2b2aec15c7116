"""Running jobs on SDXL pipelines: what every kind's call (engine/kinds/) shares.

`Runner.run(job, on_progress=..., cancelled=...)` returns the images as `Generated(image, seed)`;
it loads the job's model and hands the job to its kind's call (the registry, engine.jobs, names
it), which reads top to bottom like a diffusers example.

Things that hold for every call:

- Every pipeline call runs on a private copy of the model's pipeline (same modules, new object)
  with a fresh scheduler for the job's sampler: schedulers and the pipeline's per-call state
  (guidance scale, step counters) are never shared between jobs or threads. The fresh scheduler
  is a deep copy of a pristine one per (sampler, config), and step plans are remembered: both
  are pure functions of their inputs, and rebuilding them cost ~2% of a small job.
- Before a job's first call, its LoRAs are made the model's active adapters (none: disabled), the
  embeddings its prompts use are loaded, and a draft runs on the model's draft adapter
  (engine.styling).
- Prompts go through compel (engine.prompts): weights, and no 77-token limit. Plain prompts skip
  compel's slow parser and recent embeddings are cached, with bit-identical results.
- Micro-conditioning: original_size = target_size = the image size, crops (0, 0); the refiner
  also gets `generation.aesthetic_score` / `negative_aesthetic_score`.
- Latents leave every pipeline as `output_type="latent"` and are decoded by engine.vae, one image
  at a time, in `accel.decode_dtype` (diffusers' own decode crashes with a bf16 UNet and an fp32
  VAE, and it upcasts the shared VAE in place). img2img inputs are encoded there too (the VAE's
  mean, no randomness) and handed over as latents.
- `callback_on_step_end` (engine.callbacks) reports Progress numbered across the whole job,
  attaches a preview every `engine.preview_every` steps, applies the CFG cutoff, and raises
  JobCancelled as soon as `cancelled()` says so.

Same job, same settings, same machine → the same image bytes.
"""

from __future__ import annotations

import copy
import functools
import importlib
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from cachetools import LRUCache, cached
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from config.settings import EngineSettings, GenerationSettings
from engine import accel
from engine.api import JobCancelled
from engine.callbacks import JobSteps, X0Tap
from engine.jobs import Job, Text2Img, img2img_steps, kind_of
from engine.jobs.events import Phase, Progress
from engine.prompts import encode_prompt
from engine.samplers import make_scheduler
from engine.styles import Catalog
from engine.styling import Styling
from engine.upscale import Upscaler, load_upscaler
from engine.vae import decode_latents, encode_image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    image: Image.Image
    seed: int
    # What the image's kind adds to its PNG `parameters` beyond the job's own (a ControlNet unit).
    params: Mapping[str, Any] = field(default_factory=dict)
    # The control map the model followed (engine.control), on the job's first image only.
    control: Image.Image | None = None


# --- helpers shared by every job kind ----------------------------------------------------------


class PerImageUNet:
    """The UNet called once per image (with its CFG pair), so an image's numbers never depend on
    the batch it is in.

    Matrix and convolution kernels pick different blocking for different batch sizes, so on CPU
    (and GPU) row 0 of a batch-of-8 UNet call differs from a batch-of-2 call in the last bits,
    which shows as ±1 in 8-bit pixels. Splitting the UNet call makes image i of a batched job
    exactly the image of the count-1 job with seed+i. Everything else stays batched in one
    pipeline call (prompt encoding, scheduler steps, generators). At SDXL sizes the UNet is
    compute-bound, so the split costs little; it also keeps one batch shape for torch.compile.

    Under CFG the pipeline stacks [negatives (B); positives (B)]; image i is rows (i, B+i).
    Attribute access (config, dtype, add_embedding, ...) goes to the real UNet.
    """

    def __init__(self, unet: Any, images: int) -> None:
        self.unet = unet
        self.images = images

    def __getattr__(self, name: str) -> Any:
        return getattr(self.unet, name)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        batch, images = sample.shape[0], self.images
        if images <= 1 or batch not in (images, 2 * images):
            return self.unet(sample, timestep, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        out = torch.empty_like(sample)
        for i in range(images):
            rows = torch.tensor([i] if batch == images else [i, images + i], device=sample.device)
            part = self.unet(
                sample.index_select(0, rows),
                _rows(timestep, rows, batch),
                *(_rows(arg, rows, batch) for arg in args),
                return_dict=False,
                **{key: _rows(value, rows, batch) for key, value in kwargs.items()},
            )[0]
            out.index_copy_(0, rows, part.to(out.dtype))
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)


def _rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """`value` restricted to `rows` when it is batched (tensors, also inside dicts, lists and
    tuples: a ControlNet's residuals)."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    if isinstance(value, dict):
        return {key: _rows(item, rows, batch) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_rows(item, rows, batch) for item in value)
    return value


def _config_key(config: Mapping[str, Any]) -> str:
    """A scheduler config's content as a hashable key (configs are dicts; the same model loaded
    twice has two equal ones)."""
    return json.dumps(dict(config), sort_keys=True, default=repr)


@cached(LRUCache(maxsize=64), key=lambda sampler, config: (sampler, _config_key(config)), lock=threading.Lock())
def _pristine_scheduler(sampler: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """One scheduler per (sampler, model config), never used itself: new_scheduler copies it."""
    return make_scheduler(sampler, config)


def new_scheduler(pipe: Any, sampler: str) -> SchedulerMixin:
    """A fresh scheduler for `sampler` on `pipe`'s scheduler config: a deep copy of a pristine
    one built once by engine.samplers.make_scheduler. `from_config` validates and derives the
    whole noise schedule on every call (~1.5 ms on this CPU, four times per text2img job); the
    copy is a third of that and gives the same object state."""
    return copy.deepcopy(_pristine_scheduler(sampler, pipe.scheduler.config))


def fresh_pipeline(pipe: Any, sampler: str, *, images: int = 1, exact: bool = True) -> tuple[Any, X0Tap]:
    """A private pipeline object for one call: the same modules as `pipe`, a new scheduler for
    `sampler` (built from `pipe`'s scheduler config), its own per-call state. Cheap (no weights
    are copied or cast; unlike `from_pipe`, which casts shared modules to fp32 by default).

    With `exact` and several `images`, the UNet runs per image (PerImageUNet)."""
    cls = type(pipe)
    _, optional = cls._get_signature_keys(cls)
    flags = {key: pipe.config[key] for key in optional if key in pipe.config}
    flags["add_watermarker"] = False  # we decode ourselves; the watermark would never be applied
    scheduler = new_scheduler(pipe, sampler)
    components = {**pipe.components, "scheduler": scheduler}
    hooked = any(_has_offload_hook(module) for module in components.values())
    if exact and images > 1:
        components["unet"] = PerImageUNet(pipe.unet, images)
    if hooked:
        private = cls(**components, **flags)
    else:
        private = _pinned_class(cls)(**components, **flags)
        private._pinned_device = pipe.unet.device
    private.set_progress_bar_config(disable=True)
    return private, X0Tap(scheduler)


def _has_offload_hook(module: Any) -> bool:
    """Whether accelerate's or diffusers' offloading hooks are on this component."""
    return isinstance(module, torch.nn.Module) and (hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook"))


_pinned_classes: dict[type, type] = {}


def _pinned_class(cls: Any) -> type:
    """`cls` with `_execution_device` read from the instance (`_pinned_device`).

    diffusers computes `_execution_device` on every call by walking every submodule of every
    component in search of offloading hooks (~3 ms per call for the tiny model on this CPU, 1.6%
    of a 256² job; more modules in a real SDXL). The engine never offloads (fresh_pipeline checks),
    and every module of a loaded model sits on one device (engine.models.LoadedModel.move), so
    the answer is the UNet's device. Same class name, so configs and logs are unchanged."""
    pinned = _pinned_classes.get(cls)
    if pinned is None:
        execution_device = property(lambda self: self._pinned_device, doc=cls._execution_device.__doc__)
        namespace = {"_execution_device": execution_device, "__module__": cls.__module__, "__doc__": cls.__doc__}
        pinned = _pinned_classes.setdefault(cls, type(cls.__name__, (cls,), namespace))
    return pinned


def planned_steps(
    pipe: Any,
    sampler: str,
    steps: int,
    *,
    denoising_end: float | None = None,
    denoising_start: float | None = None,
    strength: float | None = None,
) -> int:
    """How many steps (callback calls) one SDXL pipeline call will run, computed the way
    diffusers' pipelines cut the schedule: `denoising_end` keeps timesteps ≥ the cutoff,
    `denoising_start` those below it, `strength` the last int(steps·strength). Remembered per
    (config, sampler, arguments): every job plans with the same few combinations."""
    return _planned(
        _config_key(pipe.scheduler.config),
        pipe.scheduler.config,
        sampler,
        steps,
        denoising_end,
        denoising_start,
        strength,
    )


@cached(LRUCache(maxsize=4096), key=lambda config_key, config, *args: (config_key, *args), lock=threading.Lock())
def _planned(
    config_key: str,
    config: Mapping[str, Any],
    sampler: str,
    steps: int,
    denoising_end: float | None,
    denoising_start: float | None,
    strength: float | None,
) -> int:
    scheduler = copy.deepcopy(_pristine_scheduler(sampler, config))
    return _plan(scheduler, steps, denoising_end, denoising_start, strength)


def _plan(
    scheduler: SchedulerMixin,
    steps: int,
    denoising_end: float | None,
    denoising_start: float | None,
    strength: float | None,
) -> int:
    scheduler.set_timesteps(steps, device="cpu")
    timesteps = scheduler.timesteps
    order = getattr(scheduler, "order", 1)
    train = scheduler.config.num_train_timesteps
    if denoising_end is not None:
        cutoff = round(train - denoising_end * train)
        return int((timesteps >= cutoff).sum())
    if denoising_start is not None:
        cutoff = round(train - denoising_start * train)
        count = int((timesteps < cutoff).sum())
        return count + 1 if order == 2 and count % 2 == 0 else count
    if strength is not None:
        init = min(int(steps * strength), steps)
        return len(timesteps[max(steps - init, 0) * order :])
    return len(timesteps)


def img2img_call_steps(steps: int, strength: float) -> int:
    """`num_inference_steps` for an img2img call so that it runs `img2img_steps(steps, strength)`
    steps (engine.cost): diffusers runs int(steps·strength), which is 0 for small products."""
    wanted = img2img_steps(steps, strength)
    n = steps
    while int(n * strength) < wanted:
        n += 1
    return n


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: the same seed gives the same noise on any device."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def micro_conditioning(width: int, height: int) -> dict[str, Any]:
    size = (height, width)
    return {"original_size": size, "target_size": size, "crops_coords_top_left": (0, 0)}


# --- the runner ---------------------------------------------------------------------------------

KindCall = Callable[["Runner", Any, Any, Callable[[int], JobSteps]], list[Generated]]


@functools.cache
def kind_call(kind: str) -> KindCall:
    """The engine's call for a kind (engine/kinds/<kind>.py), as the registry names it."""
    module, _, name = kind_of(kind).run.partition(":")
    call: KindCall = getattr(importlib.import_module(module), name)
    return call


KindBatchCall = Callable[["Runner", Any, Sequence[Any], Sequence[Callable[[int], JobSteps]]], list[list[Generated]]]


@functools.cache
def kind_batch_call(kind: str) -> KindBatchCall:
    """The batched call of a kind whose jobs are `batchable`: `run_batch` beside its `run`."""
    module, _, _ = kind_of(kind).run.partition(":")
    call: KindBatchCall = getattr(importlib.import_module(module), "run_batch")  # noqa: B009 - named by convention
    return call


class Runner:
    """Runs jobs on the models of a registry (engine.models.ModelRegistry)."""

    def __init__(
        self,
        registry: Any,
        engine: EngineSettings,
        generation: GenerationSettings,
        upscaler: Upscaler | None = None,
        *,
        exact_batches: bool = True,
        catalog: Catalog | None = None,
    ) -> None:
        self.registry = registry
        # The operator's LoRAs, embeddings and draft adapters, put on a model for each job (styled).
        self.styling = Styling(catalog if catalog is not None else Catalog(), engine.lora_cache_mb)
        self.styling.check_files()
        self.engine = engine
        self.generation = generation
        self._upscaler = upscaler
        # Image i of a batch bit-identical to the count-1 job with seed+i (see PerImageUNet).
        # False: one batched UNet call per step (faster for small images on a GPU; images then
        # match their count-1 twins only up to rounding, ±1 in 8-bit pixels).
        self.exact_batches = exact_batches

    @property
    def upscaler(self) -> Upscaler:
        """The pixel upscaler, loaded on first use (`engine.upscaler`, else Lanczos)."""
        if self._upscaler is None:
            self._upscaler = load_upscaler(self.engine.upscaler, device=self.registry.device)
        return self._upscaler

    def warmup(self) -> dict[tuple[int, int], float]:
        """Run a 2-step text2img (base → refiner) of the default model at every configured size,
        so a compiled UNet has its graphs ready before the first user waits (torch.compile
        recompiles for each new height/width; with exact batches the UNet batch is the same for
        every count). Returns the seconds per size; called by the worker when `engine.warmup`."""

        def one(width: int, height: int) -> None:
            job = Text2Img(job_id="warmup", prompt="warm-up", width=width, height=height, steps=2, count=1)
            self.run(job, on_progress=lambda _progress: None, cancelled=lambda: False)

        return accel.warmup(one, self.generation.aspect_sizes().values())

    def run(
        self,
        job: Job,
        *,
        on_progress: Callable[[Progress], None],
        cancelled: Callable[[], bool],
    ) -> list[Generated]:
        """Run one job; raises JobCancelled when `cancelled()` turns true on the way."""
        if cancelled():
            raise JobCancelled(job.job_id)
        model = self.styled(self.registry.get(job.model), [job])
        track = self.tracker(job.job_id, on_progress, cancelled)
        with torch.inference_mode():
            return kind_call(job.kind)(self, model, job, track)

    def run_batch(
        self,
        jobs: Sequence[Job],
        *,
        on_progress: Callable[[Progress], None],
        cancelled: Callable[[str], bool],
    ) -> list[list[Generated]]:
        """Run jobs of one `batch_key` as one batched call (engine.batch): each job's images, in
        order. `cancelled(job_id)` per member: a member cancelled on the way still gets its images
        (the caller drops them); JobCancelled when every member is cancelled."""
        first = jobs[0]
        if len(jobs) == 1:
            return [self.run(first, on_progress=on_progress, cancelled=lambda: cancelled(first.job_id))]
        if any(job.batch_key() != first.batch_key() or job.batch_key() is None for job in jobs):
            raise ValueError("a batch must be jobs of one batch_key")
        if all(cancelled(job.job_id) for job in jobs):
            raise JobCancelled(first.job_id)
        model = self.styled(self.registry.get(first.model), jobs)
        tracks = [self.tracker(job.job_id, on_progress, functools.partial(cancelled, job.job_id)) for job in jobs]
        with torch.inference_mode():
            return kind_batch_call(first.kind)(self, model, jobs, tracks)

    def styled(self, model: Any, jobs: Sequence[Job]) -> Any:
        """`model` with the jobs' LoRAs active (one set: a batch shares it), the embeddings their
        prompts use loaded, and for a draft the model as the draft adapter runs it."""
        return self.styling.prepare(model, jobs)

    def tracker(
        self, job_id: str, on_progress: Callable[[Progress], None], cancelled: Callable[[], bool]
    ) -> Callable[[int], JobSteps]:
        """`track(total)`: the JobSteps of one job that will run `total` steps."""

        def track(total: int) -> JobSteps:
            return JobSteps(
                job_id,
                total,
                on_progress=on_progress,
                cancelled=cancelled,
                preview_every=self.engine.preview_every,
                preview_size=self.engine.preview_size,
            )

        return track

    def img2img(
        self,
        source: Any,
        job: Job,
        image: Image.Image,
        seeds: list[int],
        *,
        phase: Phase,
        strength: float,
        track: Callable[[int], JobSteps],
        control: Any = None,
    ) -> list[Image.Image]:
        """One batched img2img call: `len(seeds)` images from one input image. `control`: an
        engine.control.Control over `source` (its ControlNet img2img pipeline), its map at the
        image's size."""
        call_steps = img2img_call_steps(job.steps, strength)
        planned = planned_steps(source, job.sampler, call_steps, strength=strength)
        steps = track(planned)
        cfg_off = self.cfg_cutoff_step(planned, job.cfg)

        view = source if control is None else control.view
        pipe, tap = fresh_pipeline(view, job.sampler, images=len(seeds), exact=self.exact_batches)
        cond = encode_prompt(source, job.prompt, job.negative, guidance=job.cfg > 1)
        latents = encode_image(source, image)
        if control is None:
            callback = steps.callback(phase, planned=planned, tap=tap, cfg_off_after=cfg_off)
        else:
            callback = control.wrap(
                steps.callback(phase, planned=planned, tap=tap, cfg_off_after=control.cfg_off(cfg_off))
            )
        latents = pipe(
            **cond.pipeline_kwargs(),
            image=latents,
            strength=strength,
            num_images_per_prompt=len(seeds),
            num_inference_steps=call_steps,
            guidance_scale=job.cfg,
            aesthetic_score=self.generation.aesthetic_score,
            negative_aesthetic_score=self.generation.negative_aesthetic_score,
            generator=generators(seeds),
            output_type="latent",
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=callback.tensor_inputs,
            **(control.kwargs if control is not None else {}),
            **micro_conditioning(image.width, image.height),
        ).images
        steps.check_cancelled()
        return decode_latents(source, latents)

    # -- shared ---------------------------------------------------------------------------------

    def cfg_cutoff_step(self, total: int, cfg: float) -> int | None:
        """After how many steps classifier-free guidance stops (`engine.cfg_cutoff` of the job's
        steps; None: never)."""
        fraction = self.engine.cfg_cutoff
        if cfg <= 1 or fraction <= 0:
            return None
        step = max(1, round(fraction * total))
        return step if step < total else None


__all__ = [
    "Generated",
    "Runner",
    "fresh_pipeline",
    "img2img_call_steps",
    "new_scheduler",
    "planned_steps",
]
