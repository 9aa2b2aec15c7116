"""The full-size random SDXL (engine.fullsize): the shipped configs are the real architecture, the
tokenizers have the real vocabulary, and the builder's output loads through engine.models.

The real thing is 5.7 B parameters (11.5 GB in fp16): too heavy for a 2-core CI box. Sizes are
checked on the meta device (no memory), and the build → save → load → run path is exercised on
the same configs with the widths shrunk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from config.settings import EngineSettings, GenerationSettings
from engine.fullsize import (
    PUBLISHED_PARAMS,
    VOCAB_SIZE,
    build_fullsize_sdxl,
    fullsize_tokenizer_files,
    load_configs,
    parameter_counts,
)
from engine.jobs import Text2Img
from engine.models import ModelRegistry
from engine.pipelines import Runner
from engine.tiny import BOS, EOS, write_tokenizer


def test_shipped_configs_have_the_published_parameter_counts() -> None:
    counts = parameter_counts()
    assert counts == PUBLISHED_PARAMS
    # The figures people quote: a 2.6 B base UNet and a 2.3 B refiner UNet.
    assert round(counts["unet"] / 1e9, 2) == 2.57
    assert round(counts["refiner_unet"] / 1e9, 1) == 2.3


def test_shipped_configs_wire_base_and_refiner_like_sdxl() -> None:
    configs = load_configs()
    te1, te2 = configs["text_encoder"], configs["text_encoder_2"]
    base, refiner = configs["unet"], configs["refiner_unet"]
    assert base["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"] == 2048
    assert refiner["cross_attention_dim"] == te2["hidden_size"] == 1280
    # text_time conditioning: 6 time ids (base), 5 with the aesthetic score (refiner), + pooled bigG.
    assert base["projection_class_embeddings_input_dim"] == 6 * base["addition_time_embed_dim"] + te2["projection_dim"]
    assert (
        refiner["projection_class_embeddings_input_dim"]
        == 5 * refiner["addition_time_embed_dim"] + te2["projection_dim"]
    )
    assert 2 ** (len(configs["vae"]["block_out_channels"]) - 1) * base["sample_size"] == 1024


def test_fullsize_tokenizer_has_the_real_vocabulary_with_eos_last(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    vocab, merges = fullsize_tokenizer_files()
    assert len(vocab) == VOCAB_SIZE == 49408
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    write_tokenizer(tmp_path, vocab, merges, pad_token=EOS)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.bos_token_id == VOCAB_SIZE - 2 == vocab[BOS]
    assert tokenizer.eos_token_id == VOCAB_SIZE - 1 == vocab[EOS]
    ids = tokenizer("a photo of a cat, oil painting").input_ids
    assert ids[0] == vocab[BOS] and ids[-1] == vocab[EOS]
    assert max(ids) == ids[-1]  # CLIP pools at argmax(ids): that must be the EOS position
    assert not any(token.startswith("<|filler") for token in tokenizer.convert_ids_to_tokens(ids))


def _shrunk_configs() -> dict[str, dict]:
    """The shipped configs with widths and depths cut down; vocabulary, structure and wiring kept."""
    configs = load_configs()
    configs["text_encoder"].update(
        hidden_size=16, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, projection_dim=16
    )
    configs["text_encoder_2"].update(
        hidden_size=24, intermediate_size=96, num_attention_heads=2, num_hidden_layers=2, projection_dim=24
    )
    small_unet = {"norm_num_groups": 8, "addition_time_embed_dim": 8, "layers_per_block": 1}
    configs["unet"].update(
        small_unet,
        block_out_channels=[16, 32, 32],
        attention_head_dim=[1, 2, 2],
        transformer_layers_per_block=[1, 1, 2],
        cross_attention_dim=16 + 24,
        projection_class_embeddings_input_dim=8 * 6 + 24,
    )
    configs["refiner_unet"].update(
        small_unet,
        block_out_channels=[16, 32, 32, 32],
        attention_head_dim=[1, 2, 2, 2],
        transformer_layers_per_block=1,
        cross_attention_dim=24,
        projection_class_embeddings_input_dim=8 * 5 + 24,
    )
    configs["vae"].update(block_out_channels=[8, 16, 16, 16], norm_num_groups=8, layers_per_block=1)
    return configs


def test_built_model_loads_through_the_registry_and_runs(tmp_path: Path) -> None:
    info = build_fullsize_sdxl(tmp_path, device="cpu", dtype=torch.float16, configs=_shrunk_configs())
    assert (tmp_path / "base" / "model_index.json").is_file()
    assert (tmp_path / "refiner" / "model_index.json").is_file()
    assert info.dtype == "float16" and info.bytes > 0
    saved = json.loads((tmp_path / "base" / "unet" / "config.json").read_text())
    assert saved["transformer_layers_per_block"] == [1, 1, 2] and saved["addition_embed_type"] == "text_time"
    assert not list(tmp_path.rglob("*.bin")), "safetensors only"
    with open(tmp_path / "base" / "tokenizer_2" / "vocab.json") as handle:
        assert len(json.load(handle)) == VOCAB_SIZE

    models = {"random": {"base": str(tmp_path / "base"), "refiner": str(tmp_path / "refiner"), "default": True}}
    engine = EngineSettings(device="cpu", preview_every=0)
    registry = ModelRegistry(models, engine)
    model = registry.get()
    assert model.refiner is not None and model.dtype == torch.float32  # fp16 files, fp32 on the CPU
    assert model.refiner.text_encoder_2 is model.base.text_encoder_2
    job = Text2Img(job_id="full", prompt="a lighthouse", steps=3, width=128, height=128, seed=1)
    phases: list[str] = []
    images = Runner(registry, engine, GenerationSettings()).run(
        job, on_progress=lambda progress: phases.append(progress.phase), cancelled=lambda: False
    )
    assert images[0].image.size == (128, 128)
    assert "base" in phases and "refiner" in phases


@pytest.mark.parametrize("bad", [100])
def test_vocab_smaller_than_the_merges_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="smaller"):
        fullsize_tokenizer_files(bad)
