"""The model registry: the ONE loading path for real SDXL weights and the tiny model alike.

A configured model (`[models.<name>]`) has a `base` and an optional `refiner`, each one of

- a hub id (`org/name`), loaded with `from_pretrained` (from the local cache when offline),
- a local diffusers folder (with `model_index.json`), loaded with `from_pretrained`,
- one `.safetensors` file in the original SDXL layout, loaded with `from_single_file`; its
  `base_config` / `refiner_config` names a local diffusers-format config folder so it loads offline.

Pickle checkpoints (`.ckpt .pt .pth .bin`, or a folder whose weights are only `.bin`) are refused:
unpickling runs arbitrary code. Only safetensors are ever read (`use_safetensors=True`).

The registry keeps the active model on the device and up to `engine.models_in_ram` others in
CPU RAM (least recently used first out), so switching back is a copy, not a reload.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from config.addons import ControlNetSettings, ModelSettings
from config.settings import EngineSettings
from engine.accel import (
    AccelError,
    AccelReport,
    apply_optimizations,
    attached_modules,
    configure_torch,
    resolve_device,
    resolve_dtype,
)
from engine.weights import ModelLoadError, ModelSource, hub_offline

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready to run. `img2img` and `refiner` share modules with `base` (no extra memory
    for img2img; the refiner adds only its UNet). `inpaint`: the operator's dedicated inpainting
    checkpoint (its UNet; text encoders and VAE shared with `base`), None when not configured."""

    name: str
    base: Any  # StableDiffusionXLPipeline
    refiner: Any | None  # StableDiffusionXLImg2ImgPipeline
    img2img: Any  # StableDiffusionXLImg2ImgPipeline on the base weights
    device: torch.device
    dtype: torch.dtype
    load_seconds: float = 0.0
    accel: list[AccelReport] = field(default_factory=list)
    inpaint: Any | None = None  # StableDiffusionXLInpaintPipeline
    # ControlNets used with this model (engine.control), by source: loaded on first use and kept
    # as long as the model is; on the device only from the job that needs one (others go to RAM).
    controlnets: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def has_refiner(self) -> bool:
        return self.refiner is not None

    def modules(self) -> Iterator[torch.nn.Module]:
        """Every distinct torch module of the model (shared ones once)."""
        seen: set[int] = set()
        for pipe in (self.base, self.refiner, self.inpaint):
            if pipe is None:
                continue
            for component in pipe.components.values():
                if isinstance(component, torch.nn.Module) and id(component) not in seen:
                    seen.add(id(component))
                    yield component

    @property
    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.modules() for p in m.parameters())

    @property
    def on_device(self) -> bool:
        """True when every module sits on `device` (False while parked in CPU RAM)."""
        return all(next(m.parameters()).device.type == self.device.type for m in self.modules())

    def move(self, device: torch.device | str) -> None:
        device = torch.device(device)
        for module in self.modules():
            first = next(module.parameters(), None)
            if first is None or not _same_device(first.device, device):
                module.to(device)
            for extra in attached_modules(module):
                extra.to(device)
        if device.type == "cpu":  # parked: its ControlNets wait in RAM with it
            for net in self.controlnets.values():
                _place(net, device)

    def controlnet(self, key: str, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The ControlNet `key` on this model's device (`load()` on first use), every other one of
        this model's ControlNets moved to RAM."""
        net = self.controlnets.get(key)
        if net is None:
            net = self.controlnets[key] = load()
        for other in self.controlnets.values():
            if other is not net:
                _place(other, torch.device("cpu"))
        _place(net, self.device)
        return net


def _place(module: torch.nn.Module, device: torch.device) -> None:
    first = next(module.parameters(), None)
    if first is None or not _same_device(first.device, device):
        module.to(device)


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    """cuda:0 is where "cuda" puts things."""
    return actual.type == wanted.type and (wanted.index is None or actual.index == wanted.index)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Recent diffusers name it `dtype` (and warn about `torch_dtype`); older ones know only `torch_dtype`."""
    from diffusers.utils import deprecation_utils

    name = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    return {name: dtype}


class _EmptyFp32ListFilter(logging.Filter):
    """diffusers warns "modules ... should be kept in float32: []" on every `.to(dtype=...)`, also the one
    `from_pipe` does itself, even when that list is empty: noise in an operator's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("There are modules in") and "kept in float32: []" in message)


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No tqdm bars from diffusers/transformers while loading (the log says what happens)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    was_enabled = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled[0]:
            diffusers_logging.enable_progress_bar()
        if was_enabled[1]:
            transformers_logging.enable_progress_bar()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFp32ListFilter())


