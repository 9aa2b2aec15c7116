"""LoRAs: a LoRA job through the engine against bare diffusers with the same LoRA, and what
switching between two LoRA sets costs against loading them from disk, on the tiny model.

Run: .venv/bin/pytest -m bench tests/bench/test_lora_bench.py -s

Throughput (the engine bench's method, tests/bench/test_engine_bench.py): base alone at 256²,
20 steps, DPM++ 2M Karras, the kohya-format tiny LoRA (UNet and both text encoders) at 0.8, fp32
on the CPU with one torch thread. Each job has a prompt and negative of its own, so neither side
is measuring a prompt cache.

- bare: a script on diffusers: `load_lora_weights` once, `set_adapters([...], [0.8])`, then
  `pipe(...)` per image;
- engine: the engine client (worker process, pipe, Runner, LoRA manager, PNG + parameters),
  dispatched as the bot's scheduler does (tests/bench/dispatch.py).

Blocks alternate between the sides in a rotating order; the ratio is the median over rounds of
the ratio between blocks of the same round.

Switching: in one process, the Runner's LoRA manager on a loaded model, between {tiny-style 0.8}
and {tiny-style-diffusers 1.0}: the median time of a switch while both stay loaded
(`set_adapters`), against a switch that must read the LoRA from disk (a cache of 0 MB).
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings, load_settings
from engine.api import Result
from engine.client import LocalEngineClient
from engine.jobs import Text2Img
from engine.jobs.events import Progress
from engine.styles import Catalog
from engine.tiny_addons import LORA_KOHYA, tiny_styling
from tests.bench import report
from tests.bench.dispatch import dispatch_block
from tests.bench.test_engine_bench import CFG, SIZE, STEPS, bench_settings, ms
from tests.bench.test_engine_bench import job as engine_bench_job

pytestmark = pytest.mark.bench

THREADS = 1
BLOCK = 4
ROUNDS = 6
WEIGHT = 0.8
LORA = "tiny-style"
SWITCHES = 40


def texts(side: str, seed: int) -> tuple[str, str]:
    return f"a lighthouse on a cliff at dusk, oil painting, study {side} {seed}", f"blurry, draft {side} {seed}"


def lora_settings(directory: Path, model_dir: Path) -> Settings:
    """The engine bench's settings with the tiny LoRAs, and the model without its refiner (LoRAs
    are for the base; the bare side runs the base alone too)."""
    data = bench_settings(directory, model_dir).model_dump()
    data["models"] = {name: {**model, "refiner": ""} for name, model in data["models"].items()}
    data["loras"] = tiny_styling(model_dir)["loras"]
    return load_settings(**data)


class BareLoop:
    """A diffusers script with one LoRA."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLPipeline
        from diffusers.utils import logging as diffusers_logging

        torch.set_num_threads(THREADS)
        diffusers_logging.disable_progress_bar()
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            str(model_dir / "base"), torch_dtype=torch.float32, local_files_only=True, use_safetensors=True
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.load_lora_weights(str(model_dir / LORA_KOHYA), adapter_name="style")
        self.pipe.set_adapters(["style"], adapter_weights=[WEIGHT])
        self.config = dict(self.pipe.scheduler.config)
        self.scheduler = DPMSolverMultistepScheduler
        self.torch = torch

    def run(self, seed: int, prompt: str, negative: str) -> Any:
        options = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
        self.pipe.scheduler = self.scheduler.from_config(self.config, **options)
        with self.torch.inference_mode():
            return self.pipe(
                prompt=prompt,
                negative_prompt=negative,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                width=SIZE,
                height=SIZE,
                generator=self.torch.Generator("cpu").manual_seed(seed),
            ).images[0]


def job(side: str, index: int, seed: int) -> Text2Img:
    return engine_bench_job(side, index, seed, words=texts, refiner=False, loras=((LORA, WEIGHT),))


async def result_of(client: LocalEngineClient, spec: Text2Img) -> Result:
    async for item in client.submit(spec):
        if isinstance(item, Result):
            return item
        assert isinstance(item, Progress)
    raise AssertionError("no result")


