"""ControlNet: loading, the control map, and the pipeline over the base's modules; for text2img
here, and for img2img and inpainting (Variations, Vary Region) with engine.control_edit's classes.

Read top to bottom:

1. Loading (`load_controlnet`). `[controlnets.<mode>] model` is a hub id, a local diffusers
   ControlNet folder, or one `.safetensors` file with its `config.json` beside it; safetensors
   only (engine.weights). With `union_mode` it is a ControlNet-Union model. It is loaded in the
   model's dtype on first use and kept in the `LoadedModel` (`LoadedModel.controlnet`): as long
   as the model stays in memory (its LRU), in RAM while no job needs it, moved to the device for
   the job that does. Modes naming the same source share one copy.
2. The control map (`control_map`). The member's upload is fitted to the job's size (scaled to
   cover it, centre-cropped: A1111's "Crop and Resize"), then edges (Canny), depth or pose are
   found on it (engine.annotators, here in the engine process), or, with `control_as_is`, the
   upload already is the map (a controlled result's map, carried to its Variations and edits).
3. The pipeline (`control_view`). diffusers' `StableDiffusionXLControlNetPipeline` (the Union
   pipeline for a Union model; `Pipelines` names the pair, text2img's by default) built over the
   base's OWN modules (a new object: nothing copied or cast; `from_pipe` would cast the shared
   modules to one dtype), which engine.pipelines `fresh_pipeline` then clones per call with its
   own scheduler. A text2img job's ends at the base's `denoising_end`, so the refiner takes the
   latents over as in any text2img job.
4. Exact batches. With several images, `PerImageUNet` runs the UNet once per image; the
   ControlNet is run the same way (`per_image`), so image i of a batch is exactly the image of the
   one-image job with seed+i.
5. At `control_strength` 0 the ControlNet's residuals are multiplied by 0: the image is exactly
   the one without control (tests/engine/test_control.py).
"""

from __future__ import annotations

import functools
import inspect
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from diffusers import (
    ControlNetModel,
    ControlNetUnionModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionPipeline,
)
from diffusers.models.controlnets.controlnet import ControlNetOutput
from PIL import Image, ImageOps

from config.addons import ControlNetSettings, ModelSettings
from config.settings import EngineSettings
from engine import annotators
from engine.callbacks import X0Tap
from engine.jobs.controlled import Controlled
from engine.model_check import ModelCheck
from engine.models import LoadedModel, ModelRegistry, _dtype_kwarg, quiet_progress
from engine.options import CONTROL_MODULES
from engine.pipelines import Generated, _rows
from engine.pnginfo import controlnet_unit
from engine.serving import source_name
from engine.validate import ValidationFailed, check_control_mode
from engine.weights import ModelLoadError, ModelSource, hub_offline

log = logging.getLogger(__name__)

HALF = (torch.float16, torch.bfloat16)
CONTROL_PARAM = "Control"  # PNG parameters: the mode, so a result can be redone from its metadata
UNIT_PARAM = "ControlNet 0"  # the unit, as A1111's ControlNet extension writes it


# --- 1. loading ------------------------------------------------------------------------------------


def load_controlnet(mode: str, settings: ControlNetSettings, dtype: torch.dtype) -> torch.nn.Module:
    """The ControlNet of `[controlnets.<mode>]` in `dtype`, on the CPU; ModelLoadError saying what to
    change when it cannot be loaded."""
    role = f"controlnets.{mode}.model"
    source = ModelSource.parse(settings.model, role=role, layout="model")
    union = settings.union_mode is not None
    started = time.perf_counter()
    try:
        with quiet_progress():
            net = _load(ControlNetUnionModel if union else ControlNetModel, source, dtype, role)
    except ModelLoadError:
        raise
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
        raise ModelLoadError(f"{role}: cannot load the ControlNet from {source.describe()}: {text}") from exc
    if union and not isinstance(net, ControlNetUnionModel):
        raise ModelLoadError(f"{role}: {source.describe()} is not a ControlNet-Union model; remove union_mode")
    if isinstance(net, ControlNetUnionModel):
        types = int(net.config.num_control_type)
        if settings.union_mode is None or settings.union_mode >= types:
            raise ModelLoadError(
                f"controlnets.{mode}.union_mode: {source.describe()} is a ControlNet-Union model with "
                f"{types} control types: set union_mode to one of 0–{types - 1}"
            )
    log.info("ControlNet for %s loaded from %s in %.1f s", mode, source.describe(), time.perf_counter() - started)
    return net.eval().requires_grad_(False)


