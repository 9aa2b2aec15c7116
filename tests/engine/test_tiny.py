"""The tiny SDXL: layout, determinism, SDXL-like structure, tokenizers, and single file == folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from config.settings import EngineSettings
from engine.models import ModelRegistry
from engine.tiny import TE1_WIDTH, TE2_WIDTH, build_tiny_sdxl, tiny_model_command

CPU = EngineSettings(device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def registry(tiny_models_config: dict[str, dict[str, object]]) -> ModelRegistry:
    return ModelRegistry(tiny_models_config, CPU.model_copy(update={"models_in_ram": 3}))


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


def test_layout(tiny_model_dir: Path) -> None:
    files = _files(tiny_model_dir)
    for name in ("base", "refiner"):
        assert f"{name}/model_index.json" in files
        assert f"{name}/unet/diffusion_pytorch_model.safetensors" in files
        assert f"{name}/vae/diffusion_pytorch_model.safetensors" in files
        assert f"{name}/text_encoder_2/model.safetensors" in files
        assert f"{name}/tokenizer_2/vocab.json" in files
        assert f"{name}/tokenizer_2/merges.txt" in files
    assert "base/text_encoder/model.safetensors" in files
    assert not any(name.startswith("refiner/text_encoder/") or name.startswith("refiner/tokenizer/") for name in files)
    assert "single/base.safetensors" in files
    config_files = [name for name in files if name.startswith("single/base-config/")]
    assert "single/base-config/model_index.json" in config_files
    assert "single/base-config/unet/config.json" in config_files
    assert "single/base-config/tokenizer/vocab.json" in config_files
    assert not [name for name in config_files if name.endswith(".safetensors")], "config folder has no weights"
    assert not [name for name in files if name.endswith((".bin", ".ckpt", ".pt", ".pth"))]
    assert sum(len(data) for data in files.values()) < 20_000_000

    refiner_index = json.loads(files["refiner/model_index.json"])
    assert refiner_index["requires_aesthetics_score"] is True
    assert refiner_index["text_encoder"] == [None, None]
    assert refiner_index["tokenizer"] == [None, None]


def test_sdxl_structure(tiny_model_dir: Path) -> None:
    def config(part: str) -> dict[str, object]:
        return json.loads((tiny_model_dir / part / "config.json").read_text())

    te1, te2 = config("base/text_encoder"), config("base/text_encoder_2")
    assert (te1["hidden_size"], te2["hidden_size"]) == (TE1_WIDTH, TE2_WIDTH)
    assert te1["hidden_size"] != te2["hidden_size"], "equal widths would hide single-file wiring bugs"
    assert te2["projection_dim"] == 40
    assert te1["num_hidden_layers"] == te2["num_hidden_layers"] == 5
    base_unet, refiner_unet = config("base/unet"), config("refiner/unet")
    assert base_unet["addition_embed_type"] == "text_time"
    assert base_unet["cross_attention_dim"] == TE1_WIDTH + TE2_WIDTH
    assert base_unet["projection_class_embeddings_input_dim"] == 8 * 6 + 40
    assert refiner_unet["cross_attention_dim"] == TE2_WIDTH
    assert refiner_unet["projection_class_embeddings_input_dim"] == 8 * 5 + 40
    assert base_unet["sample_size"] == 128
    vae = config("base/vae")
    assert len(vae["block_out_channels"]) == 4  # scale factor 8


def test_tokenizers(registry: ModelRegistry) -> None:
    base = registry.get("tiny-base").base
    long_prompt = "a photo of a cat " * 40
    for tokenizer, pad_id in ((base.tokenizer, base.tokenizer.eos_token_id), (base.tokenizer_2, 0)):
        assert tokenizer.model_max_length == 77
        assert tokenizer.eos_token_id == len(tokenizer) - 1, "eos must have the highest id (CLIP pools at argmax)"
        for prompt in ("a photo of a cat", long_prompt, ""):
            ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            ids = ids.input_ids[0]
            assert ids.shape == (77,)
            assert ids[0].item() == tokenizer.bos_token_id
            eos_at = int(ids.argmax())
            assert ids[eos_at].item() == tokenizer.eos_token_id
            assert eos_at == int((ids == tokenizer.eos_token_id).nonzero()[0])
        short = tokenizer("a cat", padding="max_length", max_length=77).input_ids
        assert short[-1] == pad_id
    # Words of the prompt vocabulary become single tokens: the merges were really learned.
    assert len(base.tokenizer("a photo of a cat").input_ids) == 2 + 5
    assert base.tokenizer_2.convert_ids_to_tokens(0) == "!"


def test_registry_loads_folders_default_1024(registry: ModelRegistry) -> None:
    model = registry.get("tiny")
    assert model.refiner is not None
    assert model.base.default_sample_size * model.base.vae_scale_factor == 1024
    image = model.base("a cat", num_inference_steps=1, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (1024, 1024)
    latents = model.base(
        "a cat", num_inference_steps=4, denoising_end=0.5, output_type="latent", height=128, width=128
    ).images
    refined = model.refiner("a cat", image=latents, num_inference_steps=4, denoising_start=0.5).images[0]
    assert refined.size == (128, 128)


def test_single_file_equals_folder(registry: ModelRegistry, tiny_model_dir: Path) -> None:
    folder, single = registry.get("tiny-base").base, registry.get("tiny-single").base
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert a.keys() == b.keys(), name
        unequal = [key for key in a if not torch.equal(a[key], b[key])]
        assert not unequal, f"{name}: {unequal[:5]}"
    for name in ("tokenizer", "tokenizer_2"):
        assert getattr(folder, name).get_vocab() == getattr(single, name).get_vocab()

    def run(pipe: object) -> torch.Tensor:
        return pipe(  # type: ignore[operator]
            "a red fox",
            negative_prompt="blurry",
            num_inference_steps=3,
            height=128,
            width=128,
            generator=torch.Generator().manual_seed(7),
            output_type="pt",
        ).images

    assert torch.equal(run(folder), run(single))

    # The file really is in the original SGM layout, with the two encoders told apart by width.
    with safe_open(str(tiny_model_dir / "single" / "base.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        clip_l = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
        assert handle.get_slice(clip_l).get_shape()[-1] == TE1_WIDTH
        assert handle.get_slice("conditioner.embedders.1.model.positional_embedding").get_shape()[-1] == TE2_WIDTH
        assert handle.get_slice("conditioner.embedders.1.model.text_projection").get_shape() == [TE2_WIDTH, 40]
        assert handle.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape()[-2:] == [1, 1]
    assert "conditioner.embedders.1.model.transformer.resblocks.4.attn.in_proj_weight" in keys
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # upsampler after attention
    assert not any(key.startswith(("unet.", "vae.", "text_encoder")) for key in keys)


def test_build_is_deterministic_and_cli(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert tiny_model_command(str(tmp_path / "again")) == 0
    out = capsys.readouterr().out
    assert "base.safetensors" in out and "base_config" in out
    assert _files(tmp_path / "again") == _files(tiny_model_dir)


def test_seed_changes_weights(tmp_path: Path) -> None:
    from engine.tiny import build_tiny_pipelines

    a, _, _ = build_tiny_pipelines(seed=0)
    b, _, _ = build_tiny_pipelines(seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    # Building does not disturb the caller's global RNG.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipelines(seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_rebuild_replaces(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "stale.bin").write_bytes(b"x")
    build_tiny_sdxl(tmp_path, seed=3)
    assert not (tmp_path / "base" / "stale.bin").exists()
    assert (tmp_path / "single" / "base.safetensors").is_file()


# Full-size SDXL shapes, built on the meta device (no memory, no weights): the key mapping is
# checked against diffusers' own single-file conversion on the real architectures, not only on
# the tiny one.
SDXL_BASE_UNET = {
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "projection_class_embeddings_input_dim": 2816,
}
SDXL_REFINER_UNET = {
    "block_out_channels": (384, 768, 1536, 1536),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": 4,
    "attention_head_dim": (6, 12, 24, 24),
    "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,
}


def _same_layout(converted: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert converted.keys() == original.keys()
    assert all(converted[key].shape == original[key].shape for key in original)


@pytest.mark.parametrize("unet_config", [SDXL_BASE_UNET, SDXL_REFINER_UNET], ids=["base", "refiner"])
def test_mapping_inverts_diffusers_conversion_at_full_size(unet_config: dict[str, object]) -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine.single_file import clip_l_to_original, openclip_g_to_original, unet_to_original, vae_to_original

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=128,
            layers_per_block=2,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            **unet_config,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
        )
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12))
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
                hidden_act="gelu",
            )
        )

    unet_state = unet.state_dict()
    _same_layout(sfu.convert_ldm_unet_checkpoint(unet_to_original(unet_state, unet.config), unet.config), unet_state)
    vae_state = vae.state_dict()
    _same_layout(sfu.convert_ldm_vae_checkpoint(vae_to_original(vae_state, vae.config), vae.config), vae_state)

    l_state = {k: v for k, v in clip_l.state_dict().items() if not k.endswith("position_ids")}
    l_back = sfu.convert_ldm_clip_checkpoint(clip_l_to_original(l_state))
    if not hasattr(clip_l, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        l_back = {k.removeprefix("text_model."): v for k, v in l_back.items()}
    _same_layout(l_back, l_state)

    g_state = {k: v for k, v in clip_g.state_dict().items() if not k.endswith("position_ids")}
    prefix = "conditioner.embedders.1.model."
    _same_layout(
        sfu.convert_open_clip_checkpoint(clip_g, openclip_g_to_original(g_state, prefix), prefix=prefix), g_state
    )
