"""The options members set, with their ranges, defaults and labels: the one place they are written.

The slash commands' ranges, the checks on every job, the operator's settings and the PNG metadata
all read them from here. A leaf module (it imports nothing), so config/ may read it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Range(Generic[N]):
    """An option's bounds (inclusive) and the default used when a member leaves it out."""

    low: N
    high: N
    default: N

    def __contains__(self, value: object) -> bool:
        return isinstance(value, int | float) and self.low <= value <= self.high


# Sampler id → the name members (and A1111's metadata readers) know it by; the first is the default.
SAMPLER_LABELS: dict[str, str] = {
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "euler_a": "Euler a",
    "euler": "Euler",
    "ddim": "DDIM",
    "unipc": "UniPC",
    "dpmpp_sde_karras": "DPM++ SDE Karras",
}
SAMPLERS: tuple[str, ...] = tuple(SAMPLER_LABELS)
DEFAULT_SAMPLER = SAMPLERS[0]
# The few-step schedulers a model's draft adapter may need (`draft_sampler` in [models.<name>]):
# the operator picks the one its adapter was trained for; draft jobs run it, members never pick it.
DRAFT_SAMPLER_LABELS: dict[str, str] = {
    "euler_trailing": "Euler trailing",  # SDXL-Lightning, Hyper-SD
    "lcm": "LCM",  # LCM-LoRA
    "tcd": "TCD",  # TCD-LoRA, Hyper-SD one-step
}
DRAFT_SAMPLERS: tuple[str, ...] = tuple(DRAFT_SAMPLER_LABELS)

STEPS = Range(1, 60, 30)
CFG = Range(1.0, 20.0, 7.0)
COUNT = Range(1, 4, 1)
STRENGTH = Range(0.05, 1.0, 0.6)  # each image kind has its own default (refine 0.3, edit 0.9, …)
MAX_SEED = 2**32 - 1
SEED = Range(0, MAX_SEED, 0)
PROMPT_CHARS = Range(1, 1500, 1500)  # the contract's 1–1500; operators may lower the limit
# LoRAs on one job (the `lora` option, a style's and the member's together) and their weights;
# the default weight is each LoRA's own `weight` in the operator's config (this one when unset).
MAX_LORAS = 3
LORA_WEIGHT = Range(0.0, 2.0, 1.0)

# ControlNet: the modes an operator may configure (`[controlnets.<mode>]`), in the order offered,
# and the A1111 ControlNet "Module" each one's own annotator is (`none` for a map given as is).
CONTROL_MODULES: dict[str, str] = {"edges": "canny", "depth": "depth", "pose": "openpose"}
CONTROL_MODES: tuple[str, ...] = tuple(CONTROL_MODULES)
DEFAULT_CONTROL_MODE = "edges"
CONTROL_STRENGTH = Range(0.0, 2.0, 0.8)
# The share of the schedule the ControlNet steers, from its start: the layout is set in the first
# steps and the last fifth only adds detail, which a ControlNet tends to stamp its map into
# (haloed edges); the same split as the base → refiner hand-off (engine.high_noise_frac).
CONTROL_GUIDANCE_START = Range(0.0, 1.0, 0.0)
CONTROL_GUIDANCE_END = Range(0.0, 1.0, 0.8)

__all__ = [
    "CFG",
    "CONTROL_GUIDANCE_END",
    "CONTROL_GUIDANCE_START",
    "CONTROL_MODES",
    "CONTROL_MODULES",
    "CONTROL_STRENGTH",
    "COUNT",
    "DEFAULT_CONTROL_MODE",
    "DEFAULT_SAMPLER",
    "DRAFT_SAMPLERS",
    "DRAFT_SAMPLER_LABELS",
    "LORA_WEIGHT",
    "MAX_LORAS",
    "MAX_SEED",
    "PROMPT_CHARS",
    "SAMPLERS",
    "SAMPLER_LABELS",
    "SEED",
    "STEPS",
    "STRENGTH",
    "Range",
]
