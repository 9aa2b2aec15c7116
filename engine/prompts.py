"""Prompt → SDXL conditioning with compel: weighting syntax and prompts longer than 77 tokens.

Syntax (compel's): `(word)1.5` or `word+` / `word++` to strengthen, `(word)0.5` or `word-` to
weaken, `("a cat", "a dog").blend(0.7, 0.3)`. A1111's `(word:1.5)` is NOT parsed (it is read as
plain text). Long prompts are encoded in 77-token chunks and concatenated, so nothing is cut off;
a prompt and its negative are padded to the same length.

SDXL conditioning is the penultimate hidden states of both text encoders side by side (not
normalised) plus the pooled output of the second one. The refiner has only the second encoder.

An empty negative prompt gets NO negative embeddings when the pipeline's config says
`force_zeros_for_empty_prompt` (the SDXL base): the pipeline then uses zeros, exactly as
diffusers does for a prompt without a negative. The refiner ships with that flag off, so there an
empty negative is encoded as "" like diffusers does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from compel import Compel, CompelForSDXL, ReturnedEmbeddingsType


@dataclass(frozen=True)
class Conditioning:
    """Embeddings for ONE prompt (batch 1); the pipeline repeats them per image."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def pipeline_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt_embeds": self.prompt_embeds,
            "pooled_prompt_embeds": self.pooled_prompt_embeds,
        }
        if self.negative_prompt_embeds is not None:
            kwargs["negative_prompt_embeds"] = self.negative_prompt_embeds
            kwargs["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kwargs


def _negative_needed(pipe: Any, negative: str, guidance: bool) -> bool:
    if not guidance:
        return False  # without classifier-free guidance the negative is never used
    return bool(negative.strip()) or not pipe.config.get("force_zeros_for_empty_prompt", False)


@torch.inference_mode()
def encode_prompt(pipe: Any, prompt: str, negative: str = "", *, guidance: bool = True) -> Conditioning:
    """Conditioning for an SDXL base (two text encoders) or refiner (second encoder only).

    `guidance` is whether classifier-free guidance will run (cfg > 1): without it the negative is
    not encoded at all."""
    with_negative = _negative_needed(pipe, negative, guidance)
    if getattr(pipe, "text_encoder", None) is not None:
        result = CompelForSDXL(pipe)(prompt, negative_prompt=negative if with_negative else None)
        return Conditioning(
            result.embeds,
            result.pooled_embeds,
            result.negative_embeds,
            result.negative_pooled_embeds,
        )

    compel = Compel(
        tokenizer=pipe.tokenizer_2,
        text_encoder=pipe.text_encoder_2,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=True,
        truncate_long_prompts=False,
    )
    texts = [prompt, negative] if with_negative else [prompt]
    embeds, pooled = compel(texts)  # padded to one length when both are there
    if not with_negative:
        return Conditioning(embeds, pooled)
    return Conditioning(embeds[:1], pooled[:1], embeds[1:], pooled[1:])


__all__ = ["Conditioning", "encode_prompt"]
