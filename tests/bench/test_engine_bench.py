"""Engine overhead: LocalEngineClient (child process, pipe, Runner, PNG + parameters) against a
bare in-process diffusers loop doing the same jobs on the tiny model at 256².

Run: .venv/bin/pytest -m bench tests/bench/test_engine_bench.py -s

Both sides: base → refiner ensemble (denoising_end/start = engine.high_noise_frac), DPM++ 2M
Karras, the same steps, cfg and seeds, fp32 on the CPU, the same torch thread count. Blocks of
jobs alternate between the two sides so that load from elsewhere on the machine hits both alike.
The engine is measured two ways:

- sequential: one job at a time, the next submitted when the previous Result arrived (what the
  bot's scheduler does with one slot): pays the hand-over (encode, pipe, event loop) per job;
- slots: the next job submitted as soon as `health()` shows the slot free, which it is once a job
  is computed (its images are then encoded in a thread while the next job runs);
- pipelined: the whole block submitted at once (the worker queues it).

Printed: images/s of each side, the ratios (goal ≥ 0.97), the engine's start-up (spawn → ready)
and the worker's median idle gap between consecutive jobs.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings, load_settings
from engine.client import LocalEngineClient
from engine.protocol import JobStats
from engine.spec import Progress, Result, Text2Img

pytestmark = pytest.mark.bench

SIZE = 256
STEPS = 20
CFG = 7.0
THREADS = 1
BLOCK = 4
ROUNDS = 6
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"


def bench_settings(directory: Path, model_dir: Path) -> Settings:
    engine = {
        "device": "cpu",
        "dtype": "fp32",
        "torch_threads": THREADS,
        "preview_every": 0,  # the bare loop makes no previews either
        "channels_last": False,  # plain diffusers on both sides: measure the plumbing, not tuning
        "start_timeout": 600,
    }
    lines = ["[engine]", *(f"{key} = {json.dumps(value)}" for key, value in engine.items())]
    lines += [
        "[models.tiny]",
        f"base = {json.dumps(str(model_dir / 'base'))}",
        f"refiner = {json.dumps(str(model_dir / 'refiner'))}",
        "default = true",
    ]
    path = directory / "atelier.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_CONFIG", str(path))
        return load_settings()


class BareLoop:
    """What a script using diffusers directly would do for the same jobs."""

    def __init__(self, model_dir: Path, high_noise_frac: float) -> None:
        import torch
        from diffusers import (
            DPMSolverMultistepScheduler,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLPipeline,
        )
        from diffusers.utils import logging as diffusers_logging

        torch.set_num_threads(THREADS)
        diffusers_logging.disable_progress_bar()
        options: dict[str, Any] = {"torch_dtype": torch.float32, "local_files_only": True, "use_safetensors": True}
        self.base = StableDiffusionXLPipeline.from_pretrained(str(model_dir / "base"), **options)
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(model_dir / "refiner"),
            text_encoder_2=self.base.text_encoder_2,
            vae=self.base.vae,
            **options,
        )
        for pipe in (self.base, self.refiner):
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.base.scheduler.config)
        self.scheduler_class = DPMSolverMultistepScheduler
        self.frac = high_noise_frac
        self.torch = torch

    def run(self, seed: int) -> Any:
        scheduler_options = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
        self.base.scheduler = self.scheduler_class.from_config(self.scheduler_config, **scheduler_options)
        self.refiner.scheduler = self.scheduler_class.from_config(self.scheduler_config, **scheduler_options)
        generator = self.torch.Generator("cpu").manual_seed(seed)
        common = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": STEPS, "guidance_scale": CFG}
        with self.torch.inference_mode():
            latents = self.base(
                **common,
                width=SIZE,
                height=SIZE,
                denoising_end=self.frac,
                output_type="latent",
                generator=generator,
            ).images
            return self.refiner(**common, image=latents, denoising_start=self.frac, generator=generator).images[0]


def job(job_id: str, seed: int) -> Text2Img:
    return Text2Img(
        job_id=job_id,
        prompt=PROMPT,
        negative=NEGATIVE,
        steps=STEPS,
        cfg=CFG,
        seed=seed,
        width=SIZE,
        height=SIZE,
        sampler="dpmpp_2m_karras",
        refiner=True,
    )


async def result_of(client: LocalEngineClient, spec: Text2Img) -> Result:
    async for item in client.submit(spec):
        if isinstance(item, Result):
            return item
        assert isinstance(item, Progress)
    raise AssertionError("no result")


async def engine_sequential(client: LocalEngineClient, name: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    for index, seed in enumerate(seeds):
        await result_of(client, job(f"{name}-{index}", seed))
    return time.perf_counter() - started


async def engine_slots(client: LocalEngineClient, name: str, seeds: list[int]) -> float:
    """Like the bot's scheduler: submit the next job as soon as `health()` shows a free slot (a job
    stops holding the slot once computed, while its images are encoded)."""

    async def consume(stream: Any) -> None:
        async for item in stream:
            if isinstance(item, Result):
                return

    started = time.perf_counter()
    consumers = []
    for index, seed in enumerate(seeds):
        while True:
            if client.health().busy < client.slots:
                break
            await asyncio.sleep(0.001)
        consumers.append(asyncio.create_task(consume(client.submit(job(f"{name}-{index}", seed)))))
    await asyncio.gather(*consumers)
    return time.perf_counter() - started


async def engine_pipelined(client: LocalEngineClient, name: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(result_of(client, job(f"{name}-{index}", seed)) for index, seed in enumerate(seeds)))
    return time.perf_counter() - started


def bare(loop: BareLoop, seeds: list[int]) -> float:
    started = time.perf_counter()
    for seed in seeds:
        loop.run(seed)
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Settings:
    return bench_settings(tmp_path_factory.mktemp("bench-config"), tiny_model_dir)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


class InProcessRunner:
    """The engine's own Runner called directly: isolates the cost of the process, pipe and encoding."""

    def __init__(self, settings: Settings) -> None:
        from engine.models import ModelRegistry
        from engine.pipelines import Runner

        registry = ModelRegistry(settings.models, settings.engine)
        registry.get(settings.default_model)
        self.runner = Runner(registry, settings.engine, settings.generation)

    def block(self, seeds: list[int]) -> float:
        started = time.perf_counter()
        for index, seed in enumerate(seeds):
            self.runner.run(job(f"inproc-{index}", seed), on_progress=lambda _: None, cancelled=lambda: False)
        return time.perf_counter() - started


