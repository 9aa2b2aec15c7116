"""The operator's LoRAs, embeddings and draft adapters on the engine's models: what the Runner
puts on a model before each job, what start-up checks, and what `atelier models check` reports.

- Start-up (`Styling(...)`, built with the Runner): every configured file exists and is a
  safetensors file of its kind (a LoRA has LoRA layers, an embedding `clip_l` and `clip_g`),
  reading headers only, so a typo fails the start with the key to fix, not a member's job.
- Each job (`prepare`): the embeddings its prompts use, then its LoRAs (engine.loras).
- `atelier models check` (`checks_for`): every LoRA, draft adapter and embedding loaded into
  every model it is configured for; one that does not fit (keys, shapes, widths) is reported
  there with why.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from engine.embeddings import EmbeddingManager, read_embedding
from engine.loras import DRAFT_ADAPTER, LoraManager, expected_layers
from engine.model_check import ModelCheck
from engine.styles import Catalog, embedding_refs
from engine.weights import ModelLoadError, safetensors_file

log = logging.getLogger(__name__)


class Styling:
    """LoRAs (with the draft adapters) and embeddings for the models of one Runner."""

    def __init__(self, catalog: Catalog, lora_cache_mb: int) -> None:
        self.catalog = catalog
        self.loras = LoraManager(catalog, lora_cache_mb)
        self.embeddings = EmbeddingManager(catalog)

    def check_files(self) -> None:
        """Every configured file is there and of its kind (headers only); ModelLoadError naming
        each problem otherwise."""
        problems = []
        files = [(f"loras.{name}.file", lora.file, "lora") for name, lora in self.catalog.loras.items()]
        for model, settings in self.catalog.models.items():
            if settings.draft_lora:
                files.append((f"models.{model}.draft_lora", settings.draft_lora, "lora"))
            if settings.draft_unet:
                files.append((f"models.{model}.draft_unet", settings.draft_unet, "unet"))
        for key, file, kind in files:
            try:
                path = safetensors_file(file, role=key)
                if kind == "lora" and not expected_layers(path):
                    problems.append(f"{key} = {file!r} holds no LoRA layers")
            except (ModelLoadError, OSError) as exc:
                problems.append(str(exc))
        for name, embedding in self.catalog.embeddings.items():
            try:
                read_embedding(embedding.file, name)
            except (ModelLoadError, OSError) as exc:
                problems.append(f"embeddings.{name}: {exc}")
        if problems:
            raise ModelLoadError("; ".join(problems))

    def prepare(self, model: Any, jobs: Sequence[Any]) -> Any:
        """`model` ready for `jobs` (one job, or a batch sharing LoRAs and draft mode): the
        embeddings their prompts use loaded, their LoRAs active; the model the jobs run on."""
        self.embeddings.ensure(model, [name for job in jobs for name in embedding_refs(job.prompt, job.negative)])
        return self.loras.activate(model, jobs[0].loras, draft=jobs[0].draft)

    # ------------------------------------------------------------------ models check
    def checks_for(self, model: Any) -> list[ModelCheck]:
        """One check per LoRA, draft adapter and embedding configured for `model` (a loaded
        model), each loaded into it."""
        name = model.name
        items: list[tuple[str, Callable[[], str]]] = [
            (f"loras.{lora}", functools.partial(self.loras.check, model, lora)) for lora in self.catalog.loras_for(name)
        ]
        settings = self.catalog.models.get(name)
        if settings is not None and settings.has_draft:
            key = "draft_lora" if settings.draft_lora else "draft_unet"
            items.append((f"models.{name}.{key}", functools.partial(self.loras.check, model, DRAFT_ADAPTER)))
        items += [
            (f"embeddings.{embedding}", functools.partial(self.embeddings.check, model, embedding))
            for embedding in self.catalog.embeddings
        ]
        results = []
        for what, check in items:
            started = time.perf_counter()
            try:
                detail = f"fits {name!r}: {check()}"
                results.append(ModelCheck(what, True, time.perf_counter() - started, detail))
            except Exception as exc:
                detail = getattr(exc, "detail", "") or f"{type(exc).__name__}: {exc}"
                results.append(
                    ModelCheck(what, False, time.perf_counter() - started, f"does not fit {name!r}: {detail}")
                )
        return results


__all__ = ["Styling"]
