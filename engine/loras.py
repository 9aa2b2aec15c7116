"""LoRA adapters on the loaded models, through diffusers' PEFT integration, and draft mode.

Each model keeps the LoRAs it ran recently loaded as named adapters of its base pipeline's UNet
and text encoders (`load_lora_weights(file, adapter_name=...)`; kohya and diffusers/peft key
formats alike, diffusers converts them). A job picks its set with `set_adapters(names, weights)`;
a job without LoRAs runs with the adapters disabled (`disable_lora`), which gives exactly the
image of a model that never had one. Switching between sets reads nothing from disk: adapters
leave only when the model's adapters outgrow `engine.lora_cache_mb` (least recently used first,
never one the job needs). The img2img, inpainting and ControlNet pipelines share the base's
modules, so every kind runs with the job's LoRAs; the refiner's own UNet never gets them (SDXL
LoRAs are made for the base), while its text encoder, the base's second one, does.

Adapters are not fused into the weights: fusing makes a step a few percent faster on a GPU but
turns every switch into an unfuse + fuse of the whole UNet, which is what this module avoids.

A LoRA whose layers do not all land in the model (made for another architecture, or with other
shapes) is refused when it loads: `atelier models check` loads every LoRA into every model it
is configured for and reports such misfits, so they show before a member meets them.

Draft mode: the model's `draft_lora` joins the job's adapters at weight 1, or its `draft_unet`
replaces the base's UNet for the job; either way the refiner stays out (few-step adapters finish
the image themselves) and the job's sampler is the adapter's (engine.samplers).

The text encoders' output depends on which LoRAs are active on them: each change is told to
engine.prompts (`set_text_state`), so cached prompt embeddings are never reused across sets.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.api import EngineError
from engine.models import _dtype_kwarg
from engine.prompts import set_text_state
from engine.styles import Catalog, LoraRef
from engine.weights import ModelLoadError, ModelSource, hub_offline, safetensors_file

log = logging.getLogger(__name__)

DRAFT_ADAPTER = "draft"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *TEXT_ENCODERS)
# The first matrix of each adapted layer, in the key formats diffusers reads: kohya, old
# diffusers, peft, and diffusers' attention-processor names.
_DOWN_SUFFIXES = ("lora_down.weight", "lora.down.weight", "lora_A.weight", "lora_linear_layer.down.weight")
_LIBRARY_LOGGERS = ("diffusers", "transformers", "peft")


class LoraError(EngineError):
    """A LoRA (or draft adapter) that cannot be used with a model: not the member's fault, and not
    worth a retry. `detail` says why, for the operator."""

    def __init__(self, name: str, model: str, detail: str) -> None:
        what = "The draft adapter" if name == DRAFT_ADAPTER else f"The LoRA `{name}`"
        super().__init__(
            f"{what} cannot be used with the model `{model}` right now: tell a moderator.",
            retryable=False,
            detail=detail,
        )
        self.name = name


@dataclass(frozen=True)
class Adapter:
    """One LoRA loaded into a model."""

    name: str  # the LoRA's name in the config, or DRAFT_ADAPTER
    file: str
    size: int  # bytes of the file: what the LRU counts
    layers: dict[str, int]  # adapted layers per component (unet, text_encoder, text_encoder_2)

    @property
    def components(self) -> frozenset[str]:
        return frozenset(part for part, count in self.layers.items() if count)

    def describe(self) -> str:
        unet = self.layers.get("unet", 0)
        text = sum(self.layers.get(part, 0) for part in TEXT_ENCODERS)
        where = f"{unet} UNet layers" + (f" + {text} text-encoder layers" if text else "")
        return f"{where}, {self.size / 1e6:.1f} MB"


def adapter_name(name: str) -> str:
    """The adapter's name inside the model: config names and the draft adapter never collide."""
    return name if name == DRAFT_ADAPTER else f"lora_{name}"


