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

STEPS = Range(1, 60, 30)
CFG = Range(1.0, 20.0, 7.0)
COUNT = Range(1, 4, 1)
STRENGTH = Range(0.05, 1.0, 0.6)  # each image kind has its own default (refine 0.3, edit 0.9, …)
MAX_SEED = 2**32 - 1
SEED = Range(0, MAX_SEED, 0)
PROMPT_CHARS = Range(1, 1500, 1500)  # the contract's 1–1500; operators may lower the limit

__all__ = [
    "CFG",
    "COUNT",
    "DEFAULT_SAMPLER",
    "MAX_SEED",
    "PROMPT_CHARS",
    "SAMPLERS",
    "SAMPLER_LABELS",
    "SEED",
    "STEPS",
    "STRENGTH",
    "Range",
]
