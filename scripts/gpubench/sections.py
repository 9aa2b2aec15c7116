"""The core measurements: text2img per dtype (ensemble of experts and base alone, warm-up, peak
memory, VAE decode, the refiner's share), batches, the engine client end to end, model switching
and torch.compile. Each function fills one SectionResult; the order and the budget are cli's.

Sides alternate inside every repetition (bare first in even ones, the engine first in odd ones) so
a slow moment on the machine hits both; a figure is the median over repetitions.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .harness import MODEL, SECOND_MODEL, Jobs, Loaded, Profile, free_device_memory, load, run_job
from .record import Budget, PeakMemory, Report, Row, SectionResult, median, timed


class Skip(Exception):
    """The section cannot run here (a module missing, no budget left); the message says why."""


@dataclass
class Bench:
    """What the sections share: the profile, the model folder, the loaded dtype, estimates."""

    profile: Profile
    report: Report
    budget: Budget
    model_dir: Path
    workdir: Path
    jobs: Jobs
    image_s: float  # one ensemble image (refined over the run: estimates for the budget)
    load_s: float
    loaded: Loaded | None = None
    # Figures later sections compare against: "bare"/"runner" ensemble and base-alone seconds
    # at the main dtype with compile off.
    baseline: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # ControlNet pipeline, LoRA names

    @property
    def device(self) -> torch.device:
        return self.profile.device

    def current(self) -> Loaded:
        if self.loaded is None:
            raise Skip("no model loaded (its text2img section did not run)")
        return self.loaded

    def use_dtype(self, dtype: str) -> Loaded:
        """The registry for `dtype`, loading it (and dropping the previous one) when needed."""
        if self.loaded is not None and self.loaded.dtype == dtype:
            return self.loaded
        if self.loaded is not None:
            self.loaded.registry.unload()
            self.loaded = None
            free_device_memory(self.device)
        self.loaded = load(self.profile, dtype, self.model_dir)
        self.load_s = self.loaded.load_seconds
        return self.loaded


def pair(
    bench: Bench,
    reps: int,
    *,
    count: int = 1,
    refiner: bool = True,
    runner: Any = None,
    sides: tuple[str, ...] = ("bare", "runner"),
) -> tuple[dict[str, list[float]], list[dict[str, float]], dict[str, float]]:
    """`reps` jobs per side, alternating: seconds per side, bare phase times, peak GiB per side."""
    loaded, profile = bench.current(), bench.profile
    runner = runner or loaded.runner
    times: dict[str, list[float]] = {side: [] for side in sides}
    peaks = dict.fromkeys(sides, 0.0)
    phases: list[dict[str, float]] = []
    for rep in range(reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            with PeakMemory(bench.device) as peak:
                if side == "bare":
                    prompt, negative, seed = bench.jobs.texts("bare")
                    (_, phase), seconds = timed(
                        bench.device,
                        lambda p=prompt, n=negative, s=seed: loaded.bare.run(
                            p, n, s, size=profile.size, steps=profile.steps, count=count, refiner=refiner
                        ),
                    )
                    phases.append(phase)
                else:
                    job = bench.jobs.text2img("runner", count=count, refiner=refiner)
                    _, seconds = timed(bench.device, lambda j=job: run_job(runner, j))
            times[side].append(seconds)
            peaks[side] = max(peaks[side], peak.gib)
    return times, phases, peaks


def _peak_row(section: str, figure: str, peaks: dict[str, float], kind: str) -> Row:
    sides = ", ".join(f"{'Runner' if side == 'runner' else side} {gib:.2f}" for side, gib in peaks.items())
    return Row(section, figure, value=max(peaks.values()), unit="GiB", note=f"{sides} ({kind})")


def diffusers_decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """What diffusers' SDXL pipeline does after the last step: upcast an fp16 VAE that needs it
    (in place), decode, cast back, postprocess to PIL."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
    try:
        with torch.inference_mode():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    return pipe.image_processor.postprocess(pixels, output_type="pil")