def _load(cls: Any, source: ModelSource, dtype: torch.dtype, role: str) -> Any:
    kwargs = {"use_safetensors": True} | _dtype_kwarg(dtype)
    if source.kind == "folder":
        return cls.from_pretrained(source.location, local_files_only=True, variant=source.variant, **kwargs)
    if source.kind == "hub":
        offline = hub_offline()
        if dtype in HALF:
            # ControlNet repos ship half-size fp16 files as SDXL's do: take them when there.
            try:
                return cls.from_pretrained(source.location, local_files_only=offline, variant="fp16", **kwargs)
            except (OSError, ValueError) as exc:
                log.info("no fp16 variant of %s (%s); loading the default weights", source.location, exc)
        return cls.from_pretrained(source.location, local_files_only=offline, **kwargs)
    if cls is ControlNetUnionModel:
        raise ModelLoadError(f"{role}: a ControlNet-Union model loads from a diffusers folder or a hub id")
    config = Path(source.location).parent
    if (config / "config.json").is_file():
        return cls.from_single_file(source.location, config=str(config), local_files_only=True, **_dtype_kwarg(dtype))
    if hub_offline():
        raise ModelLoadError(
            f"{role} = {source.location!r} is a single file and the model hub is offline: put the "
            "ControlNet's config.json (its diffusers config) beside it, or use its diffusers folder"
        )
    return cls.from_single_file(source.location, **_dtype_kwarg(dtype))


def check_fits(net: Any, model: LoadedModel, mode: str) -> None:
    """Refuse a ControlNet made for another kind of base (its UNet copy takes other text features,
    or its control image embedding downsamples by another factor than the base's VAE)."""
    config, unet, vae = net.config, model.base.unet.config, model.base.vae.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    embedding = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
    if config.cross_attention_dim != unet.cross_attention_dim or embedding != factor:
        raise ModelLoadError(
            f"controlnets.{mode}.model does not fit the model {model.name!r} (the ControlNet takes text "
            f"features of width {config.cross_attention_dim} and downsamples its image by {embedding}; the base "
            f"gives {unet.cross_attention_dim} and its VAE downsamples by {factor}): use an SDXL ControlNet"
        )


def controlnet_for(
    registry: ModelRegistry, model: LoadedModel, mode: str
) -> tuple[torch.nn.Module, ControlNetSettings]:
    """The mode's ControlNet on the model's device (loaded into the model on first use)."""
    check_control_mode(mode, registry.controlnets)
    settings = registry.controlnets[mode]
    key = f"{settings.model}|union" if settings.union_mode is not None else settings.model
    net = model.controlnet(key, lambda: _prepared(load_controlnet(mode, settings, model.dtype), registry.engine))
    check_fits(net, model, mode)
    return net, settings


def _prepared(net: torch.nn.Module, engine: EngineSettings) -> torch.nn.Module:
    if engine.channels_last:  # the same memory format as the UNet it feeds (engine.accel)
        cast(Any, net).to(memory_format=torch.channels_last)
    return net


# --- 2. the control map ----------------------------------------------------------------------------


def control_map(
    job: Controlled, settings: ControlNetSettings, device: torch.device, size: tuple[int, int]
) -> Image.Image:
    """What the ControlNet follows, at `size` (the job's): the upload fitted (cover, centre crop),
    then its edges, depth or pose, or itself when the member says it already is the map."""
    with Image.open(io.BytesIO(job.control_image)) as upload:
        rgb = upload.convert("RGB")
        fitted = rgb if rgb.size == size else ImageOps.fit(rgb, size, Image.Resampling.LANCZOS)
    if job.control_as_is:
        return fitted
    if job.control == "edges":
        return annotators.edges(fitted)
    mode = cast(annotators.AnnotatorMode, job.control)
    return annotators.load_annotator(mode, settings.annotator, device)(fitted)


# --- 3. the pipeline -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipelines:
    """The diffusers ControlNet pipeline classes of one kind of call: for a ControlNet, and for a
    ControlNet-Union model."""

    plain: type
    union: type

    def of(self, net: torch.nn.Module) -> Any:
        return self.union if isinstance(net, ControlNetUnionModel) else self.plain


TEXT2IMG = Pipelines(StableDiffusionXLControlNetPipeline, StableDiffusionXLControlNetUnionPipeline)


def control_view(
    base: Any, net: torch.nn.Module, *, images: int = 1, exact: bool = True, pipelines: Pipelines = TEXT2IMG
) -> Any:
    """A ControlNet pipeline object over `base`'s modules and `net` (nothing copied or cast), for
    engine.pipelines.fresh_pipeline to clone per call. Its flags are `base`'s (the img2img and
    inpainting pipelines' `requires_aesthetics_score` too)."""
    cls = pipelines.of(net)
    config = base.config
    flags = {"force_zeros_for_empty_prompt": bool(config.get("force_zeros_for_empty_prompt", True))}
    if "requires_aesthetics_score" in inspect.signature(cls.__init__).parameters:
        flags["requires_aesthetics_score"] = bool(config.get("requires_aesthetics_score", False))
    view = cls(
        **base.components,
        controlnet=per_image(net, images) if exact and images > 1 else net,
        add_watermarker=False,
        **flags,
    )
    view.set_progress_bar_config(disable=True)
    return view


