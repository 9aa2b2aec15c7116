"""Styling a job: LoRAs, textual-inversion embeddings, style presets and draft mode, as members ask
for them and as jobs carry them.

Pure (no torch): the bot checks a request with these functions before anything is charged, the
engine checks every job again with them (`JobBase.check`), and they say what a result's metadata
shows. The operator's tables (`[loras]`, `[embeddings]`, `[styles]`, a model's `draft_*`) reach
them as a `Catalog`.

How a member writes them:

- the `lora` option: `name` or `name:weight`, up to MAX_LORAS separated by commas (a style's LoRAs
  count too); a LoRA's trigger words are added to the prompt unless it already has them;
- an embedding: `<name>` anywhere in the prompt or the negative;
- a style: its prompt template (`{prompt}` is the member's text) and its negative (added to the
  member's), its LoRAs (the member's weight wins for a LoRA both name), its sampler, steps and cfg
  (each only where the member gave none).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from config.addons import EmbeddingSettings, LoraSettings, ModelSettings, StyleSettings, parse_lora_ref
from config.settings import Settings
from engine.options import DRAFT_SAMPLERS, LORA_WEIGHT, MAX_LORAS
from engine.validate import ValidationFailed

# A job's LoRAs: (name, weight) pairs, in the order they were asked for.
LoraRef = tuple[str, float]
# `<name>` in a prompt: an embedding (A1111's `<lora:name:w>` is recognised to say where LoRAs go).
EMBEDDING_REF = re.compile(r"<([^<>\s]{1,100})>")


@dataclass(frozen=True)
class Catalog:
    """What the operator configured: the LoRAs, embeddings and styles, and the models (for the
    models each LoRA fits and their draft adapters)."""

    loras: Mapping[str, LoraSettings] = field(default_factory=dict)
    embeddings: Mapping[str, EmbeddingSettings] = field(default_factory=dict)
    styles: Mapping[str, StyleSettings] = field(default_factory=dict)
    models: Mapping[str, ModelSettings] = field(default_factory=dict)
    default_model: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> Catalog:
        return cls(
            loras=dict(settings.loras),
            embeddings=dict(settings.embeddings),
            styles=dict(settings.styles),
            models=dict(settings.models),
            default_model=settings.default_model,
        )

    def model_name(self, model: str) -> str:
        """A job's model: "" is the default one."""
        return model or self.default_model

    def fits(self, lora: str, model: str) -> bool:
        settings = self.loras.get(lora)
        if settings is None:
            return False
        return not settings.models or self.model_name(model) in settings.models

    def loras_for(self, model: str) -> list[str]:
        """The LoRAs that fit `model`, in the operator's order."""
        return [name for name in self.loras if self.fits(name, model)]

    def draft_of(self, model: str) -> ModelSettings | None:
        """The model's settings when it has a draft adapter, else None."""
        settings = self.models.get(self.model_name(model))
        return settings if settings is not None and settings.has_draft else None


# ------------------------------------------------------------------------------------ LoRAs


def _listed(names: Iterable[str], *, before: str = "`", after: str = "`") -> str:
    shown = [f"{before}{name}{after}" for name in names]
    return ", ".join(shown) if shown else "none"


def parse_loras(text: str | None) -> list[tuple[str, float | None]]:
    """The `lora` option: `name` or `name:weight`, separated by commas (None or blank: none)."""
    if text is None or not text.strip():
        return []
    refs: list[tuple[str, float | None]] = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            name, weight = parse_lora_ref(part)
        except ValueError as exc:
            raise ValidationFailed("lora", f"{exc}. Write `name` or `name:weight`, separated by commas.") from None
        if any(name == seen for seen, _ in refs):
            raise ValidationFailed("lora", f"The LoRA `{name}` is listed twice: give each LoRA once.")
        refs.append((name, weight))
    return refs


def merge_loras(
    preset: Sequence[tuple[str, float | None]], own: Sequence[tuple[str, float | None]]
) -> list[tuple[str, float | None]]:
    """A style's LoRAs and the member's: the member's weight wins for a LoRA both name."""
    mine = dict(own)
    merged = [(name, mine.pop(name) if name in mine else weight) for name, weight in preset]
    return merged + list(mine.items())