def text2img(bench: Bench, dtype: str, result: SectionResult) -> None:
    """Load `dtype`, warm up, then the ensemble on both sides, decode, the refiner's share and
    memory; base alone too at the main dtype (the published SDXL figures are base alone)."""
    section = f"text2img {dtype}"
    profile, device = bench.profile, bench.device
    loaded = bench.use_dtype(dtype)
    result.rows.append(Row(section, "load base + refiner from disk (engine.models)", value=loaded.load_seconds))
    # Warm-up: first calls pay cuDNN autotuning, lazy initialisation, prompt-parser set-up.
    warm, _, _ = pair(bench, 1)
    result.rows.append(
        Row(section, "first job (warm-up)", bare=warm["bare"][0], runner=warm["runner"][0], compare=False)
    )
    reps = profile.reps
    times, phases, peaks = pair(bench, reps)
    where = f"{profile.size}², {profile.steps} steps, base → refiner at {profile.high_noise_frac}, batch 1"
    bare, runner = median(times["bare"]), median(times["runner"])
    result.rows.append(Row(section, f"text2img {where}", bare=bare, runner=runner, note=f"median of {reps}"))
    bench.image_s = max(bare, runner)
    result.rows.append(_peak_row(section, "peak memory, base + refiner, batch 1", peaks, PeakMemory(device).kind))
    if dtype == profile.main_dtype:
        bench.baseline.update(bare=bare, runner=runner)
        alone, _, _ = pair(bench, reps, refiner=False)
        bare_alone, runner_alone = median(alone["bare"]), median(alone["runner"])
        figure = f"text2img base alone, {profile.size}², {profile.steps} steps, batch 1"
        result.rows.append(Row(section, figure, bare=bare_alone, runner=runner_alone))
        bench.baseline.update(bare_alone=bare_alone, runner_alone=runner_alone)
    _decode_and_split(bench, result, section, phases)


def _decode_and_split(bench: Bench, result: SectionResult, section: str, phases: list[dict[str, float]]) -> None:
    """VAE decode of one image both ways (random latents: the cost does not depend on the
    values), and the refiner's share from the bare side's phase times."""
    from engine.vae import decode_latents

    loaded, device, size = bench.current(), bench.device, bench.profile.size
    latents = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=loaded.model.dtype)
    engine_decode, bare_decode = [], []
    for _ in range(max(2, bench.profile.reps) + 1):
        engine_decode.append(timed(device, lambda: decode_latents(loaded.model.base, latents))[1])
        bare_decode.append(timed(device, lambda: diffusers_decode(loaded.bare.base, latents))[1])
    decode_bare = median(bare_decode[1:])  # the first pays the fp32 copy / cuDNN tuning
    upcast = loaded.model.dtype == torch.float16 and loaded.model.base.vae.config.force_upcast
    note = "fp16 VAE upcast to fp32 (force_upcast)" if upcast else ""
    result.rows.append(
        Row(section, "VAE decode + PIL, one image", bare=decode_bare, runner=median(engine_decode[1:]), note=note)
    )
    base_s = median([p["base"] for p in phases])
    refiner_s = max(0.0, median([p["refiner"] for p in phases]) - decode_bare)
    total = base_s + refiner_s + decode_bare
    note = f"base {base_s:.3f} s, refiner {refiner_s:.3f} s, decode {decode_bare:.3f} s"
    result.rows.append(
        Row(section, "base / refiner / decode split (bare)", value=100 * refiner_s / total, unit="% refiner", note=note)
    )


def batches(bench: Bench, result: SectionResult) -> None:
    """count = 2, 4 … per image: bare (one batched call) against the Runner as shipped (exact
    batches: the UNet per image); at the largest count also the Runner with exact_batches=False
    (one batched UNet call, the same work as bare)."""
    from config.settings import GenerationSettings
    from engine.pipelines import Runner

    loaded = bench.use_dtype(bench.profile.main_dtype)
    batched = Runner(loaded.registry, loaded.registry.engine, GenerationSettings(), exact_batches=False)
    section = f"batch {loaded.dtype}"
    kind = PeakMemory(bench.device).kind
    counts = [count for count in bench.profile.batches if count > 1]
    single = bench.baseline.get("bare"), bench.baseline.get("runner")
    for count in counts:
        times, _, peaks = pair(bench, 1, count=count)
        note = f"{count} images in one job"
        if None not in single:
            note += f"; count 1: bare {single[0]:.3f} s, Runner {single[1]:.3f} s"
        per = {side: seconds[0] / count for side, seconds in times.items()}
        figure = f"count {count}, per image (Runner: exact batches)"
        result.rows.append(Row(section, figure, bare=per["bare"], runner=per["runner"], note=note))
        result.rows.append(_peak_row(section, f"peak memory, count {count}", peaks, kind))
        if count == max(counts):
            fast, _, fast_peaks = pair(bench, 1, count=count, runner=batched, sides=("runner",))
            figure = f"count {count}, per image (Runner: exact_batches=False)"
            result.rows.append(Row(section, figure, bare=per["bare"], runner=fast["runner"][0] / count))
            result.rows.append(_peak_row(section, f"peak memory, count {count}, exact_batches=False", fast_peaks, kind))
    for count in counts:
        _queued_jobs(bench, result, section, loaded.runner, batched, count)


