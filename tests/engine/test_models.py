"""The model registry on the tiny SDXL: sources, refusals, LRU caching, module sharing, checks."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch

from config.addons import ModelSettings
from config.settings import EngineSettings
from engine.model_check import check_models
from engine.models import ModelLoadError, ModelRegistry, ModelSource

CPU = EngineSettings(device="cpu", dtype="fp32")


def registry_for(config: dict[str, dict[str, object]], models_in_ram: int = 1) -> ModelRegistry:
    return ModelRegistry(config, CPU.model_copy(update={"models_in_ram": models_in_ram}))


def test_names_default_and_unknown(tiny_models_config: dict[str, dict[str, object]]) -> None:
    registry = registry_for(tiny_models_config)
    assert registry.names == ["tiny", "tiny-base", "tiny-single"]
    assert registry.default_name == "tiny"
    assert registry.resolve("") == "tiny"
    assert registry.has_refiner("tiny") and registry.has_refiner("")
    assert not registry.has_refiner("tiny-base")
    with pytest.raises(ModelLoadError) as err:
        registry.get("nope")
    assert "nope" in str(err.value)
    for name in registry.names:
        assert name in str(err.value)
    assert registry.loaded_names == []


def test_source_classification(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert ModelSource.parse("stabilityai/stable-diffusion-xl-base-1.0").kind == "hub"
    assert ModelSource.parse(str(tiny_model_dir / "base")).kind == "folder"
    single = ModelSource.parse(
        str(tiny_model_dir / "single" / "base.safetensors"), str(tiny_model_dir / "single" / "base-config")
    )
    assert (single.kind, single.config) == ("single_file", str(tiny_model_dir / "single" / "base-config"))
    with pytest.raises(ModelLoadError, match="no such"):
        ModelSource.parse(str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLoadError, match="no such"):
        ModelSource.parse(str(tmp_path / "missing-folder"))
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        ModelSource.parse(str(tiny_model_dir / "single"))
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        ModelSource.parse(str(tiny_model_dir / "single" / "base.safetensors"), str(tmp_path))
    other = tmp_path / "model.gguf"
    other.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"\.safetensors"):
        ModelSource.parse(str(other))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.pth", "pytorch_model.bin", "M.CKPT"])
def test_pickle_files_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"not even opened")
    with pytest.raises(ModelLoadError, match="pickle"):
        ModelSource.parse(str(path))
    # Settings refuse them too; a registry built from raw tables reports it as a load error.
    with pytest.raises(ModelLoadError, match="pickle"):
        ModelRegistry({"bad": {"base": str(path)}}, CPU)
    # Even past validation (model_construct skips it), loading refuses before reading a byte.
    registry = ModelRegistry({"bad": ModelSettings.model_construct(base=str(path), refiner="")}, CPU)
    with pytest.raises(ModelLoadError, match="pickle"):
        registry.get("bad")


def test_folder_with_only_bin_weights_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir / "base", folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.bin"))
    registry = ModelRegistry({"pickled": {"base": str(folder)}}, CPU)
    with pytest.raises(ModelLoadError, match=r"pickle.*unet/diffusion_pytorch_model\.bin"):
        registry.get()


def test_refiner_and_img2img_share_modules(tiny_models_config: dict[str, dict[str, object]]) -> None:
    model = registry_for(tiny_models_config).get("tiny")
    base, refiner, img2img = model.base, model.refiner, model.img2img
    assert refiner is not None
    assert refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.vae is base.vae
    assert refiner.unet is not base.unet
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score
    assert type(img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert getattr(img2img, name) is getattr(base, name), name
    assert img2img.unet.conv_in.weight.data_ptr() == base.unet.conv_in.weight.data_ptr()
    # Shared modules are counted once.
    assert len(list(model.modules())) == 5  # te1, te2, vae, base unet, refiner unet
    assert (model.device.type, model.dtype) == ("cpu", torch.float32)
    # img2img really runs on the shared weights.
    image = torch.rand(1, 3, 128, 128)
    out = img2img("a cat", image=image, strength=0.5, num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 128, 128)


def test_lru_keeps_and_drops(tiny_models_config: dict[str, dict[str, object]]) -> None:
    registry = registry_for(tiny_models_config, models_in_ram=1)
    tiny = registry.get("tiny")
    tiny_base = registry.get("tiny-base")
    assert registry.loaded_names == ["tiny", "tiny-base"]
    assert registry.active_name == "tiny-base"
    # Switching back is a cache hit: the same objects, no reload.
    assert registry.get("tiny") is tiny
    assert registry.loaded_names == ["tiny-base", "tiny"]
    # A third model pushes out the least recently used one, and its memory really goes.
    gone = weakref.ref(tiny_base.base.unet)
    del tiny_base
    registry.get("tiny-single")
    assert registry.loaded_names == ["tiny", "tiny-single"]
    gc.collect()
    assert gone() is None, "a dropped model must not stay referenced"
    assert registry.get("") is tiny


def test_models_in_ram_zero_keeps_only_the_active_one(tiny_models_config: dict[str, dict[str, object]]) -> None:
    registry = registry_for(tiny_models_config, models_in_ram=0)
    first = registry.get("tiny-base")
    registry.get("tiny-single")
    assert registry.loaded_names == ["tiny-single"]
    assert registry.get("tiny-base") is not first  # reloaded
    registry.unload()
    assert registry.loaded_names == []


def test_refiner_that_does_not_fit_is_refused(tiny_model_dir: Path) -> None:
    # The base folder loads as an img2img pipeline, but its UNet expects 80-wide text features.
    registry = ModelRegistry(
        {"odd": {"base": str(tiny_model_dir / "base"), "refiner": str(tiny_model_dir / "base")}}, CPU
    )
    with pytest.raises(ModelLoadError, match="refiner does not fit"):
        registry.get()


def test_hub_id_offline_gives_a_clear_error() -> None:
    registry = ModelRegistry({"hub": {"base": "atelier-tests/no-such-sdxl"}}, CPU)
    with pytest.raises(ModelLoadError) as err:
        registry.get()
    message = str(err.value)
    assert "atelier-tests/no-such-sdxl" in message and "hub" in message
    assert "HF_HUB_OFFLINE" in message


def test_single_file_without_config_offline_says_set_base_config(tiny_model_dir: Path) -> None:
    registry = ModelRegistry({"single": {"base": str(tiny_model_dir / "single" / "base.safetensors")}}, CPU)
    with pytest.raises(ModelLoadError, match="base_config"):
        registry.get()


def test_check_models(tiny_models_config: dict[str, dict[str, object]], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    config = {
        "tiny": tiny_models_config["tiny"],
        "tiny-single": tiny_models_config["tiny-single"],
        "broken": {"base": str(broken)},
        "missing": {"base": str(tmp_path / "nowhere")},
    }
    results = {check.name: check for check in check_models(config, CPU)}
    assert list(results) == list(config)
    assert results["tiny"].ok and results["tiny-single"].ok
    assert results["tiny"].seconds > 0
    assert "refiner" in results["tiny"].detail and "cpu" in results["tiny"].detail
    assert "single file" in results["tiny-single"].detail
    assert not results["broken"].ok and "broken" in results["broken"].detail
    assert not results["missing"].ok and "no such" in results["missing"].detail


def test_refiner_from_a_single_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A refiner checkpoint (OpenCLIP-G as conditioner.embedders.0.model.*) plus its config folder."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from safetensors.torch import save_file

    from engine.single_file import sdxl_to_original

    folder = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_model_dir / "refiner", local_files_only=True)
    state = sdxl_to_original(unet=folder.unet, vae=folder.vae, text_encoder_2=folder.text_encoder_2)
    assert "conditioner.embedders.0.model.text_projection" in state
    save_file(state, str(tmp_path / "refiner.safetensors"))
    shutil.copytree(
        tiny_model_dir / "refiner", tmp_path / "refiner-config", ignore=shutil.ignore_patterns("*.safetensors")
    )
    config = {
        "single": {
            "base": str(tiny_model_dir / "single" / "base.safetensors"),
            "base_config": str(tiny_model_dir / "single" / "base-config"),
            "refiner": str(tmp_path / "refiner.safetensors"),
            "refiner_config": str(tmp_path / "refiner-config"),
        }
    }
    model = registry_for(config).get()
    assert model.refiner is not None
    assert model.refiner.text_encoder_2 is model.base.text_encoder_2 and model.refiner.vae is model.base.vae
    loaded, expected = model.refiner.unet.state_dict(), folder.unet.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[key], expected[key]) for key in expected)


def test_half_precision_reaches_every_shared_module(tiny_models_config: dict[str, dict[str, object]]) -> None:
    # diffusers' from_pipe casts the modules it shares to float32 unless told the dtype: the img2img
    # view must not silently undo a bf16/fp16 load (a mixed-dtype pipeline crashes mid-run).
    registry = ModelRegistry(tiny_models_config, EngineSettings(device="cpu", dtype="bf16"))
    model = registry.get("tiny")
    assert model.dtype == torch.bfloat16
    assert {p.dtype for module in model.modules() for p in module.parameters()} == {torch.bfloat16}
    latents = model.base("a cat", num_inference_steps=2, height=64, width=64, output_type="latent").images
    assert latents.dtype == torch.bfloat16


def test_unavailable_device_is_a_load_error(tiny_models_config: dict[str, dict[str, object]]) -> None:
    assert not torch.cuda.is_available()
    registry = ModelRegistry(tiny_models_config, EngineSettings(device="cuda"))
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        registry.get()
    [check] = check_models({"tiny": tiny_models_config["tiny"]}, EngineSettings(device="cuda"))
    assert not check.ok and "CUDA is not available" in check.detail
