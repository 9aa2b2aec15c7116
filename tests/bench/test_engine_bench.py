"""Engine overhead: LocalEngineClient (child process, pipe, Runner, PNG + parameters) against a
bare in-process diffusers loop doing the same jobs on the tiny model at 256².

Run: .venv/bin/pytest -m bench tests/bench/test_engine_bench.py -s

Both sides: base → refiner ensemble (denoising_end/start = engine.high_noise_frac), DPM++ 2M
Karras, the same steps, cfg and seeds, fp32 on the CPU, the same torch thread count, the same
number of images. Blocks of jobs alternate between the sides (in a rotating order) so that load
from elsewhere on the machine hits all alike.

Every job of every side has a prompt and a negative of its own (`texts`): the engine keeps recent
prompt embeddings (engine.prompts), and a bench that repeated one prompt would measure that
cache instead of the encoding a new prompt costs. What is measured here is the engine's worst
case; rerolls and recurring negatives are cheaper.

Sides:

- bare: `pipe(...)` base → refiner on the same tiny model in the test process, no PNG;
- runner: the engine's Runner called in the test process (isolates the pipeline code);
- the engine client (worker process, pipe, Runner, PNG + parameters), driven three ways:
  - sequential: one job at a time, the next submitted when the previous Result arrived: pays the
    whole hand-over (PNG encoding, pipe, event loop) per job;
  - scheduler: bot/scheduler.py's rule (tests/bench/dispatch.py): a job frees its slot at its
    "encode" progress (its images are then encoded in a thread while the next job runs) and one
    more job waits ahead in the worker (`prefetch`), so the next compute starts at once;
  - pipelined: the whole block submitted at once (the worker queues it).

Printed: images/s of each side, the ratios to bare (goal ≥ 0.97), the engine's start-up
(spawn → ready) and the worker's median idle gap between consecutive jobs. Single blocks are
at the mercy of other work on the machine: see the statistics in the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings, load_settings
from engine.api import Result
from engine.client import LocalEngineClient
from engine.jobs import Text2Img
from engine.jobs.events import Progress
from engine.protocol import JobStats
from tests.bench import report
from tests.bench.dispatch import dispatch_block

pytestmark = pytest.mark.bench

SIZE = 256
STEPS = 20
CFG = 7.0
THREADS = 1
BLOCK = 4
ROUNDS = 8
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry"


def texts(side: str, seed: int) -> tuple[str, str]:
    """A prompt and negative never used by another job (same length and shape for every side)."""
    return f"{PROMPT}, study {side} {seed}", f"{NEGATIVE}, draft {side} {seed}"


def bench_settings(directory: Path, model_dir: Path, **engine_overrides: Any) -> Settings:
    """Settings for the tiny model on the CPU, one torch thread; `engine_overrides` change or add
    `[engine]` keys."""
    engine = {
        "device": "cpu",
        "dtype": "fp32",
        "torch_threads": THREADS,
        "preview_every": 0,  # the bare loop makes no previews either
        "channels_last": False,  # plain diffusers on both sides: measure the plumbing, not tuning
        "start_timeout": 600,
        **engine_overrides,
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

    def run(self, seed: int, prompt: str, negative: str) -> Any:
        scheduler_options = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
        self.base.scheduler = self.scheduler_class.from_config(self.scheduler_config, **scheduler_options)
        self.refiner.scheduler = self.scheduler_class.from_config(self.scheduler_config, **scheduler_options)
        generator = self.torch.Generator("cpu").manual_seed(seed)
        common = {"prompt": prompt, "negative_prompt": negative, "num_inference_steps": STEPS, "guidance_scale": CFG}
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


def job(
    side: str, index: int, seed: int, *, words: Callable[[str, int], tuple[str, str]] | None = None, **fields: Any
) -> Text2Img:
    """The benches' text2img job: its own prompt and negative (`words`, default `texts`), 256²,
    20 steps, base → refiner; `fields` change the rest (a LoRA, a control image, no refiner)."""
    prompt, negative = (words or texts)(side, seed)
    defaults: dict[str, Any] = {
        "steps": STEPS,
        "cfg": CFG,
        "width": SIZE,
        "height": SIZE,
        "sampler": "dpmpp_2m_karras",
        "refiner": True,
    }
    return Text2Img(
        job_id=f"{side}-{index}-{seed}", prompt=prompt, negative=negative, seed=seed, **{**defaults, **fields}
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
        await result_of(client, job(name, index, seed))
    return time.perf_counter() - started


async def engine_scheduler(client: LocalEngineClient, name: str, seeds: list[int]) -> float:
    return await dispatch_block(client, (job(name, index, seed) for index, seed in enumerate(seeds)))


async def engine_pipelined(client: LocalEngineClient, name: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    await asyncio.gather(*(result_of(client, job(name, index, seed)) for index, seed in enumerate(seeds)))
    return time.perf_counter() - started


def bare(loop: BareLoop, name: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    for seed in seeds:
        loop.run(seed, *texts(name, seed))
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Settings:
    return bench_settings(tmp_path_factory.mktemp("bench-config"), tiny_model_dir)


def cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system, all threads) used so far by this process plus the engine worker
    `pid` (Linux /proc; this process alone elsewhere). Unlike wall time it hardly depends on what
    else runs on the machine, but it does not see a side waiting idle either."""
    own = sum(os.times()[:2])
    stat = Path(f"/proc/{pid}/stat")
    if pid is None or not stat.exists():
        return own
    fields = stat.read_text().rsplit(")", 1)[1].split()  # fields 14, 15: utime, stime in ticks
    return own + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    def block(self, name: str, seeds: list[int]) -> float:
        started = time.perf_counter()
        for index, seed in enumerate(seeds):
            self.runner.run(job(name, index, seed), on_progress=lambda _: None, cancelled=lambda: False)
        return time.perf_counter() - started


