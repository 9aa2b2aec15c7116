"""A random-weight Real-ESRGAN (RRDBNet) written as .safetensors, for tests and the GPU bench.

The file has the key layout Real-ESRGAN's own releases use (basicsr's RRDBNet, the `params_ema`
of RealESRGAN_x4plus / x2plus): ``conv_first``, ``body.<i>.rdb<j>.conv<k>``, ``conv_body``,
``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``. spandrel detects that layout as ESRGAN and
converts it, so the upscaler path (engine.upscale.SpandrelUpscaler) is exercised exactly as with
a downloaded model. Nothing here imports spandrel: the file can be written on a machine without it.

- ×4: 3 input channels, two ×2 upsampling convolutions (RealESRGAN_x4plus).
- ×2: the ×4 network behind a 2× pixel-unshuffle, so 12 input channels (RealESRGAN_x2plus);
  spandrel recognises it by in_channels == 4 × out_channels.

The real models have 64 filters and 23 blocks (16.7 M parameters); the defaults here are tiny.
"""

from __future__ import annotations

from pathlib import Path

import torch

GROWTH = 32  # RRDB's growth channels: fixed at 32 in the published models and in spandrel


def _conv(
    state: dict[str, torch.Tensor],
    name: str,
    out_ch: int,
    in_ch: int,
    generator: torch.Generator,
    gain: float = 1.0,
) -> None:
    std = gain * (2.0 / (in_ch * 9)) ** 0.5  # Kaiming-normal for the LeakyReLU between convolutions
    state[f"{name}.weight"] = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * std
    state[f"{name}.bias"] = torch.zeros(out_ch)


def esrgan_state_dict(
    *, scale: int = 4, num_filters: int = 8, num_blocks: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random Real-ESRGAN weights (fp32, CPU) for a ×4 or ×2 model, in Real-ESRGAN's key names."""
    if scale not in (2, 4):
        raise ValueError("scale must be 2 or 4 (the published Real-ESRGAN layouts)")
    generator = torch.Generator().manual_seed(seed)
    in_channels = 3 * (4 if scale == 2 else 1)  # ×2 = pixel-unshuffle(2) in front of the ×4 net
    nf, gc = num_filters, GROWTH
    state: dict[str, torch.Tensor] = {}
    _conv(state, "conv_first", nf, in_channels, generator)
    for block in range(num_blocks):
        for rdb in (1, 2, 3):
            for k in range(1, 6):
                out_ch = nf if k == 5 else gc
                # Scaled by 0.1 as basicsr's default_init_weights does inside RRDBs: the residual
                # stack stays near identity, so activations stay finite at any depth.
                _conv(state, f"body.{block}.rdb{rdb}.conv{k}", out_ch, nf + (k - 1) * gc, generator, gain=0.1)
    _conv(state, "conv_body", nf, nf, generator)
    _conv(state, "conv_up1", nf, nf, generator)
    _conv(state, "conv_up2", nf, nf, generator)
    _conv(state, "conv_hr", nf, nf, generator)
    _conv(state, "conv_last", 3, nf, generator, gain=0.05)
    # Mid-grey plus the network's response: an output clamped to [0, 1] keeps its detail (an
    # all-black image would make every comparison in a test pass trivially).
    state["conv_last.bias"] += 0.5
    return state


def write_tiny_esrgan(
    path: Path | str, *, scale: int = 4, num_filters: int = 8, num_blocks: int = 1, seed: int = 0
) -> Path:
    """Write the model to `path` (.safetensors) and return the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = esrgan_state_dict(scale=scale, num_filters=num_filters, num_blocks=num_blocks, seed=seed)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path), metadata={"format": "pt"})
    path.chmod(0o644)
    return path


def esrgan_parameters(state: dict[str, torch.Tensor]) -> int:
    return sum(tensor.numel() for tensor in state.values())


__all__ = ["GROWTH", "esrgan_parameters", "esrgan_state_dict", "write_tiny_esrgan"]