def expected_layers(file: Path) -> int:
    """How many layers the LoRA file adapts (its down/A matrices; header only, no tensors read)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return sum(key.endswith(_DOWN_SUFFIXES) for key in handle.keys())  # noqa: SIM118 - not a dict


def adapted_layers(pipe: Any, adapter: str) -> dict[str, int]:
    """Layers of each component that hold `adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    counts = {}
    for part in COMPONENTS:
        module = getattr(pipe, part, None)
        counts[part] = sum(
            1
            for layer in (module.modules() if module is not None else ())
            if isinstance(layer, BaseTunerLayer)
            and (adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}))
        )
    return counts


@contextmanager
def quiet_loading() -> Iterator[None]:
    """diffusers, transformers and peft report every LoRA load at length (missing text-encoder
    keys, load reports, a whole state dict's shape mismatches): this module says what matters."""
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    mismatches = sum("size mismatch" in line for line in lines)
    text = f"{type(exc).__name__}: {lines[1] if mismatches and len(lines) > 1 else (lines[0] if lines else '')}"
    return text + (f" (and {mismatches - 1} more size mismatches)" if mismatches > 1 else "")


def _with_unet(pipe: Any, unet: Any) -> Any:
    """`pipe` with another UNet: the same other modules and flags, nothing copied or cast (unlike
    `from_pipe`, which casts shared modules to its own dtype)."""
    cls = type(pipe)
    _, optional = cls._get_signature_keys(cls)
    flags = {key: pipe.config[key] for key in optional if key in pipe.config}
    other = cls(**{**pipe.components, "unet": unet}, **flags)
    other.set_progress_bar_config(disable=True)
    return other


class ModelLoras:
    """The adapters loaded into one model, least recently used first, and the active set."""

    def __init__(self) -> None:
        self.adapters: OrderedDict[str, Adapter] = OrderedDict()
        self.active: tuple[LoraRef, ...] | None = None  # None: never set (adapters as loaded)
        self.draft_unet: Any = None
        self.draft_pipes: tuple[Any, Any] | None = None  # base and img2img on the draft UNet

    @property
    def size(self) -> int:
        return sum(adapter.size for adapter in self.adapters.values())


class LoraManager:
    """Loads, keeps and activates the LoRAs of every model a Runner uses (one job at a time)."""

    def __init__(self, catalog: Catalog, budget_mb: int) -> None:
        self.catalog = catalog
        self.budget = budget_mb * 1024 * 1024
        self.loads = 0  # files read from disk, all models together
        self._models: weakref.WeakKeyDictionary[Any, ModelLoras] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def state(self, model: Any) -> ModelLoras:
        """What is loaded into `model` (a LoadedModel; kept as long as its base pipeline lives)."""
        state = self._models.get(model.base)
        if state is None:
            state = self._models[model.base] = ModelLoras()
        return state

    # ------------------------------------------------------------------ a job's set
    def activate(self, model: Any, loras: Sequence[LoraRef], *, draft: bool = False) -> Any:
        """Make `loras` (and the draft adapter) the active set of `model` for the next pipeline
        calls; returns the model the job runs on (for a draft: without the refiner, and with the
        draft UNet when the model has one)."""
        settings = self.catalog.models.get(model.name)
        wanted = [(name, self.catalog.loras[name].file, weight) for name, weight in loras]
        if draft and settings is not None and settings.draft_lora:
            wanted.append((DRAFT_ADAPTER, settings.draft_lora, 1.0))
        with self._lock:
            state = self.state(model)
            target = tuple((name, weight) for name, _, weight in wanted)
            if target != state.active:
                self._switch(model, state, wanted)
                state.active = target
                self._tell_prompts(model, state)
        if not draft:
            return model
        return self._draft_view(model, state, settings)

    def _switch(self, model: Any, state: ModelLoras, wanted: list[tuple[str, str, float]]) -> None:
        pipe = model.base
        if not wanted:
            if state.adapters:
                pipe.disable_lora()
            return
        for name, file, _ in wanted:
            self._ensure(model, state, name, file)
        self._evict(model, state, keep={name for name, _, _ in wanted})
        started = time.perf_counter()
        pipe.enable_lora()
        pipe.set_adapters([adapter_name(name) for name, _, _ in wanted], [weight for _, _, weight in wanted])
        log.debug(
            "model %r: LoRAs %s active in %.1f ms",
            model.name,
            ", ".join(f"{name}:{weight:g}" for name, _, weight in wanted),
            (time.perf_counter() - started) * 1000,
        )

    def _tell_prompts(self, model: Any, state: ModelLoras) -> None:
        for part in TEXT_ENCODERS:
            encoder = getattr(model.base, part, None)
            if encoder is not None:
                value = tuple(
                    (name, weight)
                    for name, weight in state.active or ()
                    if name in state.adapters and part in state.adapters[name].components
                )
                set_text_state(encoder, "loras", value)

    # ------------------------------------------------------------------ loading and the LRU
    def _ensure(self, model: Any, state: ModelLoras, name: str, file: str) -> Adapter:
        adapter = state.adapters.get(name)
        if adapter is not None and adapter.file == file:
            state.adapters.move_to_end(name)
            return adapter
        if adapter is not None:
            self._delete(model, state, name)
        adapter = self._load(model, name, file)
        state.adapters[name] = adapter
        state.active = None  # the set changed under set_adapters' feet: set it again
        return adapter

    def _load(self, model: Any, name: str, file: str) -> Adapter:
        role = "draft_lora" if name == DRAFT_ADAPTER else f"loras.{name}.file"
        try:
            path = safetensors_file(file, role=role)
            expected = expected_layers(path)
        except (ModelLoadError, OSError) as exc:
            raise self._error(name, model, str(exc)) from exc
        if not expected:
            raise self._error(name, model, f"{file}: no LoRA layers found (LyCORIS LoHa/LoKr files are not read)")
        pipe, inner = model.base, adapter_name(name)
        self._forget(pipe, inner)  # left by another manager of this model (a models check)
        started = time.perf_counter()
        try:
            with quiet_loading():
                pipe.load_lora_weights(str(path), adapter_name=inner)
        except Exception as exc:
            self._forget(pipe, inner)
            raise self._error(name, model, f"{file}: {_first_line(exc)}") from exc
        self.loads += 1
        layers = adapted_layers(pipe, inner)
        placed = sum(layers.values())
        if placed < expected:
            self._forget(pipe, inner)
            raise self._error(
                name,
                model,
                f"{file}: only {placed} of its {expected} layers exist in this model "
                "(a LoRA for another architecture, e.g. SD 1.5, or another SDXL variant)",
            )
        adapter = Adapter(name=name, file=str(path), size=path.stat().st_size, layers=layers)
        log.info(
            "model %r: LoRA %s loaded in %.2f s (%s)",
            model.name,
            name,
            time.perf_counter() - started,
            adapter.describe(),
        )
        return adapter

    def _error(self, name: str, model: Any, detail: str) -> LoraError:
        log.error("model %r: %s %s cannot be used: %s", model.name, "LoRA", name, detail)
        return LoraError(name, model.name, detail)

    @staticmethod
    def _forget(pipe: Any, inner: str) -> None:
        """Remove what a failed load left behind."""
        present = {adapter for adapters in pipe.get_list_adapters().values() for adapter in adapters}
        if inner in present:
            with quiet_loading():
                pipe.delete_adapters([inner])

    def _delete(self, model: Any, state: ModelLoras, name: str) -> None:
        state.adapters.pop(name, None)
        self._forget(model.base, adapter_name(name))
        state.active = None

    def _evict(self, model: Any, state: ModelLoras, keep: set[str]) -> None:
        for name in list(state.adapters):
            if state.size <= self.budget:
                break
            if name not in keep:
                log.info("model %r: LoRA %s unloaded (over engine.lora_cache_mb)", model.name, name)
                self._delete(model, state, name)

    # ------------------------------------------------------------------ draft
    def _draft_view(self, model: Any, state: ModelLoras, settings: Any) -> Any:
        """The model as a draft job sees it: no refiner, and the draft UNet when there is one."""
        if settings is None or not settings.draft_unet:
            return dataclasses.replace(model, refiner=None)
        with self._lock:
            if state.draft_unet is None:
                state.draft_unet = self._load_draft_unet(model, settings)
            unet = state.draft_unet
            device = next(model.base.unet.parameters()).device
            if next(unet.parameters()).device != device:
                unet.to(device)  # the model came back from RAM since
            if state.draft_pipes is None:
                state.draft_pipes = (_with_unet(model.base, unet), _with_unet(model.img2img, unet))
            base, img2img = state.draft_pipes
        return dataclasses.replace(model, base=base, img2img=img2img, refiner=None)

    def _load_draft_unet(self, model: Any, settings: Any) -> Any:
        """The few-step UNet, one .safetensors file with the base's UNet config, in the model's dtype."""
        from diffusers import UNet2DConditionModel

        started = time.perf_counter()
        try:
            path = safetensors_file(settings.draft_unet, role="draft_unet")
            base = ModelSource.parse(settings.base, settings.base_config, role="base", revision=settings.base_revision)
            config = base.config if base.kind == "single_file" else base.location
            with quiet_loading():
                unet = UNet2DConditionModel.from_single_file(
                    str(path),
                    config=config,
                    subfolder="unet",
                    local_files_only=Path(config).is_dir() or hub_offline(),
                    **_dtype_kwarg(model.dtype),
                )
        except Exception as exc:
            raise self._error(DRAFT_ADAPTER, model, f"{settings.draft_unet}: {_first_line(exc)}") from exc
        unet.eval().requires_grad_(False)
        unet.to(model.device)
        self.loads += 1
        log.info("model %r: draft UNet loaded in %.1f s", model.name, time.perf_counter() - started)
        return unet

    # ------------------------------------------------------------------ models check
    @torch.inference_mode()
    def check(self, model: Any, name: str) -> str:
        """Load one LoRA (or the draft adapter: DRAFT_ADAPTER) into `model`; what it adapts, or
        LoraError saying why it does not fit. For `atelier models check`."""
        settings = self.catalog.models.get(model.name)
        if name == DRAFT_ADAPTER:
            if settings is None or not settings.has_draft:
                raise ValueError(f"model {model.name!r} has no draft adapter")
            if settings.draft_unet:
                with self._lock:
                    state = self.state(model)
                    if state.draft_unet is None:
                        state.draft_unet = self._load_draft_unet(model, settings)
                    unet = state.draft_unet
                return f"draft UNet, {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters"
            file = settings.draft_lora
        else:
            file = self.catalog.loras[name].file
        with self._lock:
            state = self.state(model)
            return self._ensure(model, state, name, file).describe()


__all__ = ["DRAFT_ADAPTER", "Adapter", "LoraError", "LoraManager", "adapted_layers", "adapter_name", "quiet_loading"]