def bare(loop: BareLoop, name: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    for seed in seeds:
        loop.run(seed, *texts(name, seed))
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Settings:
    return lora_settings(tmp_path_factory.mktemp("lora-bench"), tiny_model_dir)


async def test_lora_job_through_the_engine_against_bare_diffusers(settings: Settings, tiny_model_dir: Path) -> None:
    client = LocalEngineClient(settings)
    await client.start()
    times: dict[str, list[float]] = {"bare": [], "engine": []}
    try:
        loop = BareLoop(tiny_model_dir)
        bare(loop, "warm-bare", [1, 2])
        for index, seed in enumerate([1, 2]):
            await result_of(client, job("warm", index, seed))
        for round_index in range(ROUNDS):
            seeds = [1000 * round_index + i for i in range(BLOCK)]
            order = ("bare", "engine") if round_index % 2 == 0 else ("engine", "bare")
            for side in order:
                if side == "bare":
                    times[side].append(bare(loop, side, seeds))
                else:
                    block = (job(side, index, seed) for index, seed in enumerate(seeds))
                    times[side].append(await dispatch_block(client, block))
    finally:
        await client.close()
    ratios = [reference / own for reference, own in zip(times["bare"], times["engine"], strict=True)]
    ratio = statistics.median(ratios)
    rates = {side: BLOCK / statistics.median(values) for side, values in times.items()}
    print()
    print(
        f"tiny SDXL {SIZE}², {STEPS} steps, base alone, LoRA {LORA} at {WEIGHT} (UNet + both text encoders), "
        f"torch threads {THREADS}, {ROUNDS} rounds × {BLOCK} images; {os.cpu_count()} CPUs"
    )
    for side, values in times.items():
        print(f"{side:>7}: {rates[side]:.3f} images/s; blocks {', '.join(f'{t:.2f}' for t in values)} s")
    print(f"engine ÷ bare: {ratio:.3f} (rounds {min(ratios):.2f}–{max(ratios):.2f}); goal ≥ 0.97")
    shown = f"{ratio:.3f} ({min(ratios):.2f}–{max(ratios):.2f})"
    report.record("loras", "LoRA job: engine client ÷ bare diffusers", shown, "≥ 0.97", ratio >= 0.97)
    assert all(rate > 0 for rate in rates.values())


def test_switching_lora_sets_against_loading_them(settings: Settings, tiny_model_dir: Path) -> None:
    import torch

    from engine.loras import LoraManager
    from engine.models import ModelRegistry

    torch.set_num_threads(THREADS)
    registry = ModelRegistry(settings.models, settings.engine)
    model = registry.get(settings.default_model)
    catalog = Catalog.from_settings(settings)
    # Disjoint sets, so that without a cache every switch reads a file.
    sets = [((LORA, WEIGHT),), (("tiny-style-diffusers", 1.0),)]

    def switches(manager: LoraManager) -> list[float]:
        manager.activate(model, sets[1])  # both loaded (or not) before the first timed switch
        seconds = []
        for i in range(SWITCHES):
            started = time.perf_counter()
            manager.activate(model, sets[i % 2])
            seconds.append(time.perf_counter() - started)
        return seconds

    kept = LoraManager(catalog, 1024)
    warm = switches(kept)
    kept_loads = kept.loads
    cold_manager = LoraManager(catalog, 0)  # nothing stays: every switch reads its files again
    cold = switches(cold_manager)
    switch, load = statistics.median(warm), statistics.median(cold)
    print()
    print(
        f"switching between two LoRA sets on the tiny model ({SWITCHES} switches each): kept loaded "
        f"{ms(switch)} (files read {kept_loads}), read from disk {ms(load)} (files read {cold_manager.loads}); "
        f"{load / switch:.0f}× faster"
    )
    report.record("loras", "switch between two LoRA sets (kept loaded)", ms(switch))
    report.record("loras", "the same switch reading the LoRAs from disk", ms(load))
    assert kept_loads == 2  # each file once
    assert cold_manager.loads >= SWITCHES
    assert switch < load
