"""The operator's models and what members add to them: `[models.<name>]` (base, refiner, inpaint,
draft adapter), `[controlnets.<mode>]`, `[loras.<name>]`, `[embeddings.<name>]` and
`[styles.<name>]` tables (config.settings holds them by name)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from config.section import PICKLE_SUFFIXES, Section
from engine.options import CFG, DRAFT_SAMPLERS, LORA_WEIGHT, MAX_LORAS, SAMPLERS, STEPS

# LoRA, embedding and style names: members type them (`lora: name:0.5`, `<name>` in a prompt), and a
# LoRA's name is its adapter's name inside the model, where dots are not allowed.
ADDON_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")
ADDON_NAME_RULE = "1–48 letters, digits, '-' or '_', starting with a letter or digit"


def parse_lora_ref(text: str) -> tuple[str, float | None]:
    """One LoRA as members and styles write it: `name` (its default weight) or `name:weight`.
    Raises ValueError saying what is wrong; the weight's range is checked by the caller."""
    name, colon, weight = text.strip().partition(":")
    name = name.strip()
    if not ADDON_NAME.match(name):
        raise ValueError(f"{text.strip()!r} is not a LoRA name ({ADDON_NAME_RULE}), optionally followed by :weight")
    if not colon:
        return name, None
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"{text.strip()!r}: the weight after ':' must be a number such as 0.8") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{text.strip()!r}: the weight must be a finite number")
    return name, value


def _safetensors_file(path: str) -> str:
    """LoRAs, embeddings and draft adapters are single files, read only as safetensors."""
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(
            f"{path!r} is a pickle checkpoint, which can run arbitrary code when loaded; convert it to .safetensors"
        )
    if path and not path.lower().endswith(".safetensors"):
        raise ValueError(f"{path!r}: must be a .safetensors file (nothing else is read)")
    return path


class ModelSettings(Section):
    base: str
    refiner: str = ""
    # A dedicated SDXL inpainting checkpoint for Vary Region, Zoom Out and Pan (its UNet; the
    # base's text encoders and VAE are shared). Empty: inpainting runs on the base's own weights.
    inpaint: str = ""
    base_config: str = ""
    refiner_config: str = ""
    inpaint_config: str = ""
    # For hub ids: the commit (or tag) to load, so an upstream change never arrives unreviewed.
    base_revision: str = ""
    refiner_revision: str = ""
    inpaint_revision: str = ""
    default: bool = False
    description: str = ""
    # Draft mode: a few-step adapter (SDXL-Lightning, LCM-LoRA, Hyper-SD...) as a LoRA file, or a
    # whole few-step UNet (.safetensors, the base's UNet config); the scheduler it was trained
    # for, its steps and its guidance.
    draft_lora: str = ""
    draft_unet: str = ""
    draft_steps: int = Field(4, ge=STEPS.low, le=STEPS.high)
    draft_sampler: str = DRAFT_SAMPLERS[0]
    draft_cfg: float = Field(1.0, ge=CFG.low, le=CFG.high)

    @field_validator("draft_lora", "draft_unet")
    @classmethod
    def _draft_safetensors(cls, path: str) -> str:
        return _safetensors_file(path.strip())

    @field_validator("draft_sampler")
    @classmethod
    def _draft_sampler(cls, sampler: str) -> str:
        if sampler not in DRAFT_SAMPLERS:
            raise ValueError(f"must be one of {', '.join(DRAFT_SAMPLERS)} (the scheduler the adapter was made for)")
        return sampler

    @model_validator(mode="after")
    def _one_draft(self) -> ModelSettings:
        if self.draft_lora and self.draft_unet:
            raise ValueError("set draft_lora or draft_unet, not both")
        return self

    @property
    def has_draft(self) -> bool:
        return bool(self.draft_lora or self.draft_unet)

    @field_validator("base", "refiner", "inpaint")
    @classmethod
    def _no_pickle(cls, source: str) -> str:
        if source.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(
                f"{source!r} is a pickle checkpoint, which can run arbitrary code when loaded; "
                "convert it to .safetensors"
            )
        return source


class ControlNetSettings(Section):
    """One `[controlnets.<mode>]` table (mode: edges, depth or pose)."""

    # A hub id, a local diffusers ControlNet folder, or one .safetensors file (its config.json
    # beside it); safetensors only.
    model: str
    # For a ControlNet-Union model: the control type index this mode gets (e.g. 3 for edges with
    # xinsir's controlnet-union-sdxl-1.0). Unset: a plain ControlNet.
    union_mode: int | None = Field(None, ge=0)
    # depth and pose: the estimator run on a member's upload (a hub id or a local transformers
    # folder); edges need none (Canny).
    annotator: str = ""

    @field_validator("model", "annotator")
    @classmethod
    def _no_pickle(cls, source: str) -> str:
        if source.lower().endswith(PICKLE_SUFFIXES):
            raise ValueError(f"{source!r} is a pickle checkpoint, which can run arbitrary code when loaded")
        return source


class LoraSettings(Section):
    file: str
    weight: float = Field(LORA_WEIGHT.default, ge=LORA_WEIGHT.low, le=LORA_WEIGHT.high)
    trigger: str = ""  # added to the prompt when the LoRA is used (unless already there)
    models: list[str] = Field(default_factory=list)  # the models it fits; empty: all of them
    description: str = ""

    @field_validator("file")
    @classmethod
    def _safetensors(cls, path: str) -> str:
        if not path.strip():
            raise ValueError("file is empty: set it to the LoRA's .safetensors file")
        return _safetensors_file(path.strip())


class EmbeddingSettings(Section):
    file: str  # an SDXL textual-inversion embedding: `clip_l` and `clip_g` tensors
    description: str = ""

    @field_validator("file")
    @classmethod
    def _safetensors(cls, path: str) -> str:
        if not path.strip():
            raise ValueError("file is empty: set it to the embedding's .safetensors file")
        return _safetensors_file(path.strip())


class StyleSettings(Section):
    """A preset: the member's own options win over each of these."""

    prompt: str = "{prompt}"  # "{prompt}" is replaced by the member's text
    negative: str = ""  # added to the member's negative
    loras: list[str] = Field(default_factory=list)  # "name" or "name:weight"
    sampler: str = ""  # "": the member's, else the default
    steps: int | None = Field(None, ge=STEPS.low, le=STEPS.high)
    cfg: float | None = Field(None, ge=CFG.low, le=CFG.high)
    description: str = ""

    @field_validator("prompt")
    @classmethod
    def _has_placeholder(cls, template: str) -> str:
        if "{prompt}" not in template:
            raise ValueError("must contain {prompt}, where the member's text goes")
        return template

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, sampler: str) -> str:
        if sampler and sampler not in SAMPLERS:
            raise ValueError(f"must be one of {', '.join(SAMPLERS)} (or empty)")
        return sampler

    @field_validator("loras")
    @classmethod
    def _lora_refs(cls, refs: list[str]) -> list[str]:
        if len(refs) > MAX_LORAS:
            raise ValueError(f"at most {MAX_LORAS} LoRAs")
        for ref in refs:
            _name, weight = parse_lora_ref(ref)
            if weight is not None and weight not in LORA_WEIGHT:
                raise ValueError(f"{ref!r}: weights go from {LORA_WEIGHT.low:g} to {LORA_WEIGHT.high:g}")
        return refs


__all__ = [
    "ADDON_NAME",
    "ADDON_NAME_RULE",
    "ControlNetSettings",
    "EmbeddingSettings",
    "LoraSettings",
    "ModelSettings",
    "StyleSettings",
    "parse_lora_ref",
]