SIDES = ("bare", "runner", "sequential", "scheduler", "pipelined")
ENGINE_MODES = {"sequential": engine_sequential, "scheduler": engine_scheduler, "pipelined": engine_pipelined}


async def test_engine_throughput_against_bare_diffusers(settings: Settings, tiny_model_dir: Path) -> None:
    load_before = os.getloadavg()[0]
    client = LocalEngineClient(settings)
    await client.start()
    startup, ready = client.startup_seconds, client.ready_info
    assert startup is not None and ready is not None
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    cpu: dict[str, list[float]] = {side: [] for side in SIDES}
    stats: dict[str, list[JobStats]] = {mode: [] for mode in ENGINE_MODES}
    try:
        loop = BareLoop(tiny_model_dir, settings.engine.high_noise_frac)
        in_process = InProcessRunner(settings)
        # Warm every side (first calls pay lazy initialisation).
        bare(loop, "warm-bare", [1, 2])
        in_process.block("warm-runner", [1, 2])
        await engine_sequential(client, "warm", [1, 2])
        for round_index in range(ROUNDS):
            seeds = [1000 * round_index + i for i in range(BLOCK)]
            shift = round_index % len(SIDES)  # rotate the order so no side always follows another
            for side in SIDES[shift:] + SIDES[:shift]:
                cpu_before = cpu_seconds(client.pid)
                if side == "bare":
                    times[side].append(bare(loop, side, seeds))
                elif side == "runner":
                    times[side].append(in_process.block(side, seeds))
                else:
                    client.stats.clear()
                    times[side].append(await ENGINE_MODES[side](client, side, seeds))
                    stats[side].extend(client.stats)
                cpu[side].append(cpu_seconds(client.pid) - cpu_before)
    finally:
        await client.close()

    load_after = os.getloadavg()[0]
    # Other work on the machine makes single blocks several times slower than they should be
    # (seen: 1.7 s and 5.2 s for the same block). The statistics below resist that: a side's rate
    # comes from its median block, and each ratio is the median over rounds of the ratio between
    # blocks of the SAME round (run back to back, so they met similar load).
    rate = {side: BLOCK / statistics.median(values) for side, values in times.items()}

    def paired(side: str, reference: str) -> tuple[float, float, float]:
        ratios = [ref / own for ref, own in zip(times[reference], times[side], strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)

    gap = {
        side: statistics.median(s.idle_seconds for s in values if s.idle_seconds is not None)
        for side, values in stats.items()
    }
    compute = statistics.median(s.compute_seconds for s in stats["sequential"])
    encode = statistics.median(s.encode_seconds for s in stats["sequential"])
    print()
    print(
        f"tiny SDXL {SIZE}², {STEPS} steps base→refiner, DPM++ 2M Karras, torch threads {THREADS}, "
        f"{ROUNDS} rounds × {BLOCK} images per side; load average {load_before:.1f} → {load_after:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(
        f"engine start-up (spawn → ready): {startup:.2f} s "
        f"(imports {ready.import_seconds:.2f} s, models {ready.load_seconds:.2f} s)"
    )
    cpu_per_image = {side: sum(values) / (BLOCK * ROUNDS) for side, values in cpu.items()}
    print(f"{'side':>10}  images/s  ÷ bare (median, range of rounds)  CPU s/image  ÷ bare  blocks (s)")
    for side in SIDES:
        median, low, high = paired(side, "bare")
        blocks = ", ".join(f"{t:.2f}" for t in times[side])
        cpu_ratio = cpu_per_image["bare"] / cpu_per_image[side]
        print(
            f"{side:>10}  {rate[side]:8.3f}  {median:6.3f} ({low:.2f}–{high:.2f}){'':17}"
            f"{cpu_per_image[side]:11.3f}  {cpu_ratio:6.3f}  {blocks}"
        )
    print(
        "goal: engine client ÷ bare ≥ 0.97 (bot/scheduler.py dispatches like `scheduler`). "
        "runner = the engine's Runner called in the test process (no worker process, pipe or PNG)."
    )
    via = ", ".join(f"{mode} {paired(mode, 'runner')[0]:.3f}" for mode in ENGINE_MODES)
    print(f"engine client ÷ in-process Runner (cost of process, pipe, PNG): {via}")
    print(f"worker per job: compute {ms(compute)}, PNG + parameters {ms(encode)} (in a thread, beside the next job)")
    gaps = ", ".join(f"{mode} {ms(gap[mode])}" for mode in ENGINE_MODES)
    print(f"median idle gap between consecutive jobs in the worker: {gaps}")
    dispatched, low, high = paired("scheduler", "bare")
    range_text = f"{dispatched:.3f} ({low:.2f}–{high:.2f})"
    report.record(
        "engine", "engine client ÷ bare diffusers (scheduler's dispatch)", range_text, "≥ 0.97", dispatched >= 0.97
    )
    report.record("engine", "Runner in-process ÷ bare diffusers", f"{paired('runner', 'bare')[0]:.3f}")
    idle = gap["scheduler"]
    report.record("engine", "worker idle gap between jobs (scheduler's dispatch)", ms(idle), "< 5 ms", idle < 0.005)
    assert all(value > 0 for value in rate.values())