def _queued_jobs(bench: Bench, result: SectionResult, section: str, exact: Any, fast: Any, count: int) -> None:
    """`count` queued jobs of one shape (their own prompts and seeds), per image: one after
    another against one batched call (`Runner.run_batch`, what the scheduler sends when
    `[engine] max_batch` allows), with exact batches and without. The bare column is the same
    jobs as one diffusers call with `count` prompts (diffusers' own batching)."""
    device, profile = bench.device, bench.profile
    kind = PeakMemory(device).kind

    def alone() -> None:
        for job in bench.jobs.batch(f"seq{count}", count):
            run_job(exact, job)

    def together(runner: Any) -> None:
        jobs = bench.jobs.batch(f"batch{count}", count)
        runner.run_batch(jobs, on_progress=lambda _p: None, cancelled=lambda _j: False)

    def bare() -> None:
        texts = [bench.jobs.texts("bare-batch") for _ in range(count)]
        bench.current().bare.run_many(texts, size=profile.size, steps=profile.steps)

    _, one_by_one = timed(device, alone)
    with PeakMemory(device) as peak:
        _, batched = timed(device, lambda: together(exact))
    _, batched_fast = timed(device, lambda: together(fast))
    _, bare_s = timed(device, bare)
    note = f"one after another: {one_by_one / count:.3f} s per image; exact_batches=False: {batched_fast / count:.3f} s"
    figure = f"{count} queued jobs of one shape, one batched call, per image (Runner.run_batch, exact)"
    result.rows.append(Row(section, figure, bare=bare_s / count, runner=batched / count, note=note))
    result.rows.append(
        Row(section, f"{count} queued jobs: batched ÷ one after another", value=one_by_one / batched, unit="×",
            note=f"exact; exact_batches=False: {one_by_one / batched_fast:.2f}×, peak {peak.gib:.2f} GiB ({kind})")
    )  # fmt: skip


def client(bench: Bench, result: SectionResult) -> None:
    """The LocalEngineClient end to end (worker process, pipe, Runner, PNG + parameters), jobs
    interleaved with the bare loop and the in-process Runner."""
    from engine.api import Result
    from engine.client import LocalEngineClient

    from .harness import full_settings

    loaded = bench.use_dtype(bench.profile.main_dtype)
    settings = full_settings(bench.profile, loaded.dtype, bench.model_dir)
    section = f"client {loaded.dtype}"

    async def one(engine: LocalEngineClient, job: Any) -> tuple[float, float]:
        started = time.perf_counter()
        async for item in engine.submit(job):
            if isinstance(item, Result):
                return time.perf_counter() - started, item.compute_seconds
        raise RuntimeError("the engine ended the job without a result")

    async def run() -> dict[str, list[float]]:
        engine = LocalEngineClient(settings)
        await engine.start()
        times: dict[str, list[float]] = {"client": [], "compute": [], "bare": [], "runner": []}
        try:
            times["startup"] = [engine.startup_seconds or 0.0]
            warm = await one(engine, bench.jobs.text2img("client-warm"))
            times["warm"] = [warm[0]]
            for _rep in range(bench.profile.reps):
                seconds, compute = await one(engine, bench.jobs.text2img("client"))
                times["client"].append(seconds)
                times["compute"].append(compute)
                sides, _, _ = pair(bench, 1)
                times["bare"] += sides["bare"]
                times["runner"] += sides["runner"]
        finally:
            await engine.close()
        return times

    times = asyncio.run(run())
    result.rows.append(Row(section, "engine start-up (spawn → ready, model loaded)", value=times["startup"][0]))
    result.rows.append(Row(section, "first job through the client (warm-up)", client=times["warm"][0]))
    result.rows.append(
        Row(
            section,
            f"text2img {bench.profile.size}², {bench.profile.steps} steps, batch 1, end to end",
            bare=median(times["bare"]),
            runner=median(times["runner"]),
            client=median(times["client"]),
            note=f"worker compute {median(times['compute']):.3f} s; client includes PNG encoding and the pipe",
        )
    )


