"""ControlNet overhead: a text2img job with a control image through the engine against the same job
done by a script using diffusers directly, on the tiny model and its tiny ControlNet at 256².

Run: .venv/bin/pytest -m bench tests/bench/test_control_bench.py -s

Both sides, per job: the member's upload fitted to the job's size (cover, centre crop), Canny
edges found on it (OpenCV, the same thresholds), then base + ControlNet at strength 0.8 over the
first `engine.high_noise_frac` of the schedule (guidance end 0.8, the engine's default) and the
refiner for the rest, DPM++ 2M Karras, fp32 on the CPU, one torch thread, the same seeds, a
prompt and negative of its own per job (see test_engine_bench.py for why).

Sides:

- bare: `StableDiffusionXLControlNetPipeline` + `StableDiffusionXLImg2ImgPipeline` built with
  `from_pretrained` in the test process, no PNG;
- runner: the engine's Runner in the test process (the engine's control path: its pipeline over
  the base's modules, the ControlNet kept with the model);
- engine: the engine client (worker process, pipe, Runner, PNG + parameters + the control map),
  dispatched with the bot scheduler's rule (tests/bench/dispatch.py).

Goal: engine ÷ bare ≥ 0.97 (images/s, median over rounds of same-round ratios).
"""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw, ImageOps

from config.addons import ControlNetSettings
from config.settings import Settings
from engine.client import LocalEngineClient
from engine.jobs import Text2Img
from engine.options import CONTROL_GUIDANCE_END, CONTROL_GUIDANCE_START, CONTROL_STRENGTH
from engine.tiny_addons import CONTROLNET
from tests.bench import report
from tests.bench.dispatch import dispatch_block
from tests.bench.test_engine_bench import CFG, SIZE, STEPS, THREADS, bench_settings, texts
from tests.bench.test_engine_bench import job as engine_bench_job

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

BLOCK = 4
ROUNDS = 5
SIDES = ("bare", "runner", "engine")


def sketch() -> bytes:
    """The member's upload: a line drawing, not the job's size (so both sides fit it)."""
    image = Image.new("RGB", (320, 256), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((60, 90, 260, 230), outline="black", width=5)
    draw.polygon([(40, 100), (160, 20), (280, 100)], outline="black", width=5)
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


UPLOAD = sketch()


class BareControl:
    """What a script using diffusers directly would do for the same jobs."""

    def __init__(self, model_dir: Path, high_noise_frac: float) -> None:
        import torch
        from diffusers import (
            ControlNetModel,
            DPMSolverMultistepScheduler,
            StableDiffusionXLControlNetPipeline,
            StableDiffusionXLImg2ImgPipeline,
        )
        from diffusers.utils import logging as diffusers_logging

        torch.set_num_threads(THREADS)
        diffusers_logging.disable_progress_bar()
        options: dict[str, Any] = {"torch_dtype": torch.float32, "local_files_only": True, "use_safetensors": True}
        controlnet = ControlNetModel.from_pretrained(str(model_dir / CONTROLNET), **options)
        self.base = StableDiffusionXLControlNetPipeline.from_pretrained(
            str(model_dir / "base"), controlnet=controlnet, **options
        )
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(model_dir / "refiner"), text_encoder_2=self.base.text_encoder_2, vae=self.base.vae, **options
        )
        for pipe in (self.base, self.refiner):
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = dict(self.base.scheduler.config)
        self.scheduler_class = DPMSolverMultistepScheduler
        self.frac = high_noise_frac
        self.torch = torch

    def run(self, seed: int, prompt: str, negative: str, upload: bytes) -> Any:
        import cv2
        import numpy as np

        with Image.open(io.BytesIO(upload)) as image:
            fitted = ImageOps.fit(image.convert("RGB"), (SIZE, SIZE), Image.Resampling.LANCZOS)
        edges = cv2.Canny(cv2.cvtColor(np.asarray(fitted), cv2.COLOR_RGB2GRAY), 100, 200)
        control = Image.fromarray(edges).convert("RGB")
        scheduler_options = {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
        self.base.scheduler = self.scheduler_class.from_config(self.scheduler_config, **scheduler_options)
        self.refiner.scheduler = self.scheduler_class.from_config(self.scheduler_config, **scheduler_options)
        generator = self.torch.Generator("cpu").manual_seed(seed)
        common = {"prompt": prompt, "negative_prompt": negative, "num_inference_steps": STEPS, "guidance_scale": CFG}
        with self.torch.inference_mode():
            latents = self.base(
                **common,
                image=control,
                controlnet_conditioning_scale=CONTROL_STRENGTH.default,
                control_guidance_start=CONTROL_GUIDANCE_START.default,
                control_guidance_end=CONTROL_GUIDANCE_END.default,
                width=SIZE,
                height=SIZE,
                denoising_end=self.frac,
                output_type="latent",
                generator=generator,
            ).images
            return self.refiner(**common, image=latents, denoising_start=self.frac, generator=generator).images[0]


def job(side: str, index: int, seed: int) -> Text2Img:
    return engine_bench_job(side, index, seed, control="edges", control_image=UPLOAD)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, tiny_addons_dir: Path) -> Settings:
    plain = bench_settings(tmp_path_factory.mktemp("control-bench"), tiny_addons_dir)
    edges = ControlNetSettings(model=str(tiny_addons_dir / CONTROLNET))
    return plain.model_copy(update={"controlnets": {"edges": edges}})