def _wrap(exc: Exception, name: str, role: str, source: ModelSource) -> ModelLoadError:
    if isinstance(exc, ModelLoadError):
        return exc
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    if source.kind == "hub":
        hint = (
            "it is not in the local cache and the hub is unreachable (HF_HUB_OFFLINE is set)"
            if hub_offline()
            else "check the id and the network, or download it once and point to the local folder"
        )
        return ModelLoadError(f"model {name!r}: cannot load {role} {source.location!r} from the hub: {hint} ({text})")
    if source.kind == "single_file" and not source.config:
        return ModelLoadError(
            f"model {name!r}: cannot load the single file {source.location!r} without its config folder "
            f"({text}); set {role}_config to a local diffusers-format SDXL config folder"
        )
    return ModelLoadError(f"model {name!r}: cannot load {role} from {source.describe()}: {text}")


def _from_pretrained(cls: Any, source: ModelSource, dtype: torch.dtype, role: str = "base", **components: Any) -> Any:
    kwargs = {"use_safetensors": True} | _dtype_kwarg(dtype) | components
    if source.kind == "folder":
        return cls.from_pretrained(source.location, local_files_only=True, variant=source.variant, **kwargs)
    if source.kind == "hub":
        offline = hub_offline()
        if dtype in (torch.float16, torch.bfloat16):
            # The SDXL repos ship half-size fp16 files: take them when there, else the full ones.
            try:
                return cls.from_pretrained(
                    source.location, local_files_only=offline, variant="fp16", revision=source.revision, **kwargs
                )
            except (OSError, ValueError) as exc:
                log.info("no fp16 variant of %s (%s); loading the default weights", source.location, exc)
        return cls.from_pretrained(source.location, local_files_only=offline, revision=source.revision, **kwargs)
    # Single file.
    if not source.config and hub_offline():
        raise ModelLoadError(
            f"{role} = {source.location!r} is a single file and the model hub is offline: diffusers needs "
            f"the pipeline's configs to load it; set {role}_config to a local diffusers-format config folder "
            "(model_index.json, each component's config.json, the scheduler config, the tokenizers)"
        )
    single_kwargs: dict[str, Any] = _dtype_kwarg(dtype) | components
    if source.config:
        single_kwargs["config"] = source.config
        single_kwargs["local_files_only"] = Path(source.config).is_dir() or hub_offline()
    return cls.from_single_file(source.location, **single_kwargs)


