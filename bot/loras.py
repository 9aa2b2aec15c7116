"""The `lora`, `style` and `draft` options, the same way for every command that has them.

- `lora_choices` (the `lora` option's autocomplete, bot.commands.common): while a member types,
  the LoRAs that fit the model they chose (or their default), each with its default weight and
  trigger words; what they typed before the last comma is kept, so `watercolor:0.5, pi`
  completes to `watercolor:0.5, pixel`.
- `styled`: a request's prompt, negative and LoRAs as the job will run them (the style's template
  and negative, the style's LoRAs merged with the member's, the LoRAs' trigger words), refused
  with the list of what exists for an unknown LoRA, style or `<embedding>`, a fourth LoRA or a
  bad weight. Every refusal is a ValidationFailed: ephemeral, nothing charged.
- `draft_settings`: the sampler, steps and cfg of a draft on a model (refused without one).
- `check_styling`: the check every job passes at intake, whatever started it (a command, a
  button, a Reroll), so a LoRA or embedding the operator removed since is refused, not failed.

The rules themselves (what fits, the limits, the messages) are engine.styles'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from discord import app_commands

from config.addons import ModelSettings
from config.settings import Settings
from engine import styles
from engine.jobs import JobBase
from engine.options import LORA_WEIGHT, MAX_LORAS
from engine.styles import Catalog, LoraRef
from engine.validate import ValidationFailed

CHOICE_TEXT = 100  # Discord: a choice's name and value are at most 100 characters
# The `lora` option's description, the same on every command.
LORA_HELP = (
    f"LoRAs: name or name:weight, up to {MAX_LORAS}, comma-separated (weights {LORA_WEIGHT.low:g}–{LORA_WEIGHT.high:g})"
)

_catalogs: dict[int, tuple[Settings, Catalog]] = {}


def catalog_of(settings: Settings) -> Catalog:
    """The operator's catalog, built once per settings object."""
    held = _catalogs.get(id(settings))
    if held is None or held[0] is not settings:
        held = _catalogs[id(settings)] = (settings, Catalog.from_settings(settings))
    return held[1]


# ------------------------------------------------------------------------------ autocomplete


def _label(name: str, catalog: Catalog) -> str:
    lora = catalog.loras[name]
    parts = [name, f"weight {lora.weight:g}"]
    if lora.trigger:
        parts.append(f"adds “{lora.trigger}”")
    elif lora.description:
        parts.append(lora.description)
    return " · ".join(parts)


def lora_choices(current: str, catalog: Catalog, model: str) -> list[app_commands.Choice[str]]:
    """Completions of the `lora` text typed so far for `model` (none for a text longer than a
    choice may be: Discord refuses such choices)."""
    if len(current) > CHOICE_TEXT:
        return []
    *done, last = current.split(",")
    kept = [part.strip() for part in done if part.strip()]
    used = {part.split(":")[0].strip() for part in kept}
    prefix = ", ".join(kept) + (", " if kept else "")
    needle = last.strip().split(":")[0].casefold()
    if len(kept) >= MAX_LORAS:
        return [app_commands.Choice(name=f"{prefix.rstrip(', ')} (at most {MAX_LORAS})"[:CHOICE_TEXT], value=current)]
    choices = []
    if ":" in last and last.split(":")[0].strip() in catalog.loras:
        # The member is typing a weight: offer what they typed as it is.
        typed = prefix + last.strip()
        choices.append(app_commands.Choice(name=typed, value=typed))
    for name in catalog.loras_for(model):
        if name in used or needle not in name.casefold():
            continue
        value = prefix + name
        if len(value) > CHOICE_TEXT:
            continue
        shown = prefix + _label(name, catalog)
        choices.append(app_commands.Choice(name=shown[:CHOICE_TEXT], value=value))
    return choices


# ------------------------------------------------------------------------------ requests


@dataclass(frozen=True)
class Styled:
    """A request's texts and LoRAs as its job runs them, and what its style suggests."""

    prompt: str  # the style's template around the member's text, the LoRAs' trigger words added
    negative: str
    loras: tuple[LoraRef, ...]
    style: str
    typed: str | None  # the member's own prompt, when the job's differs from it
    sampler: str | None = None  # the style's (the member's own option wins over it)
    steps: int | None = None
    cfg: float | None = None


def styled(
    settings: Settings,
    *,
    model: str,
    prompt: str,
    negative: str,
    lora: str | None,
    style: str | None = None,
) -> Styled:
    """Apply a style and the `lora` option to a request's (already checked) prompt and negative."""
    catalog = catalog_of(settings)
    preset = styles.check_style(style, catalog)
    loras = styles.check_loras(styles.merge_loras(styles.style_loras(preset), styles.parse_loras(lora)), catalog, model)
    text, negative_text = styles.style_texts(preset, prompt, negative) if preset is not None else (prompt, negative)
    text = styles.with_triggers(text, loras, catalog)
    limit = settings.generation.max_prompt_chars
    for name, value in (("prompt", text), ("negative", negative_text)):
        if len(value) > limit:
            raise ValidationFailed(
                name,
                f"With the style's text and the LoRAs' trigger words your {name} has {len(value)} characters; "
                f"the limit is {limit}: shorten it.",
            )
    styles.check_embeddings(catalog, text, negative_text)
    return Styled(
        prompt=text,
        negative=negative_text,
        loras=loras,
        style=style or "",
        typed=prompt if text != prompt else None,
        sampler=(preset.sampler or None) if preset is not None else None,
        steps=preset.steps if preset is not None else None,
        cfg=preset.cfg if preset is not None else None,
    )


def with_loras(settings: Settings, fields: dict[str, Any], lora: str | None) -> tuple[dict[str, Any], str | None]:
    """A job's fields (with its `model` and `prompt`) with the `lora` option applied: the checked
    LoRAs and the trigger words; and the member's own prompt when the job's differs from it."""
    asked = styled(
        settings, model=fields["model"], prompt=fields["prompt"], negative=fields.get("negative", ""), lora=lora
    )
    return {**fields, "prompt": asked.prompt, "negative": asked.negative, "loras": asked.loras}, asked.typed


def draft_settings(settings: Settings, model: str, *, sampler: str | None, refiner: bool | None) -> ModelSettings:
    """The model's draft settings; refused without a draft adapter, or with options a draft
    cannot honour (its adapter needs its own sampler, and finishes the image without the refiner)."""
    draft = styles.check_draft(catalog_of(settings), model)
    if sampler is not None:
        raise ValidationFailed("sampler", "A draft uses the sampler its adapter needs: leave `sampler` out.")
    if refiner:
        raise ValidationFailed("refiner", "A draft runs without the refiner: leave `refiner` out or set it to False.")
    return draft


def check_styling(settings: Settings, job: JobBase) -> None:
    """The styling of any job about to be queued (a command's, a button's, a Reroll's)."""
    styles.check_job(
        catalog_of(settings),
        model=job.model,
        loras=job.loras,
        texts=(job.prompt, job.negative),
        draft=job.draft,
        sampler=job.sampler,
    )


__all__ = [
    "LORA_HELP",
    "Styled",
    "catalog_of",
    "check_styling",
    "draft_settings",
    "lora_choices",
    "styled",
    "with_loras",
]
