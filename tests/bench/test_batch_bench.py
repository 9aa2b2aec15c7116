"""Batching same-shape jobs on the CPU, tiny model (run with ``pytest -m bench``): the same jobs
run one after another, as batches of 2 and as one batch of 4 (`Runner.run_batch`, what the
scheduler sends when `[engine] max_batch` allows), in this process, one torch thread.

Each round runs every side once, in a rotating order, on 4 fresh jobs (their own prompts,
negatives and seeds, so the prompt cache never hits); a side's figure is images per second of
its median round, and each ratio is the median over rounds of `sequential ÷ side` within the
round (the machine is shared: ratios within a round cancel most of its noise). With exact
batches (the default: the UNet per image, every image bit-identical to its job alone) a batch
saves the per-call work around the UNet; `exact_batches=False` (one batched UNet call) is shown
beside it. On a GPU the same figures come from scripts/gpu-bench (section "batch").
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from config.settings import EngineSettings, GenerationSettings
from engine.jobs import Text2Img
from engine.models import ModelRegistry
from engine.pipelines import Runner
from tests.bench import report

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("ATELIER_BENCH_BATCH_ROUNDS", "6"))
JOBS = 4
SIZE, STEPS = 256, 8


def jobs(tag: str, n: int) -> list[Text2Img]:
    return [
        Text2Img(
            job_id=f"{tag}-{i}",
            prompt=f"a lighthouse at dusk, study {tag} {i}",
            negative=f"blurry, draft {tag} {i}",
            seed=1000 + i,
            width=SIZE,
            height=SIZE,
            steps=STEPS,
        )
        for i in range(n)
    ]


def test_batches_against_sequential(tiny_model_dir: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = {
        "tiny": {"base": str(tiny_model_dir / "base"), "refiner": str(tiny_model_dir / "refiner"), "default": True}
    }
    engine = EngineSettings(device="cpu", preview_every=0)
    registry = ModelRegistry(models, engine)
    exact = Runner(registry, engine, GenerationSettings())
    fast = Runner(registry, engine, GenerationSettings(), exact_batches=False)

    def quiet(runner: Runner, batch: list[Text2Img]) -> None:
        if len(batch) == 1:
            runner.run(batch[0], on_progress=lambda _p: None, cancelled=lambda: False)
        else:
            runner.run_batch(batch, on_progress=lambda _p: None, cancelled=lambda _j: False)

    def side(runner: Runner, size: int) -> Callable[[list[Text2Img]], None]:
        def run(block: list[Text2Img]) -> None:
            for start in range(0, len(block), size):
                quiet(runner, block[start : start + size])

        return run

    sides = {
        "sequential": side(exact, 1),
        "batch 2": side(exact, 2),
        "batch 4": side(exact, 4),
        "batch 4, exact_batches=False": side(fast, 4),
    }
    try:
        side(exact, 1)(jobs("warm", 2))
        side(exact, 2)(jobs("warm2", 2))
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        load = [os.getloadavg()[0]]
        for r in range(ROUNDS):
            names = list(sides)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                block = jobs(f"r{r}-{name}", JOBS)
                started = time.perf_counter()
                sides[name](block)
                seconds[name].append(time.perf_counter() - started)
        load.append(os.getloadavg()[0])
    finally:
        torch.set_num_threads(threads)
        registry.unload()

    base = seconds["sequential"]
    lines = [f"{'side':<30} {'images/s':>9} {'÷ sequential':>13}  rounds"]
    for name, values in seconds.items():
        ratios = [b / v for b, v in zip(base, values, strict=True)]
        rate = JOBS / statistics.median(values)
        ratio = statistics.median(ratios)
        lines.append(f"{name:<30} {rate:>9.2f} {ratio:>13.3f}  {min(ratios):.2f}–{max(ratios):.2f}")
        if name != "sequential":
            report.record(
                "batching",
                f"{name} ÷ sequential, same {JOBS} jobs, tiny model {SIZE}², {STEPS} steps, CPU",
                f"{ratio:.3f} (rounds {min(ratios):.2f}–{max(ratios):.2f})",
            )
    lines.append(f"load average {load[0]:.1f} → {load[1]:.1f}, {ROUNDS} rounds")
    print("\n\nbatches against sequential (Runner in-process, one torch thread)\n" + "\n".join(lines))
    assert all(v > 0 for values in seconds.values() for v in values)
