"""The GPU path's configuration, checked on the CPU: devices, dtypes, attention, memory format,
fused QKV, compile, VAE precision, warm-up."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0, FusedAttnProcessor2_0

from config.settings import EngineSettings
from engine import accel
from engine.accel import (
    AccelError,
    apply_optimizations,
    attached_modules,
    decode_dtype,
    decode_latents,
    decode_vae,
    resolve_device,
    resolve_dtype,
    warmup,
)
from engine.tiny import build_tiny_pipelines

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def pipes() -> tuple[Any, Any]:
    base, refiner, _ = build_tiny_pipelines(seed=0)
    return base, refiner


def engine(**overrides: object) -> EngineSettings:
    return EngineSettings(**overrides)


# --- devices -------------------------------------------------------------------------------


def test_auto_device_on_this_machine_is_cpu() -> None:
    assert not torch.cuda.is_available(), "these tests describe the CPU-only test machine"
    assert resolve_device(engine(device="auto")) == CPU
    assert resolve_device(engine(device="cpu")) == CPU


def test_explicit_cuda_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(AccelError, match="CUDA is not available"):
        resolve_device(engine(device="cuda"))


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(engine(device="auto")) == CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(accel, "_mps_available", lambda: True)
    assert resolve_device(engine(device="auto")).type == "mps"


# --- dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float32)],
)
def test_cpu_dtypes(setting: str, expected: torch.dtype) -> None:
    assert resolve_dtype(engine(dtype=setting), CPU) == expected


def test_fp16_on_cpu_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="engine.accel"):
        assert resolve_dtype(engine(dtype="fp16"), CPU) == torch.float32
    assert "fp16" in caplog.text and "fp32" in caplog.text


@pytest.mark.parametrize(
    ("setting", "bf16_ok", "expected"),
    [
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float16),
        ("bf16", True, torch.bfloat16),
        ("bf16", False, torch.float16),
        ("fp16", True, torch.float16),
        ("fp32", True, torch.float32),
    ],
)
def test_cuda_dtypes(monkeypatch: pytest.MonkeyPatch, setting: str, bf16_ok: bool, expected: torch.dtype) -> None:
    # No GPU here: only the capability query is patched; the choice logic is the real one.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    assert resolve_dtype(engine(dtype=setting), CUDA) == expected


def test_mps_auto_is_fp16() -> None:
    assert resolve_dtype(engine(dtype="auto"), torch.device("mps")) == torch.float16


# --- pipeline optimizations ----------------------------------------------------------------


def _conv_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in module.modules() if isinstance(m, torch.nn.Conv2d)]


def test_sdpa_and_channels_last(pipes: tuple[Any, Any]) -> None:
    base, _ = pipes
    report = apply_optimizations(base, engine(channels_last=True), CPU, torch.float32)
    assert "sdpa(unet)" in report.applied and "channels_last(unet)" in report.applied
    for module in (base.unet, base.vae):
        assert {type(p) for p in module.attn_processors.values()} == {AttnProcessor2_0}
        convs = [w for w in _conv_weights(module) if w.shape[-1] > 1 or w.shape[-2] > 1]
        assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    # Still produces the same output as a pipeline left alone.
    fresh, _, _ = build_tiny_pipelines(seed=0)

    def run(pipe: object) -> torch.Tensor:
        return pipe(  # type: ignore[operator]
            "a cat",
            num_inference_steps=2,
            height=128,
            width=128,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images

    torch.testing.assert_close(run(base), run(fresh), atol=1e-4, rtol=1e-4)


def test_channels_last_off(pipes: tuple[Any, Any]) -> None:
    base, _ = pipes
    apply_optimizations(base, engine(channels_last=False), CPU, torch.float32)
    assert all(w.is_contiguous() for w in _conv_weights(base.unet))


def test_fused_qkv_once_for_shared_modules(pipes: tuple[Any, Any]) -> None:
    base, refiner = pipes
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.randn(1, 40), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    with torch.inference_mode():
        before = base.unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
    settings = engine(fuse_qkv=True)
    assert "fused_qkv" in apply_optimizations(base, settings, CPU, torch.float32).applied
    assert {type(p) for p in base.unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert {type(p) for p in base.vae.attn_processors.values()} == {FusedAttnProcessor2_0}
    with torch.inference_mode():
        after = base.unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    # The refiner shares the base's VAE (already fused): only its own UNet is set up.
    report = apply_optimizations(refiner, settings, CPU, torch.float32)
    assert "sdpa(vae)" not in report.applied and "sdpa(unet)" in report.applied
    assert {type(p) for p in refiner.unet.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert {type(p) for p in base.vae.attn_processors.values()} == {FusedAttnProcessor2_0}


@pytest.mark.slow
def test_compile_regional_matches_eager(pipes: tuple[Any, Any]) -> None:
    base, _ = pipes
    unet = base.unet
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    added = {"text_embeds": torch.randn(1, 40), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}
    with torch.inference_mode():
        eager = unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
    report = apply_optimizations(base, engine(compile=True, channels_last=False), CPU, torch.float32)
    assert "compile(regional)" in report.applied
    compiled_blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert compiled_blocks and all(getattr(m, "_compiled_call_impl", None) is not None for m in compiled_blocks)
    with torch.inference_mode():
        compiled = unet(latents, 500, encoder_hidden_states=text, added_cond_kwargs=added).sample
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# --- VAE precision -------------------------------------------------------------------------


def test_decode_dtype(pipes: tuple[Any, Any]) -> None:
    base, _ = pipes
    assert decode_dtype(base) == torch.float32
    base.vae.to(torch.bfloat16)
    assert decode_dtype(base) == torch.bfloat16
    base.vae.to(torch.float16)
    assert base.vae.config.force_upcast  # the original SDXL VAE overflows in fp16
    assert decode_dtype(base) == torch.float32
    report = apply_optimizations(base, engine(), CUDA, torch.float16)
    assert "vae_upcast_fp32" in report.applied
    base.vae.register_to_config(force_upcast=False)  # as the fp16-fix VAE's config says
    assert decode_dtype(base) == torch.float16


def test_decode_latents_matches_pipeline(pipes: tuple[Any, Any]) -> None:
    base, _ = pipes
    kwargs = {"num_inference_steps": 2, "height": 128, "width": 128}
    latents = base("a cat", generator=torch.Generator().manual_seed(3), output_type="latent", **kwargs).images
    images = base("a cat", generator=torch.Generator().manual_seed(3), output_type="pt", **kwargs).images
    assert decode_vae(base) is base.vae  # fp32: no copy
    decoded = (decode_latents(base, latents) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(decoded, images, atol=1e-5, rtol=1e-5)


def test_fp16_vae_decodes_in_fp32_without_touching_the_shared_vae(pipes: tuple[Any, Any]) -> None:
    base, _ = pipes
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    base.vae.to(torch.float16)
    half_weight = base.vae.decoder.conv_in.weight
    upcast = decode_vae(base)
    assert upcast is not base.vae and upcast.dtype == torch.float32
    assert decode_vae(base) is upcast, "the fp32 copy is made once"
    decoded = decode_latents(base, latents.half())
    assert decoded.dtype == torch.float32 and torch.isfinite(decoded).all()
    # The weights went through fp16 once, so equal to the fp32 decode up to fp16 weight rounding.
    torch.testing.assert_close(decoded, reference, atol=2e-2, rtol=2e-2)
    assert base.vae.dtype == torch.float16 and base.vae.decoder.conv_in.weight is half_weight
    # The copy follows the shared VAE's switches and is moved along with it.
    base.vae.enable_tiling()
    assert decode_vae(base).use_tiling
    assert attached_modules(base.vae) == [upcast]
    assert upcast not in list(base.vae.modules()), "not a submodule: not in the VAE's state dict"


# --- warm-up -------------------------------------------------------------------------------


def test_warmup_runs_each_size_once_and_survives_failures() -> None:
    calls: list[tuple[int, int]] = []

    def run(width: int, height: int) -> None:
        calls.append((width, height))
        if width == 640:
            raise RuntimeError("out of memory")

    seconds = warmup(run, [(1024, 1024), (896, 1152), (1024, 1024), (640, 1536)])
    assert calls == [(1024, 1024), (896, 1152), (640, 1536)]
    assert set(seconds) == {(1024, 1024), (896, 1152)}
    assert all(value >= 0 for value in seconds.values())
