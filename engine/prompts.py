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

Speed (the result is bit-identical to `compel.CompelForSDXL`, tests/engine/test_pipelines.py):

- compel's parser (pyparsing, built anew for every text) costs more than the text encoders
  themselves on small models: ~13 ms per text, 6 texts per text2img job. A text without any
  character the parser gives a meaning to (`plain_text`) is handed straight to compel's
  embeddings provider as the one weight-1.0 fragment the parser would have produced.
- Each text is encoded once per (tokenizer, text encoder) and kept in a small LRU
  (`PROMPT_CACHE_SIZE` texts per encoder): rerolls, jobs made from a result and a recurring negative skip
  the encoders, and the refiner, which shares the base's second encoder, reuses its results.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from cachetools import LRUCache
from compel import Compel, CompelForSDXL, ReturnedEmbeddingsType
from compel.embeddings_provider import BaseTextualInversionManager

# Texts remembered per text encoder. An SDXL entry is 77×1280 values per 77-token chunk for the
# second encoder (~200 KB in fp16), so 64 entries stay within a few tens of MB.
PROMPT_CACHE_SIZE = 64


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


# --- plain texts: what compel's parser would do, without running it -----------------------------

# Characters compel's grammar gives a meaning to: parentheses (weights, .blend/.and/.swap, loras),
# quotes, escapes, `=` (options), and `+`/`-` unless they sit inside a word ("sci-fi" is plain,
# "cat+" and "cat -" are not). Commas and periods are only syntax next to those.
_SYNTAX = re.compile(r'[()"\\=]|(?<!\w)[-+]|[-+](?!\w)')
_PARSER_WHITESPACE = re.compile(r"[ \t\n\r]+")  # what pyparsing skips between words


def plain_text(text: str) -> str | None:
    """The text compel's parser would produce for `text` when it parses to ONE fragment of weight
    1.0 (no syntax at all), else None (the parser must run).

    The parser puts a space after every comma that lacks one, splits on whitespace and joins the
    words with single spaces. Unicode whitespace other than space, tab, CR, LF is part of a word
    to pyparsing but not to `str.split`, so such texts take the parser too. Checked against
    compel's parser on random texts in tests/engine/test_pipelines.py."""
    if _SYNTAX.search(text) or any(c.isspace() and c not in " \t\n\r" for c in text):
        return None
    spaced = re.sub(r",(\S)", r", \1", text)  # PromptParser.parse_conjunction does exactly this
    return " ".join(word for word in _PARSER_WHITESPACE.split(spaced) if word)


# --- per-encoder cache -------------------------------------------------------------------------