def image_key(view: Any) -> str:
    """The name a pipeline call takes the control image by: text2img's `image`, else
    `control_image` (`image` there is the picture worked on)."""
    return "control_image" if "control_image" in inspect.signature(type(view).__call__).parameters else "image"


def steering(net: torch.nn.Module, settings: ControlNetSettings, job: Controlled) -> dict[str, Any]:
    """The ControlNet's arguments of one pipeline call, but the control image."""
    common: dict[str, Any] = {
        "controlnet_conditioning_scale": job.control_strength,
        "control_guidance_start": job.control_guidance_start,
        "control_guidance_end": job.control_guidance_end,
    }
    if isinstance(net, ControlNetUnionModel):
        return {"control_mode": [settings.union_mode], **common}
    return common


class _ControlCallback:
    """A step callback that also halves the control image (`key`) when the CFG cutoff turns
    guidance off: the pipeline doubled it for CFG and, unlike the prompt tensors, would keep it
    doubled."""

    def __init__(self, inner: Any, key: str = "image") -> None:
        self.inner = inner
        self.key = key
        self.cfg_off_after = inner.cfg_off_after
        extra = [key] if inner.cfg_off_after is not None else []
        self.tensor_inputs = [*inner.tensor_inputs, *extra]

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        guided = pipe.do_classifier_free_guidance
        kwargs = self.inner(pipe, i, t, kwargs)
        if guided and not pipe.do_classifier_free_guidance and torch.is_tensor(kwargs.get(self.key)):
            kwargs[self.key] = kwargs[self.key].chunk(2)[1]
        return kwargs


@dataclass(frozen=True)
class Control:
    """A job's ControlNet: the map it follows (at the job's size), the pipeline over the base,
    the call's arguments and what its images say about it."""

    map: Image.Image
    view: Any
    steer: dict[str, Any]
    params: Mapping[str, str] = field(default_factory=dict)
    union: bool = False

    @property
    def kwargs(self) -> dict[str, Any]:
        """The ControlNet's arguments of the pipeline call, the map included."""
        return self.call_kwargs(self.map)

    def call_kwargs(self, image: Image.Image) -> dict[str, Any]:
        """The same with `image` as the map (an inpainting call's part of it)."""
        return {image_key(self.view): [image] if self.union else image, **self.steer}

    def cfg_off(self, cfg_off_after: int | None) -> int | None:
        """The CFG cutoff a call with this ControlNet can take. The Union pipelines cannot be
        handed a halved control image mid-call, so their steps keep guidance (no cutoff)."""
        return None if self.union else cfg_off_after

    def wrap(self, inner: Any) -> Any:
        """A step callback (made with `cfg_off`) that also halves the control image."""
        return inner if self.union else _ControlCallback(inner, image_key(self.view))

    def callback(self, steps: Any, *, planned: int, tap: X0Tap, cfg_off_after: int | None) -> Any:
        """The base call's step callback (see `cfg_off`)."""
        return self.wrap(steps.callback("base", planned=planned, tap=tap, cfg_off_after=self.cfg_off(cfg_off_after)))

    def outputs(self, images: list[Generated]) -> list[Generated]:
        """The images with the ControlNet in their parameters, the map on the first."""
        return [
            Generated(g.image, g.seed, params={**g.params, **self.params}, control=self.map if i == 0 else None)
            for i, g in enumerate(images)
        ]


def prepare(
    runner: Any,
    model: LoadedModel,
    job: Controlled,
    *,
    images: int,
    size: tuple[int, int],
    base: Any = None,
    pipelines: Pipelines = TEXT2IMG,
) -> Control:
    """Everything a job's ControlNet needs, the control map made (in this process) at `size`:
    `pipelines` over `base` (the model's base by default)."""
    net, settings = controlnet_for(runner.registry, model, job.control)
    started = time.perf_counter()
    image = control_map(job, settings, model.device, size)
    log.info(
        "job=%s control map (%s) in %.2f s", getattr(job, "job_id", ""), job.control, time.perf_counter() - started
    )
    module = "none" if job.control_as_is else CONTROL_MODULES[job.control]
    unit = controlnet_unit(
        module=module,
        model=source_name(settings.model),
        weight=job.control_strength,
        guidance_start=job.control_guidance_start,
        guidance_end=job.control_guidance_end,
    )
    view = control_view(
        model.base if base is None else base, net, images=images, exact=runner.exact_batches, pipelines=pipelines
    )
    return Control(
        map=image,
        view=view,
        steer=steering(net, settings, job),
        params={CONTROL_PARAM: job.control, UNIT_PARAM: unit},
        union=isinstance(net, ControlNetUnionModel),
    )


