"""`atelier models check`: load each configured model in turn and say what loaded, on what, at
what size, or why not; what goes on a model (LoRAs, embeddings, ControlNets) adds its own rows."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from config.addons import ModelSettings
from config.settings import EngineSettings
from engine.models import LoadedModel, ModelLoadError, ModelRegistry, ModelSource


@dataclass(frozen=True)
class ModelCheck:
    name: str
    ok: bool
    seconds: float
    detail: str


def check_models(
    models: Mapping[str, ModelSettings | Mapping[str, Any]],
    engine: EngineSettings,
    *,
    also: Callable[[LoadedModel], list[ModelCheck]] | None = None,
) -> list[ModelCheck]:
    """Load each configured model in turn (one in memory at a time) and report ok/error + seconds;
    `also(model)` adds the checks of what goes on a loaded model (its LoRAs, embeddings...)."""
    results: list[ModelCheck] = []
    try:
        registry = ModelRegistry(models, engine.model_copy(update={"models_in_ram": 0}))
    except ModelLoadError as exc:
        return [ModelCheck(name="(config)", ok=False, seconds=0.0, detail=str(exc))]
    for name in registry.names:
        started = time.perf_counter()
        try:
            model = registry.get(name)
        except Exception as exc:
            detail = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            results.append(ModelCheck(name, False, time.perf_counter() - started, detail))
            continue
        seconds = time.perf_counter() - started
        settings = registry.settings(name)
        parts = [f"base ({ModelSource.parse(settings.base, settings.base_config).label})"]
        if model.refiner is not None:
            parts.append(f"refiner ({ModelSource.parse(settings.refiner, settings.refiner_config).label})")
        if model.inpaint is not None:
            parts.append(f"inpaint ({ModelSource.parse(settings.inpaint, settings.inpaint_config).label})")
        detail = (
            f"{' + '.join(parts)} on {model.device.type}/{str(model.dtype).removeprefix('torch.')}, "
            f"{model.parameter_bytes / 1e6:.0f} MB"
        )
        results.append(ModelCheck(name, True, seconds, detail))
        if also is not None:
            results.extend(also(model))
        del model
        registry.unload()
    return results


__all__ = ["ModelCheck", "check_models"]