def _tokenizer_key(tokenizer: Any) -> Any:
    """What makes two tokenizer objects tokenize alike: the refiner loads its own copy of the
    base's second tokenizer; equal keys let it share the cache of the (shared) encoder. Computed
    once per tokenizer object. A tokenizer without a serialisable backend is only equal to itself."""
    key = _tokenizer_keys.get(tokenizer)
    if key is None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        try:
            digest = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else None
        except Exception:
            digest = None
        special = (tokenizer.model_max_length, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        key = (type(tokenizer).__name__, digest, *special) if digest is not None else ("object", next(_unique))
        _tokenizer_keys[tokenizer] = key
    return key


_tokenizer_keys: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_unique = itertools.count()  # not id(): ids are reused once an object is gone


class _EncoderCache:
    """Recent compel outputs of ONE text encoder, valid while it stays on one device and dtype
    (the registry moves parked models to the CPU). Keyed by what else decides the output: the
    tokenizer, whether the pooled output is wanted, the text."""

    def __init__(self) -> None:
        self.placement: tuple[torch.device, torch.dtype] | None = None
        self.entries: LRUCache[Any, tuple[torch.Tensor, torch.Tensor | None]] = LRUCache(maxsize=PROMPT_CACHE_SIZE)


_caches: weakref.WeakKeyDictionary[torch.nn.Module, _EncoderCache] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
# What else decides an encoder's output besides the text: the LoRAs active on it and the
# embeddings loaded into it (engine.loras and engine.embeddings say), part name → a hashable value.
_text_states: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()
# Multi-vector embeddings: per tokenizer, a token id → the ids of all its vectors.
_expansions: weakref.WeakKeyDictionary[Any, dict[int, list[int]]] = weakref.WeakKeyDictionary()


def set_text_state(text_encoder: torch.nn.Module, part: str, value: Any) -> None:
    """Say that `part` of what shapes `text_encoder`'s output (its active LoRAs, its embeddings)
    is now `value` (hashable); cached encodings made under another value are not reused."""
    with _lock:
        _text_states.setdefault(text_encoder, {})[part] = value


def set_token_expansions(tokenizer: Any, expansions: dict[int, list[int]]) -> None:
    """Tokens added to `tokenizer` whose embedding has several vectors: each id stands for the
    ids of all its vectors (what diffusers' `maybe_convert_prompt` does on text, done on ids)."""
    with _lock:
        _expansions.setdefault(tokenizer, {}).update(expansions)
        _tokenizer_keys.pop(tokenizer, None)  # its vocabulary grew


def _state_key(text_encoder: torch.nn.Module) -> tuple[Any, ...]:
    return tuple(sorted(_text_states.get(text_encoder, {}).items()))


class _TokenExpander(BaseTextualInversionManager):
    """compel's hook for multi-vector textual inversions, for one tokenizer."""

    def __init__(self, expansions: dict[int, list[int]]) -> None:
        self.expansions = expansions

    def expand_textual_inversion_token_ids_if_necessary(self, token_ids: list[int]) -> list[int]:
        return [expanded for token in token_ids for expanded in self.expansions.get(token, [token])]


def clear_prompt_cache() -> None:
    """Forget every cached embedding (needed only if text-encoder weights change in place: the
    engine never does that, it loads models whole)."""
    with _lock:
        _caches.clear()


def _encode_text(compel: Compel, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`compel.build_conditioning_tensor(text)` as (embeds, pooled or None), from the cache when
    this encoder met the text recently. The tensors returned are shared: never modify them."""
    provider = compel.conditioning_provider
    encoder = provider.text_encoder
    parameter = next(encoder.parameters())
    placement = (parameter.device, parameter.dtype)
    key = (_tokenizer_key(provider.tokenizer), bool(compel.requires_pooled), _state_key(encoder), text)
    with _lock:
        cache = _caches.get(encoder)
        if cache is None or cache.placement != placement:
            cache = _caches[encoder] = _EncoderCache()
            cache.placement = placement
        hit = cache.entries.get(key)
        if hit is not None:
            return hit

    plain = plain_text(text)
    if plain is None:
        out = compel.build_conditioning_tensor(text)
        embeds, pooled = out if compel.requires_pooled else (out, None)
    else:
        # What build_conditioning_tensor does for a one-fragment conjunction of weight 1 (it also
        # copies the tensor once more, torch.concat of one tensor: same values).
        embeds = provider.get_embeddings_for_weighted_prompt_fragments(
            text_batch=[[plain]], fragment_weights_batch=[[1.0]], device=compel.device
        )
        # compel pools the raw text (not the parsed one), from a forward pass of its own.
        pooled = provider.get_pooled_embeddings([text], device=compel.device) if compel.requires_pooled else None

    with _lock:
        cache.entries[key] = (embeds, pooled)
    return embeds, pooled


def _encode_texts(compel: Compel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`compel(texts)`: each text encoded alone, padded to one length, stacked."""
    outputs = [_encode_text(compel, text) for text in texts]
    embeds = torch.cat(compel.pad_conditioning_tensors_to_same_length([e for e, _ in outputs]))
    pooled = torch.cat([p for _, p in outputs if p is not None]) if compel.requires_pooled else None
    return embeds, pooled


def _compel(tokenizer: Any, text_encoder: Any, *, pooled: bool) -> Compel:
    """The Compel that CompelForSDXL builds for one of SDXL's encoders (cheap: no weights)."""
    return Compel(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=pooled,
        truncate_long_prompts=False,
        textual_inversion_manager=_TokenExpander(_expansions[tokenizer]) if tokenizer in _expansions else None,
    )


# --- the entry point -----------------------------------------------------------------------------


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
    texts = [prompt, negative] if with_negative else [prompt]
    right, pooled = _encode_texts(_compel(pipe.tokenizer_2, pipe.text_encoder_2, pooled=True), texts)
    assert pooled is not None

    if getattr(pipe, "text_encoder", None) is not None:
        left, _ = _encode_texts(_compel(pipe.tokenizer, pipe.text_encoder, pooled=False), texts)
        if left.shape[1] != right.shape[1]:
            # The two tokenizers chunked a long text differently (never with SDXL's own pair):
            # CompelForSDXL pads the shorter side with ITS empty-prompt embeddings; let it.
            result = CompelForSDXL(pipe)(prompt, negative_prompt=negative if with_negative else None)
            return Conditioning(
                result.embeds, result.pooled_embeds, result.negative_embeds, result.negative_pooled_embeds
            )
        embeds = torch.cat([left, right], dim=-1)  # CompelForSDXL: both encoders side by side
    else:
        embeds = right

    if not with_negative:
        return Conditioning(embeds, pooled)
    return Conditioning(embeds[:1], pooled[:1], embeds[1:], pooled[1:])


__all__ = [
    "PROMPT_CACHE_SIZE",
    "Conditioning",
    "clear_prompt_cache",
    "encode_prompt",
    "plain_text",
    "set_text_state",
    "set_token_expansions",
]
