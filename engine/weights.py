"""Where weights come from: the one allowlist every model-like file passes before it is read.

Models, refiners, the upscaler, and the ControlNets, LoRAs and embeddings all name their weights
the same ways: a hub id (`org/name`, optionally pinned to a `revision`), a local diffusers folder,
or one `.safetensors` file. Only safetensors are ever read: a pickle checkpoint (`.ckpt .pt .pth
.bin`, or a folder whose weights are only `.bin`) can run arbitrary code when it is loaded, and any
other suffix is refused too, so a renamed pickle cannot slip through a list of bad suffixes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from config.section import PICKLE_SUFFIXES

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SourceKind = Literal["hub", "folder", "single_file"]
# A pipeline folder has model_index.json and a subfolder per component; a model folder (one
# ControlNet, one estimator) has its config.json and weights at its top.
FolderLayout = Literal["pipeline", "model"]
ALL_KINDS: tuple[SourceKind, ...] = ("hub", "folder", "single_file")
FILE_ONLY: tuple[SourceKind, ...] = ("single_file",)


class ModelLoadError(Exception):
    """Weights cannot be used; the message says what to change, in operator terms."""


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _pickle_refusal(what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{what} is a pickle checkpoint, which can run arbitrary code when loaded; "
        "convert it to .safetensors (or use the diffusers folder with .safetensors weights)"
    )


def _what_is_allowed(kinds: Collection[SourceKind]) -> str:
    names = {"single_file": "a .safetensors file", "folder": "a diffusers folder", "hub": "a hub id"}
    return ", ".join(names[kind] for kind in ALL_KINDS if kind in kinds)


@dataclass(frozen=True)
class ModelSource:
    """Where one set of weights comes from (a model's base or refiner, a ControlNet, a LoRA…)."""

    kind: SourceKind
    location: str
    # For a single file: the diffusers-format config folder (or hub id) passed as `config=`.
    config: str = ""
    # A weights variant found in a local folder ("fp16" when only *.fp16.safetensors exist).
    variant: str | None = None
    # For a hub id: the commit, tag or branch to load (pinning it keeps an upstream change out).
    revision: str | None = None

    @classmethod
    def parse(
        cls,
        source: str,
        config: str = "",
        *,
        role: str = "base",
        revision: str = "",
        kinds: Collection[SourceKind] = ALL_KINDS,
        layout: FolderLayout = "pipeline",
    ) -> ModelSource:
        """Classify `source` (the value of the config key `role`); raise ModelLoadError when it is
        not one of the allowed `kinds` or not made of safetensors."""
        source = source.strip()
        key = role  # the config key named in messages
        if not source:
            raise ModelLoadError(f"{key} is empty: set it to {_what_is_allowed(kinds)}")
        if source.lower().endswith(PICKLE_SUFFIXES):
            raise _pickle_refusal(f"{key} = {source!r}")
        path = Path(source).expanduser()
        config = config.strip()
        if path.is_dir() and "folder" in kinds:
            if config:
                log.warning("%s_config is ignored for the diffusers folder %s", role, source)
            return cls("folder", str(path), variant=_check_folder(path, key, layout))
        if path.is_file() or path.is_dir():
            if path.suffix.lower() != ".safetensors" or "single_file" not in kinds or path.is_dir():
                raise ModelLoadError(f"{key} = {source!r}: use {_what_is_allowed(kinds)}; nothing else is read")
            return cls("single_file", str(path), config=_check_config(config, role))
        if source.lower().endswith(".safetensors"):
            raise ModelLoadError(f"{key} = {source!r}: no such file")
        looks_local = source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") != 1
        if looks_local or not HUB_ID.match(source) or "hub" not in kinds:
            raise ModelLoadError(f"{key} = {source!r}: no such file or folder (use {_what_is_allowed(kinds)})")
        return cls("hub", source, revision=revision.strip() or None)

    @property
    def label(self) -> str:
        return {"hub": "hub", "folder": "folder", "single_file": "single file"}[self.kind]

    def describe(self) -> str:
        pinned = f"@{self.revision}" if self.revision else ""
        return f"{self.label} {self.location}{pinned}"


def _check_config(config: str, role: str) -> str:
    if not config:
        return ""
    path = Path(config).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{role}_config = {config!r} has no model_index.json: it must be a diffusers-format folder "
                "(model_index.json, each component's config.json, the scheduler config and the tokenizers)"
            )
        return str(path)
    if HUB_ID.match(config) and not config.startswith((".", "/", "~")):
        return config
    raise ModelLoadError(f"{role}_config = {config!r}: no such folder")


def _weights_variant(folder: Path, key: str, what: str) -> set[str | None]:
    """The weight variants among a folder's safetensors files (None: the plain ones); refuses a
    folder whose weights are only pickles."""
    names = [f.name for f in folder.iterdir() if f.is_file()]
    safetensors = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles and not safetensors:
        raise _pickle_refusal(f"{key} = {what} ({folder.name}/{pickles[0]})")
    # model.safetensors or model-00001-of-00002.safetensors, versus model.fp16.safetensors
    plain = [n for n in safetensors if n.count(".") == 1]
    if plain:
        return {None}
    # name.fp16.safetensors, or sharded name.fp16-00001-of-00002.safetensors
    return {n.split(".")[-2].split("-")[0] for n in safetensors}


def _check_folder(path: Path, key: str, layout: FolderLayout) -> str | None:
    """A diffusers folder must have its index (model_index.json, or config.json for one model) and
    safetensors weights for every weighted part. Returns the weights variant to load ("fp16" when
    the folder holds only the fp16 variant files)."""
    index = "model_index.json" if layout == "pipeline" else "config.json"
    if not (path / index).is_file():
        kind = "a diffusers pipeline folder" if layout == "pipeline" else "a diffusers model folder"
        raise ModelLoadError(f"{key} = {str(path)!r} has no {index}: it is not {kind}")
    parts = sorted(p for p in path.iterdir() if p.is_dir()) if layout == "pipeline" else [path]
    variants: set[str | None] = set()
    for part in parts:
        variants |= _weights_variant(part, key, repr(str(path)))
    if layout == "model" and not variants:
        raise ModelLoadError(f"{key} = {str(path)!r} holds no .safetensors weights")
    if None in variants or not variants:
        return None
    return sorted(v for v in variants if v)[0]


def safetensors_file(source: str, *, role: str) -> Path:
    """A single `.safetensors` file (an upscaler, a LoRA, an embedding), or ModelLoadError."""
    return Path(ModelSource.parse(source, role=role, kinds=FILE_ONLY).location)


__all__ = ["HUB_ID", "ModelLoadError", "ModelSource", "SourceKind", "hub_offline", "safetensors_file"]
