"""Editing overhead: an inpaint job (Vary Region) and an outpaint job (Zoom Out) through the engine
against the same bare diffusers calls, on the tiny model at 256².

Run: .venv/bin/pytest -m bench tests/bench/test_editing_bench.py -s

Both sides: StableDiffusionXLInpaintPipeline on the base's modules, DPM++ 2M Karras, the same
steps, strength, cfg, seeds, the same source, mask (blurred the same way for the inpaint) and
canvas (engine.masks.zoom_canvas for the outpaint), fp32 on the CPU, one torch thread; the bare
side pastes the kept pixels back with diffusers' own `apply_overlay`, as its docs show. Blocks
alternate between the sides in a rotating order, and ratios are medians over rounds of blocks
run back to back (see tests/bench/test_engine_bench.py for why).

Sides:

- bare: the diffusers call in the test process, PIL in and out;
- runner: the engine's Runner in the test process (engine/kinds/edit.py, zoom.py);
- engine: the engine client (worker process, pipe, Runner, PNG + parameters) dispatched as the
  bot's scheduler does (tests/bench/dispatch.py).
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from config.settings import Settings
from engine.client import LocalEngineClient
from engine.jobs import Edit, Job, Zoom
from engine.jobs.edit import MASK_BLUR
from engine.masks import region_mask, zoom_canvas
from tests.bench import report
from tests.bench.dispatch import dispatch_block
from tests.bench.test_engine_bench import THREADS, InProcessRunner, bench_settings

pytestmark = pytest.mark.bench

SIZE = 256
STEPS = 20
CFG = 7.0
BLOCK = 4
ROUNDS = 6
REGIONS = ("center",)
ZOOM = 2.0
KINDS = ("inpaint", "outpaint")
SIDES = ("bare", "runner", "engine")


def source_png() -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (SIZE // 32, SIZE // 32, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small, "RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(out, "PNG")
    return out.getvalue()


SOURCE = source_png()


def texts(side: str, seed: int) -> tuple[str, str]:
    """A prompt and negative of this job alone (the engine caches recent prompt embeddings)."""
    return f"a stone bridge over a river, study {side} {seed}", f"blurry, draft {side} {seed}"


def job(kind: str, side: str, seed: int) -> Job:
    prompt, negative = texts(side, seed)
    common: dict[str, Any] = {
        "job_id": f"{kind}-{side}-{seed}",
        "prompt": prompt,
        "negative": negative,
        "steps": STEPS,
        "cfg": CFG,
        "seed": seed,
        "sampler": "dpmpp_2m_karras",
        "image": SOURCE,
    }
    return Edit(regions=REGIONS, **common) if kind == "inpaint" else Zoom(factor=ZOOM, **common)


class BareInpaint:
    """What a script using diffusers directly would do for the same jobs."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

        torch.set_num_threads(THREADS)
        options: dict[str, Any] = {"torch_dtype": torch.float32, "local_files_only": True, "use_safetensors": True}
        base = StableDiffusionXLPipeline.from_pretrained(str(model_dir / "base"), **options)
        self.pipe = StableDiffusionXLInpaintPipeline.from_pipe(base, torch_dtype=torch.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.scheduler = DPMSolverMultistepScheduler
        self.scheduler_config = dict(base.scheduler.config)
        self.torch = torch
        source = Image.open(io.BytesIO(SOURCE)).convert("RGB")
        mask = self.pipe.mask_processor.blur(region_mask(REGIONS, source.size), blur_factor=MASK_BLUR)
        canvas, ring, _ = zoom_canvas(source, ZOOM, seed=0)
        self.inputs = {"inpaint": (source, mask, Edit.strength), "outpaint": (canvas, ring, Zoom.strength)}

    def run(self, kind: str, side: str, seed: int) -> Image.Image:
        image, mask, strength = self.inputs[kind]
        self.pipe.scheduler = self.scheduler.from_config(
            self.scheduler_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        )
        prompt, negative = texts(side, seed)
        with self.torch.inference_mode():
            out = self.pipe(
                prompt=prompt,
                negative_prompt=negative,
                image=image,
                mask_image=mask,
                width=SIZE,
                height=SIZE,
                strength=strength,
                num_inference_steps=STEPS,
                guidance_scale=CFG,
                generator=self.torch.Generator("cpu").manual_seed(seed),
            ).images[0]
        return self.pipe.image_processor.apply_overlay(mask, image, out)


def bare_block(loop: BareInpaint, kind: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    for seed in seeds:
        loop.run(kind, "bare", seed)
    return time.perf_counter() - started


def runner_block(runner: InProcessRunner, kind: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    for seed in seeds:
        runner.runner.run(job(kind, "runner", seed), on_progress=lambda _: None, cancelled=lambda: False)
    return time.perf_counter() - started


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Settings:
    return bench_settings(tmp_path_factory.mktemp("bench-editing"), tiny_model_dir)


async def test_editing_throughput_against_bare_diffusers(settings: Settings, tiny_model_dir: Path) -> None:
    client = LocalEngineClient(settings)
    await client.start()
    times: dict[tuple[str, str], list[float]] = {(kind, side): [] for kind in KINDS for side in SIDES}
    try:
        bare = BareInpaint(tiny_model_dir)
        runner = InProcessRunner(settings)
        for kind in KINDS:  # warm every side (first calls pay lazy initialisation)
            bare_block(bare, kind, [1])
            runner_block(runner, kind, [1])
            await dispatch_block(client, [job(kind, "warm", 1)])
        for round_index in range(ROUNDS):
            seeds = [1000 * round_index + i for i in range(BLOCK)]
            shift = round_index % len(SIDES)
            for kind in KINDS:
                for side in SIDES[shift:] + SIDES[:shift]:
                    if side == "bare":
                        seconds = bare_block(bare, kind, seeds)
                    elif side == "runner":
                        seconds = runner_block(runner, kind, seeds)
                    else:
                        seconds = await dispatch_block(client, (job(kind, "engine", seed) for seed in seeds))
                    times[kind, side].append(seconds)
    finally:
        await client.close()

    def paired(kind: str, side: str) -> tuple[float, float, float]:
        ratios = [ref / own for ref, own in zip(times[kind, "bare"], times[kind, side], strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)

    print()
    print(
        f"tiny SDXL {SIZE}², {STEPS} steps × strength (Vary Region {Edit.strength:g}: the centre; Zoom Out "
        f"×{ZOOM:g}: {Zoom.strength:g}), DPM++ 2M Karras, torch threads {THREADS}, {ROUNDS} rounds × {BLOCK} jobs"
    )
    print(f"{'job':>9} {'side':>7}  jobs/s  ÷ bare (median, range of rounds)  blocks (s)")
    for kind in KINDS:
        for side in SIDES:
            median, low, high = paired(kind, side)
            rate = BLOCK / statistics.median(times[kind, side])
            blocks = ", ".join(f"{t:.2f}" for t in times[kind, side])
            print(f"{kind:>9} {side:>7}  {rate:6.3f}  {median:6.3f} ({low:.2f}–{high:.2f}){'':17}{blocks}")
    for kind, what in (("inpaint", "Vary Region (inpaint)"), ("outpaint", "Zoom Out (outpaint)")):
        median, low, high = paired(kind, "engine")
        report.record(
            "editing",
            f"engine client ÷ bare diffusers, {what}",
            f"{median:.3f} ({low:.2f}–{high:.2f})",
            "≥ 0.97",
            median >= 0.97,
        )
        report.record("editing", f"Runner in-process ÷ bare diffusers, {what}", f"{paired(kind, 'runner')[0]:.3f}")
    assert all(value > 0 for values in times.values() for value in values)
