"""Diffusers → original (SGM / "ldm") SDXL checkpoint key mapping.

Real SDXL single-file checkpoints (the ones people download from model sites) store every
component in one state dict with the key layout of Stability's `sgm` code:

- UNet under ``model.diffusion_model.`` (``input_blocks`` / ``middle_block`` / ``output_blocks``),
- VAE under ``first_stage_model.`` (``encoder.down.N.block.M``, conv-shaped attention weights),
- CLIP-L under ``conditioner.embedders.0.transformer.`` (the HF layout, unchanged),
- OpenCLIP-G under ``conditioner.embedders.1.model.`` (open_clip layout: ``resblocks``, fused
  ``in_proj_weight``, ``text_projection`` stored transposed).

diffusers' ``from_single_file`` converts that layout back (``loaders/single_file_utils.py``).
This module is the inverse, used by :mod:`engine.tiny` to write a tiny checkpoint in exactly the
layout diffusers converts, so the single-file path is exercised by the same code as a real
checkpoint. The refiner layout (OpenCLIP-G as ``conditioner.embedders.0.model.``) is supported
through ``openclip_prefix``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_G_PREFIX = "conditioner.embedders.1.model."
REFINER_OPENCLIP_G_PREFIX = "conditioner.embedders.0.model."

StateDict = dict[str, torch.Tensor]


def _check_complete(what: str, source: Mapping[str, torch.Tensor], mapped: StateDict) -> None:
    """Every tensor of the module must land somewhere: a silent gap would load random weights."""
    if len(mapped) != len(source):
        raise RuntimeError(f"{what} key mapping is incomplete: {len(mapped)} keys mapped of {len(source)}")


def _resnet_unet(diffusers_prefix: str, ldm_prefix: str, state: Mapping[str, torch.Tensor]) -> StateDict:
    """A UNet ResnetBlock2D (diffusers) → ResBlock (ldm)."""
    names = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
    }
    out: StateDict = {}
    for key, value in state.items():
        if not key.startswith(diffusers_prefix):
            continue
        rest = key[len(diffusers_prefix) :]
        module, _, param = rest.partition(".")
        if module not in names:
            raise KeyError(f"unexpected UNet resnet key {key}")
        out[f"{ldm_prefix}{names[module]}.{param}"] = value
    return out


def _copy_prefix(diffusers_prefix: str, ldm_prefix: str, state: Mapping[str, torch.Tensor]) -> StateDict:
    """Sub-modules whose names are the same in both layouts (Transformer2DModel ↔ SpatialTransformer)."""
    return {
        ldm_prefix + key[len(diffusers_prefix) :]: value
        for key, value in state.items()
        if key.startswith(diffusers_prefix)
    }


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """A diffusers UNet2DConditionModel state dict → SGM ``model.diffusion_model.*`` keys."""
    layers = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    out: StateDict = {}
    direct = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    for diffusers_name, ldm_name in direct.items():
        out.update(_copy_prefix(f"{diffusers_name}.", f"{ldm_name}.", state))

    # Down path: input_blocks.1.. hold (resnet[, attention]) per layer, then a downsampler per level.
    index = 1
    for level in range(levels):
        for layer in range(layers):
            out.update(_resnet_unet(f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0.", state))
            out.update(_copy_prefix(f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1.", state))
            index += 1
        if f"down_blocks.{level}.downsamplers.0.conv.weight" in state:
            out.update(_copy_prefix(f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", state))
            index += 1

    out.update(_resnet_unet("mid_block.resnets.0.", "middle_block.0.", state))
    out.update(_copy_prefix("mid_block.attentions.0.", "middle_block.1.", state))
    out.update(_resnet_unet("mid_block.resnets.1.", "middle_block.2.", state))

    # Up path: output_blocks hold layers+1 (resnet[, attention][, upsampler]) per level.
    for level in range(levels):
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            out.update(_resnet_unet(f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0.", state))
            has_attention = f"up_blocks.{level}.attentions.{layer}.proj_in.weight" in state
            if has_attention:
                out.update(_copy_prefix(f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1.", state))
            if layer == layers and f"up_blocks.{level}.upsamplers.0.conv.weight" in state:
                slot = 2 if has_attention else 1
                out.update(
                    _copy_prefix(f"up_blocks.{level}.upsamplers.0.conv.", f"output_blocks.{index}.{slot}.conv.", state)
                )
    _check_complete("UNet", state, out)
    return {UNET_PREFIX + key: value for key, value in out.items()}


def _resnet_vae(diffusers_prefix: str, ldm_prefix: str, state: Mapping[str, torch.Tensor]) -> StateDict:
    out: StateDict = {}
    for key, value in state.items():
        if key.startswith(diffusers_prefix):
            rest = key[len(diffusers_prefix) :].replace("conv_shortcut", "nin_shortcut")
            out[ldm_prefix + rest] = value
    return out


def _attention_vae(diffusers_prefix: str, ldm_prefix: str, state: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers Attention (linear q/k/v/out) → ldm AttnBlock (1×1 convs)."""
    names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: StateDict = {}
    for key, value in state.items():
        if not key.startswith(diffusers_prefix):
            continue
        module, _, param = key[len(diffusers_prefix) :].rpartition(".")
        if module not in names:
            raise KeyError(f"unexpected VAE attention key {key}")
        if module != "group_norm" and param == "weight":
            value = value[:, :, None, None]
        out[f"{ldm_prefix}{names[module]}.{param}"] = value
    return out


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """A diffusers AutoencoderKL state dict → ``first_stage_model.*`` keys."""
    levels = len(config["block_out_channels"])
    out: StateDict = {}
    for part in ("encoder", "decoder"):
        out.update(_copy_prefix(f"{part}.conv_in.", f"{part}.conv_in.", state))
        out.update(_copy_prefix(f"{part}.conv_out.", f"{part}.conv_out.", state))
        out.update(_copy_prefix(f"{part}.conv_norm_out.", f"{part}.norm_out.", state))
        out.update(_resnet_vae(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", state))
        out.update(_resnet_vae(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", state))
        out.update(_attention_vae(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", state))
    for name in ("quant_conv", "post_quant_conv"):
        out.update(_copy_prefix(f"{name}.", f"{name}.", state))
    for level in range(levels):
        out.update(_resnet_vae(f"encoder.down_blocks.{level}.resnets.", f"encoder.down.{level}.block.", state))
        out.update(
            _copy_prefix(
                f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                f"encoder.down.{level}.downsample.conv.",
                state,
            )
        )
        # The decoder's up blocks are numbered from the lowest resolution in diffusers, the highest in ldm.
        ldm_level = levels - 1 - level
        out.update(_resnet_vae(f"decoder.up_blocks.{level}.resnets.", f"decoder.up.{ldm_level}.block.", state))
        out.update(
            _copy_prefix(
                f"decoder.up_blocks.{level}.upsamplers.0.conv.",
                f"decoder.up.{ldm_level}.upsample.conv.",
                state,
            )
        )
    _check_complete("VAE", state, out)
    return {VAE_PREFIX + key: value for key, value in out.items()}


def clip_l_to_original(state: Mapping[str, torch.Tensor]) -> StateDict:
    """CLIPTextModel → ``conditioner.embedders.0.transformer.text_model.*`` (HF layout kept).

    transformers ≥ 5.6 flattened CLIPTextModel (no ``text_model.`` level in its state dict); the
    checkpoint layout always has it, as real files do.
    """
    out: StateDict = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[CLIP_L_PREFIX + name] = value
    return out


def openclip_g_to_original(state: Mapping[str, torch.Tensor], prefix: str = OPENCLIP_G_PREFIX) -> StateDict:
    """CLIPTextModelWithProjection → open_clip keys (fused in_proj, transposed text_projection)."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    out: StateDict = {
        "positional_embedding": state["embeddings.position_embedding.weight"],
        "token_embedding.weight": state["embeddings.token_embedding.weight"],
        "ln_final.weight": state["final_layer_norm.weight"],
        "ln_final.bias": state["final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layer_ids = sorted({int(key.split(".")[2]) for key in state if key.startswith("encoder.layers.")})
    for i in layer_ids:
        src = f"encoder.layers.{i}."
        dst = f"transformer.resblocks.{i}."
        attn = src + "self_attn."
        out[dst + "attn.in_proj_weight"] = torch.cat([state[attn + f"{p}_proj.weight"] for p in ("q", "k", "v")], dim=0)
        out[dst + "attn.in_proj_bias"] = torch.cat([state[attn + f"{p}_proj.bias"] for p in ("q", "k", "v")], dim=0)
        for param in ("weight", "bias"):
            out[f"{dst}attn.out_proj.{param}"] = state[f"{attn}out_proj.{param}"]
            out[f"{dst}ln_1.{param}"] = state[f"{src}layer_norm1.{param}"]
            out[f"{dst}ln_2.{param}"] = state[f"{src}layer_norm2.{param}"]
            out[f"{dst}mlp.c_fc.{param}"] = state[f"{src}mlp.fc1.{param}"]
            out[f"{dst}mlp.c_proj.{param}"] = state[f"{src}mlp.fc2.{param}"]
    # Each layer's six q/k/v tensors become two fused ones.
    if len(out) != len(state) - 4 * len(layer_ids) - sum(k.endswith("position_ids") for k in state):
        raise RuntimeError(f"OpenCLIP key mapping is incomplete: {len(out)} keys from {len(state)}")
    return {prefix + key: value for key, value in out.items()}


def sdxl_to_original(
    *,
    unet: Any,  # diffusers models: their `config` is a FrozenDict torch does not know of
    vae: Any,
    text_encoder_2: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
) -> StateDict:
    """A whole SDXL pipeline's modules → one original-layout state dict (contiguous, unshared copies).

    With ``text_encoder`` None (a refiner) OpenCLIP-G goes under ``conditioner.embedders.0.model.``.
    """
    state: StateDict = {}
    state.update(unet_to_original(unet.state_dict(), unet.config))
    state.update(vae_to_original(vae.state_dict(), vae.config))
    if text_encoder is not None:
        state.update(clip_l_to_original(text_encoder.state_dict()))
        state.update(openclip_g_to_original(text_encoder_2.state_dict(), OPENCLIP_G_PREFIX))
    else:
        state.update(openclip_g_to_original(text_encoder_2.state_dict(), REFINER_OPENCLIP_G_PREFIX))
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


__all__ = [
    "clip_l_to_original",
    "openclip_g_to_original",
    "sdxl_to_original",
    "unet_to_original",
    "vae_to_original",
]