def check_loras(refs: Iterable[tuple[str, float | None]], catalog: Catalog, model: str) -> tuple[LoraRef, ...]:
    """Known LoRAs that fit `model`, each once, at most MAX_LORAS, weights within LORA_WEIGHT;
    a missing weight becomes the LoRA's configured one. Refusals list what exists."""
    model_name = catalog.model_name(model)
    fitting = catalog.loras_for(model_name)
    checked: list[LoraRef] = []
    for name, weight in refs:
        if name not in catalog.loras:
            raise ValidationFailed(
                "lora", f"There is no LoRA `{name}`. LoRAs for `{model_name}`: {_listed(fitting)} (see /model list)."
            )
        if not catalog.fits(name, model_name):
            raise ValidationFailed(
                "lora",
                f"The LoRA `{name}` does not fit the model `{model_name}` (it is made for "
                f"{_listed(catalog.loras[name].models)}). LoRAs for `{model_name}`: {_listed(fitting)}.",
            )
        if any(name == seen for seen, _ in checked):
            raise ValidationFailed("lora", f"The LoRA `{name}` is listed twice: give each LoRA once.")
        value = catalog.loras[name].weight if weight is None else weight
        if isinstance(value, bool) or not isinstance(value, int | float) or value not in LORA_WEIGHT:
            raise ValidationFailed(
                "lora",
                f"The weight of `{name}` must be between {LORA_WEIGHT.low:g} and {LORA_WEIGHT.high:g} "
                f"(got {value}); for example `{name}:0.8`.",
            )
        checked.append((name, float(value)))
    if len(checked) > MAX_LORAS:
        raise ValidationFailed(
            "lora",
            f"At most {MAX_LORAS} LoRAs per image (a style's count too): you asked for "
            f"{_listed(name for name, _ in checked)}.",
        )
    return tuple(checked)


def with_triggers(prompt: str, loras: Iterable[LoraRef], catalog: Catalog) -> str:
    """The prompt with each LoRA's trigger words added at its end, unless it already has them
    (a LoRA at weight 0 is off: its words are not added)."""
    words = []
    for name, weight in loras:
        trigger = catalog.loras[name].trigger.strip() if name in catalog.loras else ""
        if trigger and weight > 0 and trigger.casefold() not in prompt.casefold() and trigger not in words:
            words.append(trigger)
    if not words:
        return prompt
    return ", ".join([prompt, *words]) if prompt else ", ".join(words)


# ------------------------------------------------------------------------------- embeddings


def embedding_refs(*texts: str) -> list[str]:
    """The `<name>`s in the texts, each once, in order."""
    found: list[str] = []
    for text in texts:
        for name in EMBEDDING_REF.findall(text or ""):
            if name not in found:
                found.append(name)
    return found


def check_embeddings(catalog: Catalog, *texts: str) -> list[str]:
    """The embeddings the texts use; an unknown `<name>` is refused with the list of known ones."""
    names = embedding_refs(*texts)
    for name in names:
        if name.lower().startswith("lora:"):
            raise ValidationFailed(
                "prompt",
                f"`<{name}>`: LoRAs go in the `lora` option (for example `lora: "
                f"{name.split(':')[1] or 'name'}:0.8`), not in the prompt.",
            )
        if name not in catalog.embeddings:
            known = _listed(catalog.embeddings, before="`<", after=">`")
            raise ValidationFailed(
                "prompt",
                f"There is no embedding `<{name}>`. Embeddings here: {known} (see /model list). "
                "Remove the angle brackets to use the words as text.",
            )
    return names


# ----------------------------------------------------------------------------------- styles


def style_texts(style: StyleSettings, prompt: str, negative: str) -> tuple[str, str]:
    """The prompt and negative a style makes of the member's."""
    styled = style.prompt.replace("{prompt}", prompt)
    negatives = [text for text in (negative.strip(), style.negative.strip()) if text]
    return styled, ", ".join(negatives)


def check_style(name: str | None, catalog: Catalog) -> StyleSettings | None:
    if not name:
        return None
    style = catalog.styles.get(name)
    if style is None:
        raise ValidationFailed("style", f"There is no style `{name}`. Styles: {_listed(catalog.styles)}.")
    return style


def style_loras(style: StyleSettings | None) -> list[tuple[str, float | None]]:
    return [parse_lora_ref(ref) for ref in style.loras] if style is not None else []