def switch(bench: Bench, result: SectionResult) -> None:
    """Two models, one on the device and one parked in CPU RAM (engine.models_in_ram = 1)."""
    loaded = bench.use_dtype(bench.profile.main_dtype)
    registry, device = loaded.registry, bench.device
    section = f"switch {loaded.dtype}"
    _, first = timed(device, lambda: registry.get(SECOND_MODEL))
    result.rows.append(Row(section, "second model: park the first in RAM + load from disk", value=first))
    switches = []
    for _ in range(max(2, bench.profile.reps)):
        for name in (MODEL, SECOND_MODEL):
            switches.append(timed(device, lambda n=name: registry.get(n))[1])
    registry.get(MODEL)
    registry.unload(SECOND_MODEL)
    free_device_memory(device)
    note = f"{len(switches)} switches, {min(switches):.3f}–{max(switches):.3f} s"
    if device.type == "cpu":
        note += "; on a CPU both models stay in RAM (nothing to move)"
    result.rows.append(
        Row(section, "switch models (park active → RAM, other RAM → device)", value=median(switches), note=note)
    )


def _graphs() -> int | str:
    """Graphs dynamo compiled so far (each recompilation for a new shape or constant is one)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # a private counter: report nothing rather than fail the section
        return "?"


@contextmanager
def compile_backend(device: torch.device) -> Iterator[str]:
    """inductor on CUDA. On a CPU the eager backend: dynamo still traces every block with
    fullgraph=True (so a graph break fails the same way) but no C++ is compiled, which would take
    minutes on a 2-core CI box. nn.Module.compile looks torch.compile up at call time."""
    if device.type == "cuda":
        yield "inductor"
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend="eager")  # type: ignore[assignment]
    try:
        yield "eager"
    finally:
        torch.compile = original  # type: ignore[assignment]


def compile_on(bench: Bench, result: SectionResult) -> None:
    """engine.accel.compile_unet on both UNets (what engine.compile = true does), then the same
    jobs. Last section: compiled modules stay compiled."""
    from engine.accel import compile_unet

    loaded = bench.use_dtype(bench.profile.main_dtype)
    model, device, profile = loaded.model, bench.device, bench.profile
    section = f"compile {loaded.dtype}"
    with compile_backend(device) as backend:
        labels = [compile_unet(model.base.unet)]
        if model.refiner is not None:
            labels.append(compile_unet(model.refiner.unet))
    job = bench.jobs.text2img("runner-compile")
    _, first_runner = timed(device, lambda: run_job(loaded.runner, job))
    prompt, negative, seed = bench.jobs.texts("bare-compile")
    _, first_bare = timed(
        device, lambda: loaded.bare.run(prompt, negative, seed, size=profile.size, steps=profile.steps)
    )
    result.rows.append(
        Row(
            section,
            "compile warm-up: first job (compiles base + refiner blocks)",
            bare=first_bare,
            runner=first_runner,
            compare=False,
            note=f"{', '.join(sorted(set(labels)))}, backend {backend}, {_graphs()} graphs; Runner ran first",
        )
    )
    times, _, _ = pair(bench, profile.reps)
    off = (
        f"compile off: bare {bench.baseline.get('bare', float('nan')):.3f} s, "
        f"Runner {bench.baseline.get('runner', float('nan')):.3f} s"
    )
    result.rows.append(
        Row(
            section,
            f"text2img {profile.size}², {profile.steps} steps, batch 1, compiled",
            bare=median(times["bare"]),
            runner=median(times["runner"]),
            note=off,
        )
    )
    alone, _, _ = pair(bench, profile.reps, refiner=False)
    off = f"compile off: bare {bench.baseline.get('bare_alone', float('nan')):.3f} s"
    result.rows.append(
        Row(
            section,
            "text2img base alone, compiled",
            bare=median(alone["bare"]),
            runner=median(alone["runner"]),
            note=off,
        )
    )


def estimates(bench: Bench) -> dict[str, Callable[[], float]]:
    """Seconds each section is expected to take, from what was measured so far."""
    image, load_s, reps = bench.image_s, bench.load_s, bench.profile.reps
    extra_batches = sum(c for c in bench.profile.batches if c > 1)
    return {
        "text2img": lambda: load_s + image * (2 + 4 * reps) + 2,
        "batch": lambda: image * (2 * extra_batches + max(bench.profile.batches) + 4 * extra_batches),
        "client": lambda: 2 * load_s + 10 + image * (1 + 3 * reps),
        "switch": lambda: load_s + 2 * max(2, reps) * 0.4 * load_s,
        "upscale": lambda: image * 2 * max(1, reps) + 10,
        "controlnet": lambda: 10 + image * 1.5 * reps,
        "lora": lambda: 10 + image * 3 * reps,
        "compile": lambda: (120.0 if bench.device.type == "cuda" else 20.0) + image * 4 * reps,
    }


__all__ = [
    "Bench",
    "Skip",
    "batches",
    "client",
    "compile_on",
    "diffusers_decode",
    "estimates",
    "pair",
    "switch",
    "text2img",
]