def load_model(name: str, settings: ModelSettings, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load base (+ refiner sharing text_encoder_2 and the VAE), build img2img, move to `device`."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    started = time.perf_counter()
    base_source = ModelSource.parse(settings.base, settings.base_config, role="base", revision=settings.base_revision)
    refiner_source = (
        ModelSource.parse(settings.refiner, settings.refiner_config, role="refiner", revision=settings.refiner_revision)
        if settings.refiner
        else None
    )
    log.info("loading model %r: base from %s (%s, %s)", name, base_source.describe(), device, dtype)
    try:
        with quiet_progress():
            base = _from_pretrained(StableDiffusionXLPipeline, base_source, dtype)
    except Exception as exc:
        raise _wrap(exc, name, "base", base_source) from exc
    if getattr(base, "text_encoder_2", None) is None or getattr(base, "unet", None) is None:
        raise ModelLoadError(f"model {name!r}: {base_source.describe()} is not an SDXL base pipeline")
    log.info("model %r: base loaded in %.1f s", name, time.perf_counter() - started)

    refiner = None
    if refiner_source is not None:
        refiner_started = time.perf_counter()
        try:
            with quiet_progress():
                refiner = _from_pretrained(
                    StableDiffusionXLImg2ImgPipeline,
                    refiner_source,
                    dtype,
                    role="refiner",
                    text_encoder_2=base.text_encoder_2,
                    vae=base.vae,
                )
        except Exception as exc:
            raise _wrap(exc, name, "refiner", refiner_source) from exc
        _check_refiner(name, base, refiner)
        log.info("model %r: refiner loaded in %.1f s", name, time.perf_counter() - refiner_started)

    inpaint = _load_inpaint(name, settings, base, dtype) if settings.inpaint else None

    # from_pipe casts every (shared!) module to its `dtype`, float32 when not given: pass ours.
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(base, **_dtype_kwarg(dtype))
    loaded = LoadedModel(
        name=name, base=base, refiner=refiner, img2img=img2img, device=device, dtype=dtype, inpaint=inpaint
    )
    loaded.move(device)
    for pipe in (base, refiner, inpaint):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    img2img.set_progress_bar_config(disable=True)
    loaded.load_seconds = time.perf_counter() - started
    log.info(
        "model %r ready in %.1f s (%.0f MB of weights%s)",
        name,
        loaded.load_seconds,
        loaded.parameter_bytes / 1e6,
        ", with refiner" if refiner is not None else "",
    )
    return loaded


def _load_inpaint(name: str, settings: ModelSettings, base: Any, dtype: torch.dtype) -> Any:
    """The dedicated inpainting checkpoint, by the same rules as base and refiner (hub id, folder
    or single safetensors file); only its UNet is new: the base's text encoders, tokenizers and
    VAE are passed in, so diffusers loads none of its own."""
    from diffusers import StableDiffusionXLInpaintPipeline

    source = ModelSource.parse(
        settings.inpaint, settings.inpaint_config, role="inpaint", revision=settings.inpaint_revision
    )
    started = time.perf_counter()
    shared = {key: getattr(base, key) for key in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")}
    try:
        with quiet_progress():
            pipe = _from_pretrained(StableDiffusionXLInpaintPipeline, source, dtype, role="inpaint", **shared)
    except Exception as exc:
        raise _wrap(exc, name, "inpaint", source) from exc
    unet = pipe.unet.config
    if unet.cross_attention_dim != base.unet.config.cross_attention_dim or unet.in_channels not in (4, 9):
        raise ModelLoadError(
            f"model {name!r}: the inpaint checkpoint does not fit the base (its UNet takes text features of "
            f"width {unet.cross_attention_dim} and {unet.in_channels} input channels; the base gives "
            f"{base.unet.config.cross_attention_dim}, and an SDXL inpainting UNet takes 4 or 9)"
        )
    log.info("model %r: inpainting UNet loaded in %.1f s", name, time.perf_counter() - started)
    return pipe


def _check_refiner(name: str, base: Any, refiner: Any) -> None:
    width = base.text_encoder_2.config.hidden_size
    cross = refiner.unet.config.cross_attention_dim
    if cross != width:
        raise ModelLoadError(
            f"model {name!r}: the refiner does not fit the base (its UNet expects text features of width "
            f"{cross}, the base's second text encoder gives {width}); use the refiner made for this base"
        )


class ModelRegistry:
    """The configured models by name; `get(name)` loads on demand and caches (see module docstring)."""

    def __init__(
        self,
        models: Mapping[str, ModelSettings | Mapping[str, Any]],
        engine: EngineSettings,
        *,
        controlnets: Mapping[str, ControlNetSettings] | None = None,
    ) -> None:
        if not models:
            raise ModelLoadError("no models configured: add a [models.<name>] table")
        self._settings: dict[str, ModelSettings] = {}
        for name, value in models.items():
            try:
                self._settings[name] = (
                    value if isinstance(value, ModelSettings) else ModelSettings.model_validate(value)
                )
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                message = str(first["msg"]).removeprefix("Value error, ")
                raise ModelLoadError(f"models.{name}.{where}: {message}") from None
        self.engine = engine
        # The configured ControlNet modes (engine.control loads them into each LoadedModel); their
        # sources are checked here, at start-up, so a typo is not found by a member's job.
        self.controlnets: dict[str, ControlNetSettings] = dict(controlnets or {})
        for mode, control in self.controlnets.items():
            ModelSource.parse(control.model, role=f"controlnets.{mode}.model", layout="model")
            if control.annotator:
                role = f"controlnets.{mode}.annotator"
                ModelSource.parse(control.annotator, role=role, kinds=("hub", "folder"), layout="model")
        defaults = [name for name, model in self._settings.items() if model.default]
        self._default = defaults[0] if defaults else next(iter(self._settings))
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        # Models in memory, most recently used last; `_active` is the one on the device.
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._active: str | None = None
        self._lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return list(self._settings)

    @property
    def default_name(self) -> str:
        return self._default

    @property
    def device(self) -> torch.device:
        if self._device is None:
            try:
                self._device = resolve_device(self.engine)
            except AccelError as exc:
                # One error type for callers: a model that cannot be loaded here.
                raise ModelLoadError(str(exc)) from None
            configure_torch(self.engine, self._device)
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        if self._dtype is None:
            self._dtype = resolve_dtype(self.engine, self.device)
        return self._dtype

    def settings(self, name: str = "") -> ModelSettings:
        return self._settings[self.resolve(name)]

    def resolve(self, name: str = "") -> str:
        """ "" → the default model; an unknown name → ModelLoadError listing the known ones."""
        name = name or self._default
        if name not in self._settings:
            raise ModelLoadError(f"unknown model {name!r}; known models: {', '.join(self._settings)}")
        return name

    def has_refiner(self, name: str = "") -> bool:
        return bool(self._settings[self.resolve(name)].refiner)

    @property
    def loaded_names(self) -> list[str]:
        """Models in memory, least recently used first (the last one is the active one)."""
        with self._lock:
            return list(self._loaded)

    @property
    def active_name(self) -> str | None:
        """The model currently on the device (None before the first load or after a failed one)."""
        with self._lock:
            return self._active

    def get(self, name: str = "") -> LoadedModel:
        """The model on the device, loading it (or bringing it back from RAM) when needed."""
        name = self.resolve(name)
        with self._lock:
            device = self.device
            model = self._loaded.get(name)
            if model is not None:
                self._loaded.move_to_end(name)
                if name != self._active:
                    self._park_active()
                    started = time.perf_counter()
                    model.move(device)
                    self._active = name
                    log.info("model %r back on %s in %.2f s", name, device, time.perf_counter() - started)
                return model
            self._park_active()
            # Make room before loading, so RAM never holds more than the configured number.
            self._evict(keep=self.engine.models_in_ram)
            model = load_model(name, self._settings[name], device, self.dtype)
            for pipe in (model.base, model.refiner, model.inpaint):
                if pipe is not None:
                    model.accel.append(apply_optimizations(pipe, self.engine, device, self.dtype))
            self._loaded[name] = model
            self._active = name
            return model

    def _park_active(self) -> None:
        """Move the active model off the device into RAM (nothing to move on the CPU)."""
        active, self._active = self._active, None
        if active is None or active not in self._loaded or self.device.type == "cpu":
            return
        started = time.perf_counter()
        self._loaded[active].move("cpu")
        self._free_device_memory()
        log.info("model %r moved to RAM in %.2f s", active, time.perf_counter() - started)

    def _evict(self, keep: int) -> None:
        """Drop least recently used models until at most `keep` remain in memory."""
        dropped = False
        while len(self._loaded) > keep:
            name, _model = self._loaded.popitem(last=False)
            log.info("model %r dropped from memory", name)
            dropped = True
        if dropped:
            gc.collect()
            self._free_device_memory()

    def _free_device_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def unload(self, name: str | None = None) -> None:
        """Drop one model (or all of them) from memory."""
        with self._lock:
            if name is None:
                self._active = None
                self._evict(keep=0)
            elif self._loaded.pop(name, None) is not None:
                if self._active == name:
                    self._active = None
                gc.collect()
                self._free_device_memory()


__all__ = [
    "LoadedModel",
    "ModelLoadError",
    "ModelRegistry",
    "ModelSource",
    "load_model",
]