SIDES = ("bare", "runner", "sequential", "slots", "pipelined")
ENGINE_MODES = {"sequential": engine_sequential, "slots": engine_slots, "pipelined": engine_pipelined}


async def test_engine_throughput_against_bare_diffusers(settings: Settings, tiny_model_dir: Path) -> None:
    client = LocalEngineClient(settings)
    await client.start()
    startup, ready = client.startup_seconds, client.ready_info
    assert startup is not None and ready is not None
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    stats: dict[str, list[JobStats]] = {mode: [] for mode in ENGINE_MODES}
    try:
        loop = BareLoop(tiny_model_dir, settings.engine.high_noise_frac)
        in_process = InProcessRunner(settings)
        # Warm every side (first calls pay lazy initialisation).
        bare(loop, [1, 2])
        in_process.block([1, 2])
        await engine_sequential(client, "warm", [1, 2])
        for round_index in range(ROUNDS):
            seeds = [1000 * round_index + i for i in range(BLOCK)]
            shift = round_index % len(SIDES)  # rotate the order so no side always follows another
            for side in SIDES[shift:] + SIDES[:shift]:
                if side == "bare":
                    times[side].append(bare(loop, seeds))
                elif side == "runner":
                    times[side].append(in_process.block(seeds))
                else:
                    client.stats.clear()
                    times[side].append(await ENGINE_MODES[side](client, f"{side}{round_index}", seeds))
                    stats[side].extend(client.stats)
    finally:
        await client.close()

    rate = {side: BLOCK * ROUNDS / sum(values) for side, values in times.items()}
    gap = {
        side: statistics.median(s.idle_seconds for s in values if s.idle_seconds is not None)
        for side, values in stats.items()
    }
    compute = statistics.median(s.compute_seconds for s in stats["sequential"])
    encode = statistics.median(s.encode_seconds for s in stats["sequential"])
    print()
    print(f"tiny SDXL {SIZE}², {STEPS} steps base→refiner, DPM++ 2M Karras, torch threads {THREADS}")
    print(
        f"engine start-up (spawn → ready): {startup:.2f} s "
        f"(imports {ready.import_seconds:.2f} s, models {ready.load_seconds:.2f} s)"
    )
    for side in SIDES:
        blocks = ", ".join(f"{t:.2f}" for t in times[side])
        print(f"{side:>10}: {rate[side]:.3f} images/s   blocks of {BLOCK}: {blocks} s")
    for reference, label in (("bare", "bare diffusers"), ("runner", "in-process Runner (process + pipe + encoding)")):
        ratios = ", ".join(f"{mode} {rate[mode] / rate[reference]:.3f}" for mode in ENGINE_MODES)
        print(f"ratio engine/{label}: {ratios}")
    print("(goal ≥ 0.97)")
    print(
        f"Runner/bare (the pipeline code itself): {rate['runner'] / rate['bare']:.3f}; "
        f"worker per job: compute {ms(compute)}, encode {ms(encode)} (in a thread)"
    )
    gaps = ", ".join(f"{mode} {ms(gap[mode])}" for mode in ENGINE_MODES)
    print(f"median idle gap between consecutive jobs in the worker: {gaps}")
    assert all(value > 0 for value in rate.values())
