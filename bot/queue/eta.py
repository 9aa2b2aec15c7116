"""Queue ETAs from measured engine speed.

The engine reports the pure compute seconds of every finished job (``Result.compute_seconds``);
jobs are priced in cost units (``engine.cost``), so seconds per unit is one number that covers
every job kind and size. It drifts (model switches, thermal limits, another replica joining), so
it is an exponentially weighted moving average rather than a fixed benchmark.
"""

from __future__ import annotations

import math

__all__ = ["EtaEstimator"]


class EtaEstimator:
    """EWMA of engine seconds per cost unit.

    ``initial_rate`` is the guess used until the first measurement, which then replaces it;
    later measurements move the average by ``alpha``.
    """

    def __init__(self, *, initial_rate: float = 10.0, alpha: float = 0.2) -> None:
        if not (initial_rate > 0 and math.isfinite(initial_rate)):
            raise ValueError("initial_rate must be a positive number")
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.rate = initial_rate
        self.alpha = alpha
        self.samples = 0

    def observe(self, cost: float, seconds: float) -> None:
        """Record that a job of ``cost`` units took ``seconds``; nonsense samples are ignored."""
        if not (cost > 0 and seconds > 0 and math.isfinite(cost) and math.isfinite(seconds)):
            return
        sample = seconds / cost
        self.rate = sample if self.samples == 0 else self.alpha * sample + (1 - self.alpha) * self.rate
        self.samples += 1

    def seconds_for(self, cost: float) -> float:
        return max(0.0, cost) * self.rate

    def eta(
        self,
        *,
        cost_ahead: float,
        running_remaining: float = 0.0,
        own_cost: float = 0.0,
        slots: int = 1,
    ) -> float:
        """Seconds until a job is done: the work ahead of it (queued ``cost_ahead`` plus what is
        left of the running jobs) shared over ``slots``, then its own ``own_cost``."""
        ahead = max(0.0, cost_ahead) + max(0.0, running_remaining)
        return (ahead / max(1, slots) + max(0.0, own_cost)) * self.rate
