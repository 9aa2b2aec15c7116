"""A tiny random-weight SDXL built from the real classes, for tests and the offline demo.

`build_tiny_sdxl(PATH)` writes

- ``PATH/base``: a diffusers StableDiffusionXLPipeline folder (safetensors),
- ``PATH/refiner``: a StableDiffusionXLImg2ImgPipeline folder (no first text encoder/tokenizer,
  ``requires_aesthetics_score=True``; its VAE and OpenCLIP encoder are the base's, as in real SDXL),
- ``PATH/single/base.safetensors``: the same base as ONE file in the original SGM key layout,
- ``PATH/single/base-config``: the base's configs and tokenizers without weights, the folder an
  operator names as ``base_config`` so ``from_single_file`` loads offline;
- the add-ons fitting the base (engine.tiny_addons): ``PATH/lora/`` (a LoRA in kohya keys, one in
  diffusers keys, a draft LoRA), ``PATH/embeddings/``, ``PATH/controlnet/``, ``PATH/annotators/``.

Everything loads through the same code as real SDXL weights (engine.models). The shapes keep
SDXL's structure (two text encoders of DIFFERENT widths, text_time conditioning, 8× VAE,
default 1024²) at a few MB, so a step at 256² takes a few tens of milliseconds on a CPU.
Images from it are noise by design. Builds are deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Sizes (see /work/shared/notes/FACTS.md). The two widths must differ: single-file loading tells
# CLIP-L from OpenCLIP-G by width, and equal widths would hide wiring bugs.
TE1_WIDTH = 32
TE2_WIDTH = 48
PROJECTION_DIM = 40
TEXT_LAYERS = 5
TEXT_HEADS = 4
MAX_TOKENS = 77
TIME_EMBED_DIM = 8
UNET_CHANNELS = (8, 16, 32)
VAE_CHANNELS = (8, 16, 32, 32)
UNET_SAMPLE_SIZE = 128  # latents; × VAE scale factor 8 = 1024² by default
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
NUM_MERGES = 400

# Text the BPE merges are learned from: prompt-like English so common words become single tokens.
_CORPUS = """
a photo of a cat sitting on a windowsill in the morning light, highly detailed, 8k
a portrait of an old fisherman with a beard, dramatic lighting, oil painting
a futuristic city at night with neon lights and flying cars, cyberpunk, digital art
a watercolor landscape of mountains and a lake at sunset, soft colors
an astronaut riding a horse on the moon, photorealistic, cinematic
a cozy cabin in a snowy forest, warm light in the windows, winter evening
a bowl of fruit on a wooden table, still life, studio lighting, sharp focus
a dragon flying over a medieval castle, fantasy art, epic, trending on artstation
a close up of a flower with dew drops, macro photography, bokeh background
a robot painting a picture in an art studio, anime style, vibrant colors
the quick brown fox jumps over the lazy dog near the river bank
portrait of a young woman with red hair and green eyes, freckles, natural light
a ship sailing through a stormy sea, waves crashing, dark clouds, lightning
a beautiful garden with roses and a stone fountain, spring, butterflies
minimalist poster of a mountain range, flat design, pastel palette
blurry, low quality, bad anatomy, extra fingers, watermark, text, deformed, ugly
"""


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte → printable character map; '!' comes first (id 0)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def _train_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on CLIP-style words (last symbol carries '</w>'); deterministic tie-breaking."""
    byte_map = bytes_to_unicode()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()))
    split: dict[tuple[str, ...], int] = {}
    for word, count in words.items():
        letters = [byte_map[b] for b in word.encode("utf-8")]
        letters[-1] += "</w>"
        split[tuple(letters)] = split.get(tuple(letters), 0) + count
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in split.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in split.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        split = merged
    return merges


def tokenizer_files(num_merges: int = NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocab layout: 256 byte symbols, the same with '</w>', one token per merge, BOS, EOS last."""
    merges = _train_merges(_CORPUS, num_merges)
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> None:
    """The files a CLIPTokenizer loads offline (transformers 4.x and 5.x alike)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "do_lower_case": True,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _text_config(vocab_size: int, width: int, act: str, *, eos_id: int, bos_id: int, pad_id: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=width * 4,
        projection_dim=PROJECTION_DIM,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=MAX_TOKENS,
        hidden_act=act,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _unet(cross_attention_dim: int, n_time_ids: int) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=UNET_SAMPLE_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=UNET_CHANNELS,
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=TIME_EMBED_DIM * n_time_ids + PROJECTION_DIM,
    )


def _vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=UNET_SAMPLE_SIZE * 8,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=True,  # as the original SDXL VAE: it overflows in fp16
    )


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # SDXL's shipped scheduler config.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )


TokenizerFiles = tuple[dict[str, int], list[tuple[str, str]]]