class InProcessRunner:
    def __init__(self, settings: Settings) -> None:
        from engine.models import ModelRegistry
        from engine.pipelines import Runner

        registry = ModelRegistry(settings.models, settings.engine, controlnets=settings.controlnets)
        registry.get(settings.default_model)
        self.runner = Runner(registry, settings.engine, settings.generation)

    def block(self, name: str, seeds: list[int]) -> float:
        started = time.perf_counter()
        for index, seed in enumerate(seeds):
            self.runner.run(job(name, index, seed), on_progress=lambda _: None, cancelled=lambda: False)
        return time.perf_counter() - started


def bare_block(loop: BareControl, name: str, seeds: list[int]) -> float:
    started = time.perf_counter()
    for seed in seeds:
        loop.run(seed, *texts(name, seed), UPLOAD)
    return time.perf_counter() - started


async def test_controlnet_job_through_the_engine_against_bare_diffusers(
    settings: Settings, tiny_addons_dir: Path
) -> None:
    load_before = os.getloadavg()[0]
    client = LocalEngineClient(settings)
    await client.start()
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    try:
        loop = BareControl(tiny_addons_dir, settings.engine.high_noise_frac)
        in_process = InProcessRunner(settings)
        # Warm every side (first calls load the ControlNet and pay lazy initialisation).
        bare_block(loop, "warm-bare", [1, 2])
        in_process.block("warm-runner", [1, 2])
        await dispatch_block(client, (job("warm", i, seed) for i, seed in enumerate([1, 2])))
        for round_index in range(ROUNDS):
            seeds = [1000 * round_index + i for i in range(BLOCK)]
            shift = round_index % len(SIDES)  # rotate the order so no side always follows another
            for side in SIDES[shift:] + SIDES[:shift]:
                if side == "bare":
                    times[side].append(bare_block(loop, side, seeds))
                elif side == "runner":
                    times[side].append(in_process.block(side, seeds))
                else:
                    blocks = (job(side, index, seed) for index, seed in enumerate(seeds))
                    times[side].append(await dispatch_block(client, blocks))
    finally:
        await client.close()

    def paired(side: str) -> tuple[float, float, float]:
        ratios = [bare / own for bare, own in zip(times["bare"], times[side], strict=True)]
        return statistics.median(ratios), min(ratios), max(ratios)

    print()
    print(
        f"tiny SDXL + ControlNet (edges) {SIZE}², {STEPS} steps base→refiner, torch threads {THREADS}, "
        f"{ROUNDS} rounds × {BLOCK} images per side; load average {load_before:.1f} → {os.getloadavg()[0]:.1f}"
    )
    print(f"{'side':>8}  images/s  ÷ bare (median, range of rounds)  blocks (s)")
    for side in SIDES:
        median, low, high = paired(side)
        blocks = ", ".join(f"{t:.2f}" for t in times[side])
        print(
            f"{side:>8}  {BLOCK / statistics.median(times[side]):8.3f}  {median:6.3f} ({low:.2f}–{high:.2f})  {blocks}"
        )
    engine, low, high = paired("engine")
    report.record(
        "control",
        "ControlNet job: engine client ÷ bare diffusers",
        f"{engine:.3f} ({low:.2f}–{high:.2f})",
        "≥ 0.97",
        engine >= 0.97,
    )
    report.record("control", "ControlNet job: Runner in-process ÷ bare diffusers", f"{paired('runner')[0]:.3f}")
    assert all(value > 0 for values in times.values() for value in values)