# ------------------------------------------------------------------------------------ draft


def check_draft(catalog: Catalog, model: str) -> ModelSettings:
    """The model's settings for a draft job; refused when the model has no draft adapter."""
    settings = catalog.draft_of(model)
    if settings is None:
        with_draft = [name for name in catalog.models if catalog.draft_of(name) is not None]
        raise ValidationFailed(
            "draft",
            f"The model `{catalog.model_name(model)}` has no draft mode. Models with one: {_listed(with_draft)}; "
            "or leave `draft` off.",
        )
    return settings


# --------------------------------------------------------------------------------- the job


def check_job(
    catalog: Catalog, *, model: str, loras: Any, texts: Sequence[str], draft: bool = False, sampler: str = ""
) -> None:
    """The engine's check of a job's styling (a job as the bot built it, checked again)."""
    if not isinstance(loras, tuple | list) or not all(
        isinstance(ref, tuple | list) and len(ref) == 2 and isinstance(ref[0], str) for ref in loras
    ):
        raise ValidationFailed("lora", "loras must be (name, weight) pairs.")
    check_loras([(name, weight) for name, weight in loras], catalog, model)
    check_embeddings(catalog, *texts)
    if draft:
        check_draft(catalog, model)
        if sampler not in DRAFT_SAMPLERS:
            raise ValidationFailed("sampler", f"A draft runs a draft sampler ({', '.join(DRAFT_SAMPLERS)}).")


# ----------------------------------------------------------------------- what results show


def lora_hash(path: str) -> str:
    """A1111's short hash of a LoRA ("AutoV3"): SHA-256 of the safetensors file after its header,
    first 12 hex digits, as in `Lora hashes`; the same file gives the same hash wherever it lives."""
    return _file_hash(path, *_stat(path), skip_header=True)


def embedding_hash(path: str) -> str:
    """A1111's short hash of an embedding (`TI hashes`): SHA-256 of the whole file, 12 hex digits."""
    return _file_hash(path, *_stat(path), skip_header=False)


def _stat(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=256)
def _file_hash(path: str, _size: int, _mtime: int, *, skip_header: bool) -> str:
    """Remembered per (path, size, mtime): a 200 MB LoRA takes a second to hash."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if skip_header:
            (length,) = struct.unpack("<Q", handle.read(8))
            handle.seek(8 + length)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _hashes(entries: Iterable[tuple[str, str]], hasher: Any) -> str:
    parts = []
    for name, path in entries:
        try:
            parts.append(f"{name}: {hasher(path)}")
        except OSError:
            continue  # the file went away since the job ran: the name alone still says it
    return ", ".join(parts)


def result_params(
    catalog: Catalog,
    *,
    model: str,
    prompt: str,
    negative: str,
    loras: Sequence[LoraRef],
    style: str = "",
    draft: bool = False,
) -> dict[str, Any]:
    """What a result's A1111 `parameters` say about its styling (engine.pnginfo writes them):
    the LoRAs (`<lora:name:w>` in the prompt, `Lora hashes`), the embeddings (`TI hashes`), the
    style and the draft adapter."""
    params: dict[str, Any] = {}
    if loras:
        params["loras"] = [(name, weight) for name, weight in loras]
        hashes = _hashes(((name, catalog.loras[name].file) for name, _ in loras if name in catalog.loras), lora_hash)
        if hashes:
            params["lora_hashes"] = hashes
    used = [name for name in embedding_refs(prompt, negative) if name in catalog.embeddings]
    if used:
        params["ti_hashes"] = _hashes(((name, catalog.embeddings[name].file) for name in used), embedding_hash)
    if style:
        params["style"] = style
    settings = catalog.draft_of(model) if draft else None
    if settings is not None:
        params["draft"] = os.path.basename(settings.draft_lora or settings.draft_unet).removesuffix(".safetensors")
    return params


__all__ = [
    "EMBEDDING_REF",
    "Catalog",
    "LoraRef",
    "check_draft",
    "check_embeddings",
    "check_job",
    "check_loras",
    "check_style",
    "embedding_hash",
    "embedding_refs",
    "lora_hash",
    "merge_loras",
    "parse_loras",
    "result_params",
    "style_loras",
    "style_texts",
    "with_triggers",
]
