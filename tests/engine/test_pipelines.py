"""engine.pipelines on the real diffusers pipelines of the tiny SDXL (no mocks): every job kind,
batching and seeds, determinism, prompts, guidance, progress, previews and cancelling."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
import torch
from compel import Compel, CompelForSDXL, ReturnedEmbeddingsType
from compel.prompt_parser import FlattenedPrompt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from config.settings import EngineSettings, GenerationSettings
from engine.api import JobCancelled
from engine.jobs import Refine, Text2Img, Upscale, Variations
from engine.jobs.events import Progress
from engine.models import ModelRegistry
from engine.options import SAMPLERS
from engine.pipelines import Generated, Runner, fresh_pipeline, img2img_call_steps, new_scheduler, planned_steps
from engine.prompts import PROMPT_CACHE_SIZE, clear_prompt_cache, encode_prompt, plain_text
from engine.samplers import make_scheduler

SIZE = 128


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def registry(tiny_models_config) -> ModelRegistry:
    return ModelRegistry(tiny_models_config, EngineSettings(device="cpu"))


def make_runner(registry: ModelRegistry, **engine: object) -> Runner:
    settings = EngineSettings(device="cpu", **{"preview_every": 0, **engine})
    return Runner(registry, settings, GenerationSettings())


@pytest.fixture(scope="module")
def runner(registry) -> Runner:
    return make_runner(registry)


def run(
    runner: Runner,
    job,
    *,
    progress: list[Progress] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> list[Generated]:
    sink = progress if progress is not None else []
    return runner.run(job, on_progress=sink.append, cancelled=cancelled)


def pixels(generated: Generated) -> np.ndarray:
    return np.asarray(generated.image, dtype=np.int16)


def png(generated: Generated) -> bytes:
    out = io.BytesIO()
    generated.image.save(out, "PNG")
    return out.getvalue()


def t2i(**fields) -> Text2Img:
    defaults = {"job_id": "t", "prompt": "a cat in a hat", "width": SIZE, "height": SIZE, "steps": 4, "seed": 7}
    return Text2Img(**{**defaults, **fields})


@pytest.fixture(scope="module")
def input_png(runner) -> bytes:
    """A 128² image from the tiny base, as the bot would attach it (PNG bytes)."""
    return png(run(runner, t2i(refiner=False, seed=1))[0])


# --- prompts ---------------------------------------------------------------------------------


def test_weighted_prompt_changes_the_embeddings(registry) -> None:
    base = registry.get().base
    plain = encode_prompt(base, "a cat in a hat")
    for weighted in ("a (cat)1.5 in a hat", "a cat++ in a hat", "a (cat)0.5 in a hat"):
        cond = encode_prompt(base, weighted)
        assert cond.prompt_embeds.shape == plain.prompt_embeds.shape == (1, 77, 80)
        assert not torch.equal(cond.prompt_embeds, plain.prompt_embeds), weighted


def test_long_prompt_is_chunked_and_the_negative_padded_to_it(registry) -> None:
    model = registry.get()
    prompt = " ".join(["castle"] * 300)
    for pipe, width in ((model.base, 80), (model.refiner, 48)):
        cond = encode_prompt(pipe, prompt, "blurry")
        assert cond.prompt_embeds.shape[1] > 77 and cond.prompt_embeds.shape[1] % 77 == 0
        assert cond.prompt_embeds.shape[2] == width
        assert cond.negative_prompt_embeds.shape == cond.prompt_embeds.shape
        assert cond.pooled_prompt_embeds.shape == cond.negative_pooled_prompt_embeds.shape


def test_empty_negative(registry) -> None:
    model = registry.get()
    # The base zeroes an empty negative itself (force_zeros_for_empty_prompt): pass nothing.
    assert encode_prompt(model.base, "a cat", "").negative_prompt_embeds is None
    # The refiner ships without that flag: "" is encoded, as diffusers does.
    assert encode_prompt(model.refiner, "a cat", "").negative_prompt_embeds is not None
    # Without guidance no negative is needed at all.
    assert encode_prompt(model.base, "a cat", "blurry", guidance=False).negative_prompt_embeds is None


def compel_reference(pipe, prompt: str, negative: str, guidance: bool = True):
    """What engine.prompts computed before its fast path and cache: compel run as documented."""
    with_negative = guidance and (bool(negative.strip()) or not pipe.config.get("force_zeros_for_empty_prompt"))
    with torch.inference_mode():
        if getattr(pipe, "text_encoder", None) is not None:
            out = CompelForSDXL(pipe)(prompt, negative_prompt=negative if with_negative else None)
            return out.embeds, out.pooled_embeds, out.negative_embeds, out.negative_pooled_embeds
        compel = Compel(
            tokenizer=pipe.tokenizer_2,
            text_encoder=pipe.text_encoder_2,
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled=True,
            truncate_long_prompts=False,
        )
        embeds, pooled = compel([prompt, negative] if with_negative else [prompt])
        if not with_negative:
            return embeds, pooled, None, None
        return embeds[:1], pooled[:1], embeds[1:], pooled[1:]


REFERENCE_PROMPTS = [
    ("a lighthouse on a cliff at dusk, oil painting", "blurry"),
    ("sci-fi city,neon,rain", "low-quality, jpeg artifacts"),
    ("A  Lighthouse\n at   dusk", ""),
    ("", ""),
    (" ".join(["castle"] * 120), "blurry"),  # plain and long: chunked without the parser
    ("a cat", " ".join(["ugly"] * 120)),
    ("a (cat)1.5 in a hat", "blurry, (ugly)0.5"),  # weighted: the parser runs
    ("cat++ dog--", "plain negative"),
    ('("a cat", "a dog").blend(0.7, 0.3)', "x"),
]


@pytest.mark.parametrize("role", ["base", "refiner"])
def test_embeddings_are_bit_identical_to_compel(registry, role) -> None:
    """The parser bypass for plain texts and the embedding cache change nothing: cold and cached,
    plain and weighted, short and long, with and without guidance."""
    pipe = getattr(registry.get(), role)
    clear_prompt_cache()
    for prompt, negative in REFERENCE_PROMPTS:
        for guidance in (True, False):
            expected = compel_reference(pipe, prompt, negative, guidance)
            for attempt in ("cold", "cached"):
                cond = encode_prompt(pipe, prompt, negative, guidance=guidance)
                got = (
                    cond.prompt_embeds,
                    cond.pooled_prompt_embeds,
                    cond.negative_prompt_embeds,
                    cond.negative_pooled_prompt_embeds,
                )
                for name, want, have in zip(("embeds", "pooled", "neg", "neg pooled"), expected, got, strict=True):
                    assert (want is None) == (have is None), (prompt, negative, guidance, attempt, name)
                    if want is not None:
                        assert torch.equal(want, have), (prompt, negative, guidance, attempt, name)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.sampled_from(
            [*"ab Z9é漢,.-+'!?:;_[]<>/*&%#@~^|\t\n", "\xa0", "\u3000", ",,", "--", "++", "withLora", ".and"]
        ),
        max_size=24,
    ).map("".join)
    | st.text(max_size=30)
)
def test_plain_text_is_what_compels_parser_makes(text) -> None:
    """Whenever plain_text() lets a text skip the parser, the parser would have produced exactly
    one fragment of weight 1.0 with that text."""
    plain = plain_text(text)
    if plain is None:
        return
    parsed = Compel.parse_prompt_string(text)
    assert parsed.weights == [1.0] and not parsed.lora_weights
    assert [type(p) for p in parsed.prompts] == [FlattenedPrompt]
    fragments = parsed.prompts[0].children
    assert [(f.text, f.weight) for f in fragments] == [(plain, 1.0)]


def test_plain_text_sends_syntax_to_the_parser() -> None:
    assert plain_text("a lighthouse, oil painting") == "a lighthouse, oil painting"
    assert plain_text("sci-fi,close-up") == "sci-fi, close-up"
    for weighted in ("a (cat)1.5", "cat+", "cat -", "-cat", '"a cat"', "a\\(b", "x=1", "a\xa0b"):
        assert plain_text(weighted) is None, weighted


def test_prompt_cache_is_shared_by_the_refiner_and_bounded(registry) -> None:
    model = registry.get()
    clear_prompt_cache()
    encode_prompt(model.base, "a shared prompt", "a shared negative")
    # The refiner has its own tokenizer object with the same content and the same (shared)
    # second encoder: it must not run that encoder again.
    calls = []
    encoder = model.refiner.text_encoder_2
    handle = encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        encode_prompt(model.refiner, "a shared prompt", "a shared negative")
        assert calls == []
        encode_prompt(model.refiner, "a new prompt", "a shared negative")
        assert len(calls) == 2  # hidden states + pooled output of the new prompt only
    finally:
        handle.remove()
    for i in range(PROMPT_CACHE_SIZE + 10):
        encode_prompt(model.base, f"prompt {i}", guidance=False)
    from engine import prompts

    assert all(len(cache.entries) <= PROMPT_CACHE_SIZE for cache in prompts._caches.values())


def test_new_scheduler_is_a_fresh_make_scheduler(registry) -> None:
    base = registry.get().base
    for sampler in SAMPLERS:
        made, copied = make_scheduler(sampler, base.scheduler.config), new_scheduler(base, sampler)
        assert type(copied) is type(made) and dict(copied.config) == dict(made.config)
        made.set_timesteps(12)
        copied.set_timesteps(12)
        assert torch.equal(made.timesteps, copied.timesteps)
        assert torch.equal(made.sigmas, copied.sigmas) if hasattr(made, "sigmas") else True
    first, second = new_scheduler(base, "dpmpp_2m_karras"), new_scheduler(base, "dpmpp_2m_karras")
    first.set_timesteps(5)
    assert first is not second and second.num_inference_steps is None  # nothing shared


# --- text2img --------------------------------------------------------------------------------


def test_text2img_ensemble_gives_an_image_of_the_job_size(runner) -> None:
    job = t2i(width=192, height=128, count=1)
    [out] = run(runner, job)
    assert out.image.mode == "RGB"
    assert out.image.size == (192, 128)
    assert out.seed == 7
    assert pixels(out).std() > 0


def test_same_job_gives_identical_bytes(runner) -> None:
    assert png(run(runner, t2i())[0]) == png(run(runner, t2i())[0])


def test_batch_image_i_equals_the_single_job_with_seed_plus_i(runner) -> None:
    # euler_a draws fresh noise every step: the per-image generators must drive it too.
    batch = run(runner, t2i(count=4, seed=41, sampler="euler_a"))
    assert [g.seed for g in batch] == [41, 42, 43, 44]
    for i, image in enumerate(batch):
        [single] = run(runner, t2i(count=1, seed=41 + i, sampler="euler_a"))
        assert np.array_equal(pixels(single), pixels(image)), f"image {i} differs from seed {41 + i} alone"
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


def test_batch_without_exact_mode_differs_only_by_rounding(registry) -> None:
    """What batching alone does on this CPU (kept as a measurement): kernels block differently
    for batch 8 than for batch 2, so without the per-image UNet an image may move by ±1."""
    runner = Runner(registry, EngineSettings(device="cpu", preview_every=0), GenerationSettings(), exact_batches=False)
    batch = run(runner, t2i(count=2, seed=3, refiner=False))
    [single] = run(runner, t2i(count=1, seed=4, refiner=False))
    assert np.abs(pixels(single) - pixels(batch[1])).max() <= 2


def test_refiner_on_and_off(runner, registry) -> None:
    with_refiner = run(runner, t2i(refiner=None))[0]
    explicit = run(runner, t2i(refiner=True))[0]
    without = run(runner, t2i(refiner=False))[0]
    base_only_model = run(runner, t2i(model="tiny-base", refiner=True))[0]
    assert np.array_equal(pixels(with_refiner), pixels(explicit))
    assert not np.array_equal(pixels(with_refiner), pixels(without))
    # A model without a refiner ignores refiner=True: same as the base alone.
    assert np.array_equal(pixels(without), pixels(base_only_model))


def test_negative_prompt_cfg_and_weights_change_the_image(runner) -> None:
    plain = pixels(run(runner, t2i(refiner=False))[0])
    assert not np.array_equal(plain, pixels(run(runner, t2i(refiner=False, negative="blurry, dark"))[0]))
    assert not np.array_equal(plain, pixels(run(runner, t2i(refiner=False, cfg=3.0))[0]))
    assert not np.array_equal(plain, pixels(run(runner, t2i(refiner=False, prompt="a (cat)1.6 in a hat"))[0]))
    assert not np.array_equal(plain, pixels(run(runner, t2i(refiner=False, prompt="a cat++ in a hat"))[0]))


def test_long_prompt_with_a_batch(runner) -> None:
    prompt = ", ".join(f"detail {i} of a very ornate cathedral" for i in range(50))  # ~300 CLIP tokens
    assert len(runner.registry.get().base.tokenizer(prompt).input_ids) > 250
    out = run(runner, t2i(prompt=prompt, negative="blurry", count=2, steps=2))
    assert len(out) == 2
    short = run(runner, t2i(prompt=prompt[:60], negative="blurry", count=2, steps=2))
    assert not np.array_equal(pixels(out[0]), pixels(short[0]))


def test_cfg_1_runs_without_guidance(runner) -> None:
    out = run(runner, t2i(cfg=1.0, negative="ignored without guidance"))
    same = run(runner, t2i(cfg=1.0, negative="something else"))
    assert np.array_equal(pixels(out[0]), pixels(same[0]))


def test_cfg_cutoff_is_batch_safe(registry) -> None:
    cutoff = make_runner(registry, cfg_cutoff=0.5)
    batch = run(cutoff, t2i(count=2, seed=20, steps=6, sampler="euler"))
    [single] = run(cutoff, t2i(count=1, seed=21, steps=6, sampler="euler"))
    assert np.array_equal(pixels(single), pixels(batch[1]))
    [full_cfg] = run(make_runner(registry), t2i(count=1, seed=21, steps=6, sampler="euler"))
    assert not np.array_equal(pixels(single), pixels(full_cfg))


def test_cfg_cutoff_inside_the_refiner(registry) -> None:
    # steps 10, euler, frac 0.8: 8 base + 2 refiner steps; a cutoff at 0.9 falls in the refiner.
    progress: list[Progress] = []
    late = run(make_runner(registry, cfg_cutoff=0.9), t2i(count=2, steps=10, sampler="euler"), progress=progress)
    full = run(make_runner(registry), t2i(count=2, steps=10, sampler="euler"))
    assert [p.step for p in progress] == list(range(1, 11))
    assert not np.array_equal(pixels(late[0]), pixels(full[0]))


# --- progress, previews, cancel --------------------------------------------------------------


def test_progress_numbers_the_whole_ensemble(registry) -> None:
    progress: list[Progress] = []
    run(make_runner(registry, preview_every=3), t2i(steps=10, sampler="euler"), progress=progress)
    assert [p.step for p in progress] == list(range(1, 11))
    assert {p.total for p in progress} == {10}
    assert [p.phase for p in progress] == ["base"] * 8 + ["refiner"] * 2
    with_preview = [p.step for p in progress if p.preview is not None]
    assert with_preview == [3, 6, 9]
    preview = Image.open(io.BytesIO(progress[2].preview))
    assert preview.format == "JPEG"
    assert max(preview.size) <= 128


def test_progress_total_matches_karras_split(registry) -> None:
    # With Karras sigmas the 0.8 cutoff does not fall at step 8: the plan follows the schedule.
    progress: list[Progress] = []
    run(make_runner(registry), t2i(steps=10, sampler="dpmpp_2m_karras"), progress=progress)
    model = registry.get()
    base = planned_steps(model.base, "dpmpp_2m_karras", 10, denoising_end=0.8)
    refiner = planned_steps(model.refiner, "dpmpp_2m_karras", 10, denoising_start=0.8)
    assert base + refiner == 10
    assert [p.step for p in progress] == list(range(1, 11))
    assert sum(p.phase == "base" for p in progress) == base
    assert {p.total for p in progress} == {10}


def test_preview_of_a_batch_is_a_grid(registry) -> None:
    progress: list[Progress] = []
    run(make_runner(registry, preview_every=1, preview_size=64), t2i(count=4, steps=2, width=256), progress=progress)
    assert all(p.preview is not None for p in progress)
    preview = Image.open(io.BytesIO(progress[-1].preview))
    assert preview.size == (64, 32)  # 2×2 grid of 32×16 latents, fitted into 64 px


def test_cancel_at_step_2_of_20_stops_within_a_step(runner) -> None:
    progress: list[Progress] = []
    with pytest.raises(JobCancelled):
        run(runner, t2i(steps=20), progress=progress, cancelled=lambda: bool(progress) and progress[-1].step >= 2)
    # The flag is read at the end of every step: step 3 ran, then the job stopped without reporting it.
    assert [p.step for p in progress] == [1, 2]


def test_cancel_before_the_refiner_stops_the_chain(runner) -> None:
    progress: list[Progress] = []

    def cancelled() -> bool:
        return bool(progress) and progress[-1].phase == "base" and progress[-1].step == 8

    with pytest.raises(JobCancelled):
        run(runner, t2i(steps=10, sampler="euler"), progress=progress, cancelled=cancelled)
    assert all(p.phase == "base" for p in progress)


def test_cancelled_before_start(runner) -> None:
    with pytest.raises(JobCancelled):
        run(runner, t2i(), cancelled=lambda: True)


# --- image jobs ------------------------------------------------------------------------------


def test_refine_uses_the_refiner(runner, input_png) -> None:
    progress: list[Progress] = []
    job = Refine(job_id="r", image=input_png, prompt="a cat", steps=10, strength=0.3, seed=5)
    [out] = run(runner, job, progress=progress)
    assert out.image.size == (SIZE, SIZE)
    assert out.seed == 5
    assert {p.phase for p in progress} == {"refiner"}
    assert [p.step for p in progress] == [1, 2, 3]  # int(10 × 0.3)
    original = np.asarray(Image.open(io.BytesIO(input_png)).convert("RGB"), dtype=np.int16)
    assert not np.array_equal(pixels(out), original)
    assert png(out) == png(run(runner, job)[0])


def test_refine_without_refiner_uses_base_img2img(runner, input_png) -> None:
    progress: list[Progress] = []
    job = Refine(job_id="r", image=input_png, model="tiny-base", steps=4, strength=0.1)
    [out] = run(runner, job, progress=progress)
    assert out.image.size == (SIZE, SIZE)
    assert [(p.step, p.total, p.phase) for p in progress] == [(1, 1, "base")]  # at least one step


def test_refine_accepts_rgba_and_odd_sizes(runner) -> None:
    image = Image.new("RGBA", (100, 70), (200, 30, 30, 128))
    data = io.BytesIO()
    image.save(data, "PNG")
    [out] = run(runner, Refine(job_id="r", image=data.getvalue(), steps=4, strength=0.5))
    assert out.image.size == (96, 64)


def test_variations_batch_with_their_own_seeds(runner, input_png) -> None:
    job = Variations(job_id="v", image=input_png, prompt="a cat", steps=6, strength=0.6, count=4, seed=100)
    out = run(runner, job)
    assert [g.seed for g in out] == [100, 101, 102, 103]
    assert len({png(g) for g in out}) == 4
    [third] = run(runner, replace(job, count=1, seed=102))
    assert np.array_equal(pixels(third), pixels(out[2]))


def test_upscale_doubles_the_size(runner, input_png) -> None:
    progress: list[Progress] = []
    job = Upscale(job_id="u", image=input_png, steps=10, strength=0.3)
    [out] = run(runner, job, progress=progress)
    assert out.image.size == (2 * SIZE, 2 * SIZE)
    assert [p.step for p in progress] == [1, 2, 3]
    assert {p.phase for p in progress} == {"upscale"}


# --- models, samplers, threads -----------------------------------------------------------------


def test_single_file_model_matches_the_folder_model(runner) -> None:
    folder = run(runner, t2i(model="tiny-base", count=2))
    single = run(runner, t2i(model="tiny-single", count=2))
    assert [png(g) for g in folder] == [png(g) for g in single]


def test_jobs_never_touch_the_shared_scheduler(runner, registry) -> None:
    model = registry.get()
    before = (model.base.scheduler, dict(model.base.scheduler.config), model.refiner.scheduler)
    run(runner, t2i(sampler="unipc", count=2))
    assert before == (model.base.scheduler, dict(model.base.scheduler.config), model.refiner.scheduler)
    private, _ = fresh_pipeline(model.base, "euler_a")
    assert private.scheduler is not model.base.scheduler
    assert private.unet is model.base.unet and private.vae is model.base.vae


def test_private_pipeline_pins_the_execution_device_unless_offloaded(registry) -> None:
    model = registry.get()
    for pipe in (model.base, model.refiner, model.img2img):
        private, _ = fresh_pipeline(pipe, "euler", images=2)
        assert isinstance(private, type(pipe)) and type(private).__name__ == type(pipe).__name__
        assert private._execution_device == pipe._execution_device
    model.base.vae._hf_hook = object()  # as accelerate's offloading would leave it
    try:
        private, _ = fresh_pipeline(model.base, "euler")
        assert type(private) is type(model.base)  # diffusers' own lookup of the hooks' device
    finally:
        del model.base.vae._hf_hook


def test_concurrent_jobs_match_sequential_ones(runner) -> None:
    jobs = [t2i(sampler="dpmpp_2m_karras", seed=1), t2i(sampler="euler_a", seed=2, count=2)]
    expected = [[png(g) for g in run(runner, job)] for job in jobs]
    results: dict[int, list[bytes]] = {}

    def work(k: int) -> None:
        results[k] = [png(g) for g in run(runner, jobs[k])]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [results[0], results[1]] == expected


def test_img2img_step_arithmetic() -> None:
    assert img2img_call_steps(30, 0.3) == 30
    assert img2img_call_steps(2, 0.3) == 4  # int(4 × 0.3) = 1 step, as engine.cost charges
    assert img2img_call_steps(1, 0.05) == 20


def test_warmup_runs_every_configured_size(registry) -> None:
    generation = GenerationSettings(aspects={"1:1": "256x256", "2:1": "512x256"})
    runner = Runner(registry, EngineSettings(device="cpu", preview_every=0), generation)
    assert set(runner.warmup()) == {(256, 256), (512, 256)}


def test_bf16_weights_run_every_job_kind(tiny_models_config, input_png) -> None:
    """The GPU precision path (bf16 UNet, VAE and encoders), exercised on the CPU."""
    engine = EngineSettings(device="cpu", dtype="bf16", preview_every=1, cfg_cutoff=0.5, vae_tiling_above=256)
    registry = ModelRegistry({"tiny": tiny_models_config["tiny"]}, engine)
    runner = Runner(registry, engine, GenerationSettings())
    assert registry.get().base.unet.dtype == torch.bfloat16
    jobs = [
        t2i(count=2),
        Refine(job_id="r", image=input_png, steps=4, strength=0.5),
        Variations(job_id="v", image=input_png, steps=4, count=2),
        Upscale(job_id="u", image=input_png, steps=4, strength=0.5),
    ]
    for job in jobs:
        for out in run(runner, job):
            assert np.asarray(out.image).std() > 0