def load_tokenizers(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tuple[Any, Any]:
    """SDXL's two CLIP tokenizers over one vocabulary: CLIP-L pads with EOS, bigG with "!" (id 0)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp, "1"), vocab, merges, pad_token=EOS)
        write_tokenizer(Path(tmp, "2"), vocab, merges, pad_token="!")
        return CLIPTokenizer.from_pretrained(Path(tmp, "1")), CLIPTokenizer.from_pretrained(Path(tmp, "2"))


def assemble_pipelines(
    modules: Mapping[str, Any], tokenizers: tuple[Any, Any], scheduler: Callable[[], Any]
) -> tuple[Any, Any]:
    """The base and refiner pipelines over `modules` (text_encoder, text_encoder_2, unet, vae,
    refiner_unet), each with a `scheduler()` of its own; the refiner shares the base's
    text_encoder_2, tokenizer_2 and VAE, as SDXL's do."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = tokenizers
    base = StableDiffusionXLPipeline(
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        text_encoder_2=modules["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=modules["unet"],
        scheduler=scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=modules["vae"],
        text_encoder=None,
        text_encoder_2=modules["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=modules["refiner_unet"],
        scheduler=scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    return base, refiner


def build_tiny_pipelines(seed: int = 0) -> tuple[Any, Any, TokenizerFiles]:
    """The tiny base and refiner pipelines in memory (fp32, CPU), weights drawn from `seed`.

    Returns (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, (vocab, merges)); the
    refiner shares the base's text_encoder_2, tokenizer_2 and VAE. The global RNG is left untouched.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab, merges = tokenizer_files()
    eos_id, bos_id = vocab[EOS], vocab[BOS]
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            _text_config(len(vocab), TE1_WIDTH, "quick_gelu", eos_id=eos_id, bos_id=bos_id, pad_id=eos_id)
        )
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(len(vocab), TE2_WIDTH, "gelu", eos_id=eos_id, bos_id=bos_id, pad_id=0)
        )
        torch.manual_seed(seed + 2)
        unet = _unet(TE1_WIDTH + TE2_WIDTH, n_time_ids=6)
        torch.manual_seed(seed + 3)
        vae = _vae()
        torch.manual_seed(seed + 4)
        refiner_unet = _unet(TE2_WIDTH, n_time_ids=5)
    finally:
        torch.random.set_rng_state(generator_state)

    modules = {
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "unet": unet,
        "vae": vae,
        "refiner_unet": refiner_unet,
    }
    for module in modules.values():
        module.eval().requires_grad_(False)
    base, refiner = assemble_pipelines(modules, load_tokenizers(vocab, merges), _scheduler)
    return base, refiner, (vocab, merges)


def save_pipeline(pipe: Any, folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    pipe.save_pretrained(folder, safe_serialization=True)
    # Write the tokenizers in CLIP's own file layout (vocab.json + merges.txt) rather than the
    # transformers-5-only tokenizer.json, so the folders load under transformers 4.x too.
    if getattr(pipe, "tokenizer", None) is not None:
        write_tokenizer(folder / "tokenizer", vocab, merges, pad_token=EOS)
    write_tokenizer(folder / "tokenizer_2", vocab, merges, pad_token="!")


def _copy_configs(source: Path, dest: Path) -> None:
    """The diffusers config folder of a single file: everything but the weights."""
    weights = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx")

    def ignore(_dir: str, names: list[str]) -> list[str]:
        return [name for name in names if name.endswith(weights) or name.endswith(".index.json")]

    shutil.copytree(source, dest, ignore=ignore)


def build_tiny_sdxl(path: Path, seed: int = 0, *, addons: bool = True) -> None:
    """Write the tiny SDXL under `path` (see the module docstring), with its add-ons unless
    `addons` is False; replaces what was there."""
    from safetensors.torch import save_file

    from engine.models import quiet_progress
    from engine.single_file import sdxl_to_original

    path = Path(path)
    started = time.perf_counter()
    with quiet_progress():
        base, refiner, (vocab, merges) = build_tiny_pipelines(seed)
        for name in ("base", "refiner", "single"):
            if (path / name).exists():
                shutil.rmtree(path / name)
        path.mkdir(parents=True, exist_ok=True)
        save_pipeline(base, path / "base", vocab, merges)
        save_pipeline(refiner, path / "refiner", vocab, merges)

    single = path / "single"
    single.mkdir()
    state = sdxl_to_original(
        unet=base.unet, vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2
    )
    save_file(state, str(single / "base.safetensors"), metadata={"format": "pt"})
    _copy_configs(path / "base", single / "base-config")
    # safetensors writes its files 0600; the bot may run as another user (a container, a service).
    for weights in path.rglob("*.safetensors"):
        weights.chmod(0o644)
    log.info("tiny SDXL written to %s in %.1f s", path, time.perf_counter() - started)
    if addons:
        from engine.tiny_addons import build_tiny_addons

        build_tiny_addons(path, seed)


def tiny_model_command(path: str) -> int:
    """`atelier tiny-model PATH`: build the tiny model and say where it went and how to use it."""
    from engine.tiny_addons import tiny_draft, tiny_styling

    target = Path(path)
    started = time.perf_counter()
    try:
        build_tiny_sdxl(target)
    except OSError as exc:
        print(f"atelier: cannot write the tiny model to {target}: {exc}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"tiny SDXL written to {target} in {seconds:.1f} s ({size / 1e6:.1f} MB, random weights: images are noise)")
    print("use it with:")
    print("  [models.tiny]")
    print(f'  base = "{(target / "base").resolve()}"')
    print(f'  refiner = "{(target / "refiner").resolve()}"')
    print("  default = true")
    for key, value in tiny_draft(target.resolve()).items():
        print(f"  {key} = {json.dumps(value)}")
    print("  [models.tiny-single]")
    print(f'  base = "{(target / "single" / "base.safetensors").resolve()}"')
    print(f'  base_config = "{(target / "single" / "base-config").resolve()}"')
    # The LoRAs, the embedding and a style: JSON strings, numbers and lists are TOML values too.
    for section, tables in tiny_styling(target.resolve()).items():
        for name, table in tables.items():
            print(f"  [{section}.{name}]")
            for key, value in table.items():
                print(f"  {key} = {json.dumps(value)}")
    return 0


__all__ = ["build_tiny_pipelines", "build_tiny_sdxl", "tiny_model_command"]
