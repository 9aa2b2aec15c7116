"""The six samplers users can pick, as diffusers schedulers.

`make_scheduler(name, config)` builds a NEW scheduler from a pipeline's scheduler config on every
call. Schedulers are stateful (step index, multistep history), so each pipeline call gets its own
instance and the model's shared pipeline is never touched: two jobs never share one.

The config keeps what the model defines (prediction type, betas, training timesteps); each sampler
then sets explicitly what makes it that sampler, so a model shipped with, say, a Karras DPM config
still gets plain Euler when the user asks for `euler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    TCDScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.options import DRAFT_SAMPLERS, SAMPLERS

_NO_SIGMA_SCHEDULE = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

# name → (scheduler class, settings that define the sampler on top of the model's config)
_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    # A1111 "DPM++ 2M Karras".
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {**_NO_SIGMA_SCHEDULE, "algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, dict(_NO_SIGMA_SCHEDULE)),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, dict(_NO_SIGMA_SCHEDULE)),
    # "DPM++ SDE Karras" as the stochastic DPM-Solver++ (A1111 "DPM++ 2M SDE Karras"). diffusers'
    # DPMSolverSDEScheduler is NOT used on purpose: it needs torchsde, and it draws its Brownian noise
    # from one `noise_sampler_seed` for the whole batch (random when unset) instead of the per-image
    # generators, so image i of a batch could not be reproduced alone with seed+i. This one takes its
    # noise from the pipeline's per-image generators: deterministic and batch-reproducible.
    "dpmpp_sde_karras": (
        DPMSolverMultistepScheduler,
        {
            **_NO_SIGMA_SCHEDULE,
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 2,
            "use_karras_sigmas": True,
        },
    ),
}

assert tuple(_SAMPLERS) == SAMPLERS, "engine.samplers and engine.options.SAMPLERS disagree"

# Draft mode's few-step schedulers, as the adapters' model cards set them up (never offered to
# members: a model's `draft_sampler` names the one its adapter was trained for).
_DRAFT_SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    # SDXL-Lightning (and Hyper-SD's multi-step LoRAs): Euler on trailing timesteps.
    "euler_trailing": (EulerDiscreteScheduler, {**_NO_SIGMA_SCHEDULE, "timestep_spacing": "trailing"}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}

assert tuple(_DRAFT_SAMPLERS) == DRAFT_SAMPLERS, "engine.samplers and engine.options.DRAFT_SAMPLERS disagree"


def make_scheduler(name: str, config: Mapping[str, Any]) -> SchedulerMixin:
    """A fresh scheduler for sampler `name` (a member's, or a draft adapter's), built from a
    model's scheduler `config` (`pipe.scheduler.config`). Raises ValueError for an unknown name."""
    try:
        cls, settings = _SAMPLERS[name] if name in _SAMPLERS else _DRAFT_SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None
    return cls.from_config(dict(config), **settings)


__all__ = ["make_scheduler"]
