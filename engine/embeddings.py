"""Textual-inversion embeddings in both SDXL text encoders, used by writing `<name>` in a prompt.

An SDXL embedding file holds two tensors: `clip_l` (for the first text encoder, CLIP ViT-L) and
`clip_g` (for the second, OpenCLIP ViT-bigG), one row per vector. Each is loaded with diffusers'
`load_textual_inversion` into its encoder and tokenizer under the token `<name>`, so the tokenizer
keeps `<name>` whole; an embedding of several vectors gets tokens `<name>`, `<name>_1`, ... and
engine.prompts expands `<name>` to all of them (compel's hook for it), so weighting such as
`(<name>)1.2` works as on any word. The refiner shares the base's second encoder, so its own copy of
the second tokenizer learns the same tokens (with the same ids) and a refined image sees the
embedding too.

Embeddings are loaded into a model the first time a job uses them and stay (they are a few KB).
Loading one changes nothing for prompts without its token; engine.prompts is told which are
loaded, so no cached prompt embedding made before outlives it.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from engine.api import EngineError
from engine.loras import quiet_loading
from engine.prompts import set_text_state, set_token_expansions
from engine.styles import Catalog
from engine.weights import ModelLoadError, safetensors_file

log = logging.getLogger(__name__)

# The two halves of an SDXL embedding, and the encoder/tokenizer pair each one belongs to.
PARTS = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))


class EmbeddingError(EngineError):
    """An embedding that cannot be used with a model (for the operator to fix; no retry)."""

    def __init__(self, name: str, model: str, detail: str) -> None:
        super().__init__(
            f"The embedding `<{name}>` cannot be used with the model `{model}` right now: tell a moderator.",
            retryable=False,
            detail=detail,
        )


def token(name: str) -> str:
    return f"<{name}>"


def read_embedding(file: str, name: str) -> dict[str, torch.Tensor]:
    """The `clip_l` and `clip_g` vectors of an SDXL embedding file (ModelLoadError when it is not one)."""
    from safetensors.torch import load_file

    path = safetensors_file(file, role=f"embeddings.{name}.file")
    state = load_file(str(path))
    missing = [key for key, _, _ in PARTS if key not in state]
    if missing:
        raise ModelLoadError(
            f"{file}: not an SDXL embedding (it has {', '.join(sorted(state)) or 'no tensors'}; "
            f"an SDXL one has clip_l and clip_g, missing {', '.join(missing)})"
        )
    vectors = {key: state[key] for key, _, _ in PARTS}
    if any(tensor.ndim != 2 for tensor in vectors.values()) or len({t.shape[0] for t in vectors.values()}) != 1:
        shapes = ", ".join(f"{key} {tuple(tensor.shape)}" for key, tensor in vectors.items())
        raise ModelLoadError(f"{file}: clip_l and clip_g must be (vectors, width) with as many vectors ({shapes})")
    return vectors


class EmbeddingManager:
    """Loads the embeddings jobs use into the models they run on (one job at a time)."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.loads = 0
        self._loaded: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def loaded(self, model: Any) -> set[str]:
        return set(self._loaded.get(model.base, ()))

    def ensure(self, model: Any, names: Iterable[str]) -> None:
        """Load into `model` each of `names` it does not have yet."""
        with self._lock:
            loaded = self._loaded.setdefault(model.base, set())
            new = [name for name in dict.fromkeys(names) if name not in loaded]
            for name in new:
                self._load(model, name)
                loaded.add(name)
            if new:
                for _, encoder, _ in PARTS:
                    set_text_state(getattr(model.base, encoder), "embeddings", tuple(sorted(loaded)))

    def check(self, model: Any, name: str) -> str:
        """For `atelier models check`: load one embedding into `model`; what it holds, or EmbeddingError."""
        self.ensure(model, [name])
        vectors = read_embedding(self.catalog.embeddings[name].file, name)
        return f"{vectors['clip_l'].shape[0]} vector(s) in both text encoders"

    def _load(self, model: Any, name: str) -> None:
        pipe = model.base
        try:
            vectors = read_embedding(self.catalog.embeddings[name].file, name)
        except (ModelLoadError, OSError) as exc:
            raise self._error(model, name, str(exc)) from exc
        for key, encoder_name, _ in PARTS:
            encoder = getattr(pipe, encoder_name)
            width = encoder.get_input_embeddings().weight.shape[1]
            if vectors[key].shape[1] != width:
                raise self._error(
                    model,
                    name,
                    f"its {key} vectors are {vectors[key].shape[1]} wide, the model's {encoder_name} takes "
                    f"{width} (an embedding for another model)",
                )
        for key, encoder_name, tokenizer_name in PARTS:
            tokenizer = getattr(pipe, tokenizer_name)
            try:
                with quiet_loading():
                    pipe.load_textual_inversion(
                        vectors[key],
                        token=token(name),
                        text_encoder=getattr(pipe, encoder_name),
                        tokenizer=tokenizer,
                    )
            except Exception as exc:
                raise self._error(model, name, f"{type(exc).__name__}: {exc}") from exc
            self._expand(tokenizer, name, vectors[key].shape[0])
        self._teach_refiner(model, name, vectors["clip_g"].shape[0])
        self.loads += 1
        log.info("model %r: embedding <%s> loaded (%d vector(s))", model.name, name, vectors["clip_l"].shape[0])

    @staticmethod
    def _tokens(name: str, count: int) -> list[str]:
        """diffusers' names for the tokens of a multi-vector embedding."""
        return [token(name)] + [f"{token(name)}_{i}" for i in range(1, count)]

    def _expand(self, tokenizer: Any, name: str, count: int) -> None:
        ids = tokenizer.convert_tokens_to_ids(self._tokens(name, count))
        set_token_expansions(tokenizer, {ids[0]: list(ids)} if count > 1 else {})

    def _teach_refiner(self, model: Any, name: str, count: int) -> None:
        """The refiner's second tokenizer gets the same tokens, which must get the same ids as in
        the base's (the encoder they index is the same one)."""
        refiner = getattr(model, "refiner", None)
        if refiner is None or refiner.tokenizer_2 is model.base.tokenizer_2:
            return
        tokens = self._tokens(name, count)
        ids = model.base.tokenizer_2.convert_tokens_to_ids(tokens)
        if len(refiner.tokenizer_2) != ids[0]:
            log.warning(
                "model %r: the refiner's tokenizer differs from the base's; it reads <%s> as words", model.name, name
            )
            return
        refiner.tokenizer_2.add_tokens(tokens)
        self._expand(refiner.tokenizer_2, name, count)

    def _error(self, model: Any, name: str, detail: str) -> EmbeddingError:
        log.error("model %r: embedding <%s> cannot be used: %s", model.name, name, detail)
        return EmbeddingError(name, model.name, detail)


__all__ = ["EmbeddingError", "EmbeddingManager", "read_embedding", "token"]