# --- 4. exact batches ------------------------------------------------------------------------------


class _PerImage:
    """Put before a ControlNet class (`per_image`): the wrapped ControlNet runs once per image (with
    its CFG pair) and the residuals are put back in the batch's order, for the reason
    engine.pipelines.PerImageUNet gives. It IS a ControlNetModel (or Union) to the pipeline, which
    checks, with the wrapped one's config and parameters."""

    def __init__(self, net: torch.nn.Module, images: int) -> None:
        torch.nn.Module.__init__(cast(torch.nn.Module, self))
        self.net = net
        self.images = images
        self._internal_dict = net._internal_dict  # the config the pipeline reads

    def forward(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        batch, images = sample.shape[0], self.images
        if images <= 1 or batch not in (images, 2 * images):
            return self.net(sample, timestep, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        down_out: list[torch.Tensor] = []
        mid_out = torch.empty(0)
        for i in range(images):
            rows = torch.tensor([i] if batch == images else [i, images + i], device=sample.device)
            down, mid = self.net(
                sample.index_select(0, rows),
                _rows(timestep, rows, batch),
                *(_rows(arg, rows, batch) for arg in args),
                return_dict=False,
                **{key: _rows(value, rows, batch) for key, value in kwargs.items()},
            )
            if i == 0:
                down_out = [sample.new_empty((batch, *part.shape[1:]), dtype=part.dtype) for part in down]
                mid_out = sample.new_empty((batch, *mid.shape[1:]), dtype=mid.dtype)
            for out, part in zip(down_out, down, strict=True):
                out.index_copy_(0, rows, part)
            mid_out.index_copy_(0, rows, mid)
        if return_dict:
            return ControlNetOutput(down_block_res_samples=tuple(down_out), mid_block_res_sample=mid_out)
        return tuple(down_out), mid_out


@functools.cache
def _per_image_class(cls: Any) -> type:
    return type(f"PerImage{cls.__name__}", (_PerImage, cls), {"__module__": __name__})


def per_image(net: torch.nn.Module, images: int) -> torch.nn.Module:
    """`net` run once per image of a batch of `images` (see _PerImage)."""
    cls: Any = type(net)
    wrapped: torch.nn.Module = _per_image_class(cls)(net, images)
    return wrapped


# --- `atelier models check` ------------------------------------------------------------------------


def check_controlnets(
    models: Mapping[str, ModelSettings],
    default_model: str,
    engine: EngineSettings,
    controlnets: Mapping[str, ControlNetSettings],
) -> list[ModelCheck]:
    """Load each configured ControlNet and annotator, check the ControlNet fits the default model
    and run the annotator once on a test image; one ModelCheck per mode."""
    if not controlnets:
        return []
    try:
        registry = ModelRegistry({default_model: models[default_model]}, engine.model_copy(update={"models_in_ram": 0}))
        model = registry.get(default_model)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
        return [ModelCheck(f"controlnets.{mode}", False, 0.0, detail) for mode in controlnets]
    # Set here rather than given to the registry, which checks them all at once: each mode's own
    # problem is reported on its own line.
    registry.controlnets = dict(controlnets)
    results = []
    probe = Image.new("RGB", (64, 64), "white")
    for mode, settings in controlnets.items():
        started = time.perf_counter()
        try:
            net, _ = controlnet_for(registry, model, mode)
            parts = [f"ControlNet{'-Union' if settings.union_mode is not None else ''} ({_label(settings.model)})"]
            if settings.annotator:
                annotators.load_annotator(cast(annotators.AnnotatorMode, mode), settings.annotator, model.device)(probe)
                parts.append(f"{mode} estimator ({_label(settings.annotator)})")
            megabytes = sum(p.numel() * p.element_size() for p in net.parameters()) / 1e6
            detail = f"{' + '.join(parts)}, {megabytes:.0f} MB, fits model {default_model!r}"
            results.append(ModelCheck(f"controlnets.{mode}", True, time.perf_counter() - started, detail))
        except (ModelLoadError, ValidationFailed) as exc:
            results.append(ModelCheck(f"controlnets.{mode}", False, time.perf_counter() - started, str(exc)))
        except Exception as exc:
            detail = f"{type(exc).__name__}: {exc}"
            results.append(ModelCheck(f"controlnets.{mode}", False, time.perf_counter() - started, detail))
    registry.unload()
    annotators.clear_annotators()
    return results


def _label(source: str) -> str:
    return ModelSource.parse(source, layout="model").label


__all__ = [
    "TEXT2IMG",
    "Control",
    "Pipelines",
    "check_controlnets",
    "check_fits",
    "control_map",
    "control_view",
    "controlnet_for",
    "image_key",
    "load_controlnet",
    "per_image",
    "prepare",
    "steering",
]
