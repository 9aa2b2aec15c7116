"""LoRAs, embeddings and draft mode on the tiny SDXL through the real pipelines (engine.styling,
engine.loras, engine.embeddings): each proves its effect on the image, the exact no-effect cases
(weight 0, a job without LoRAs after one with them), that switching sets reads nothing from disk,
and that `atelier models check` reports a LoRA that does not fit."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from config.addons import EmbeddingSettings, LoraSettings, ModelSettings
from config.settings import EngineSettings, GenerationSettings
from engine.jobs import Text2Img, Variations, Zoom
from engine.jobs.events import Progress
from engine.loras import LoraError
from engine.model_check import check_models
from engine.models import ModelRegistry
from engine.pipelines import Generated, Runner
from engine.prompts import _compel, clear_prompt_cache, encode_prompt
from engine.styles import Catalog
from engine.styling import Styling
from engine.tiny_addons import EMBEDDING, EMBEDDING_TOKEN, LORA_DIFFUSERS, LORA_DRAFT, LORA_KOHYA
from engine.weights import ModelLoadError

SIZE = 128
TOKEN = EMBEDDING_TOKEN.strip("<>")

pytestmark = pytest.mark.usefixtures("one_thread")


def models_config(root: Path) -> dict[str, ModelSettings]:
    return {
        "tiny": ModelSettings(
            base=str(root / "base"), refiner=str(root / "refiner"), default=True, draft_lora=str(root / LORA_DRAFT)
        ),
        "tiny-unet-draft": ModelSettings(
            base=str(root / "base"), draft_unet=str(root / "single" / "base.safetensors"), draft_sampler="lcm"
        ),
        "plain": ModelSettings(base=str(root / "base")),
    }


def catalog_for(root: Path, **extra_loras: LoraSettings) -> Catalog:
    loras = {
        "kohya": LoraSettings(file=str(root / LORA_KOHYA), weight=1.0, trigger="watercolor painting"),
        "diffusers": LoraSettings(file=str(root / LORA_DIFFUSERS), weight=1.0),
        **extra_loras,
    }
    return Catalog(
        loras=loras,
        embeddings={TOKEN: EmbeddingSettings(file=str(root / EMBEDDING))},
        models=models_config(root),
        default_model="tiny",
    )


@pytest.fixture(scope="module")
def registry(tiny_model_dir: Path) -> ModelRegistry:
    # models_in_ram 3: the models of this module stay loaded (their adapters with them).
    return ModelRegistry(models_config(tiny_model_dir), EngineSettings(device="cpu", models_in_ram=3))


def make_runner(registry: ModelRegistry, catalog: Catalog, **engine: Any) -> Runner:
    settings = EngineSettings(device="cpu", preview_every=0, **engine)
    return Runner(registry, settings, GenerationSettings(), catalog=catalog)


@pytest.fixture(scope="module")
def runner(registry: ModelRegistry, tiny_model_dir: Path) -> Runner:
    return make_runner(registry, catalog_for(tiny_model_dir))


def run(runner: Runner, job: Any, progress: list[Progress] | None = None) -> list[Generated]:
    sink = progress if progress is not None else []
    return runner.run(job, on_progress=sink.append, cancelled=lambda: False)


def pixels(job_images: list[Generated]) -> np.ndarray:
    return np.stack([np.asarray(g.image, dtype=np.int16) for g in job_images])


def t2i(**fields: Any) -> Text2Img:
    defaults = {"job_id": "s", "prompt": "a cat in a hat", "width": SIZE, "height": SIZE, "steps": 3, "seed": 11}
    return Text2Img(**{"refiner": False, **defaults, **fields})


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def plain(runner: Runner) -> np.ndarray:
    """The job without any LoRA, made before any LoRA was ever loaded into the model."""
    assert not runner.styling.loras.state(runner.registry.get("tiny")).adapters
    return pixels(run(runner, t2i()))


# --- LoRAs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", ["kohya", "diffusers"])
def test_lora_at_weight_0_is_exactly_no_lora_and_at_weight_1_changes_the_image(
    runner: Runner, plain: np.ndarray, lora: str
) -> None:
    at_one = pixels(run(runner, t2i(loras=((lora, 1.0),))))
    at_zero = pixels(run(runner, t2i(loras=((lora, 0.0),))))
    print(f"{lora}: mean |diff| at weight 1 = {diff(at_one, plain):.2f}")
    assert diff(at_one, plain) > 4.0
    assert np.array_equal(at_zero, plain)


def test_a_job_without_loras_after_lora_jobs_equals_the_model_that_never_had_one(
    runner: Runner, plain: np.ndarray
) -> None:
    # The kohya LoRA adapts both text encoders too: a prompt embedding cached under it must not
    # serve the plain job (engine.prompts keys its cache by the active LoRAs).
    styled = pixels(run(runner, t2i(loras=(("kohya", 0.7), ("diffusers", 0.5)))))
    again = pixels(run(runner, t2i()))
    assert diff(styled, plain) > 1.0
    assert np.array_equal(again, plain)


def test_switching_between_sets_reads_nothing_from_disk(registry: ModelRegistry, tiny_model_dir: Path) -> None:
    runner = make_runner(registry, catalog_for(tiny_model_dir))
    model = registry.get("plain")  # its own adapters: other tests' loads do not count here
    sets = [(("kohya", 1.0),), (("diffusers", 0.8),), (("kohya", 0.5), ("diffusers", 1.0)), (), (("kohya", 1.0),)]
    images = [pixels(run(runner, t2i(model="plain", loras=loras))) for loras in sets]
    assert runner.styling.loras.loads == 2  # each file read once, then only set_adapters
    assert set(runner.styling.loras.state(model).adapters) == {"kohya", "diffusers"}
    assert np.array_equal(images[0], images[4])  # back to the first set: the very same image
    assert len({image.tobytes() for image in images[:4]}) == 4


def test_over_the_cache_budget_the_least_recently_used_lora_leaves(
    registry: ModelRegistry, tiny_model_dir: Path
) -> None:
    runner = make_runner(registry, catalog_for(tiny_model_dir), lora_cache_mb=0)
    model = registry.get("plain")
    state = runner.styling.loras.state(model)
    first = pixels(run(runner, t2i(model="plain", loras=(("kohya", 1.0),))))
    run(runner, t2i(model="plain", loras=(("diffusers", 1.0),)))
    assert list(state.adapters) == ["diffusers"]  # budget 0: only what the job needs stays
    again = pixels(run(runner, t2i(model="plain", loras=(("kohya", 1.0),))))
    assert runner.styling.loras.loads == 3
    assert np.array_equal(first, again)


def test_loras_reach_image_kinds_too(runner: Runner) -> None:
    source = run(runner, t2i(seed=3))[0].image
    out = io.BytesIO()
    source.save(out, "PNG")

    def vary(loras: tuple[tuple[str, float], ...]) -> np.ndarray:
        job = Variations(job_id="v", image=out.getvalue(), prompt="a cat", steps=4, strength=0.6, count=1, loras=loras)
        return pixels(run(runner, job))

    none, zero, one = vary(()), vary((("kohya", 0.0),)), vary((("kohya", 1.0),))
    assert np.array_equal(zero, none)
    assert diff(one, none) > 1.0


def test_loras_reach_the_inpainting_kinds(runner: Runner) -> None:
    rng = np.random.default_rng(4)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (128, 192, 3), dtype=np.uint8)).save(out, "PNG")

    def zoom(loras: tuple[tuple[str, float], ...]) -> np.ndarray:
        job = Zoom(job_id="z", prompt="a wide landscape", steps=3, seed=3, image=out.getvalue(), loras=loras)
        return pixels(run(runner, job))

    none, zero, one = zoom(()), zoom((("diffusers", 0.0),)), zoom((("diffusers", 1.0),))
    assert np.array_equal(zero, none)
    assert diff(one, none) > 1.0  # the generated frame changes (the kept centre does not)


def test_a_lora_that_does_not_fit_fails_the_job_clearly(
    registry: ModelRegistry, tiny_model_dir: Path, tmp_path: Path
) -> None:
    bad = misfit_lora(tiny_model_dir, tmp_path)
    runner = make_runner(registry, catalog_for(tiny_model_dir, bad=LoraSettings(file=str(bad))))
    with pytest.raises(LoraError) as failure:
        run(runner, t2i(model="plain", loras=(("bad", 1.0),)))
    assert not failure.value.retryable
    assert "`bad`" in str(failure.value) and "tell a moderator" in str(failure.value)
    assert "size mismatch" in failure.value.detail
    # Nothing is left behind: the model still makes its plain image.
    model = registry.get("plain")
    assert "lora_bad" not in {a for names in model.base.get_list_adapters().values() for a in names}
    run(runner, t2i(model="plain"))


# --- embeddings ----------------------------------------------------------------------------------


def test_embedding_in_the_prompt_changes_the_image_and_weighting_still_works(runner: Runner, plain: np.ndarray) -> None:
    with_token = pixels(run(runner, t2i(prompt=f"a cat in a hat {EMBEDDING_TOKEN}")))
    assert diff(with_token, plain) > 4.0
    weighted = pixels(run(runner, t2i(prompt=f"a cat in a hat ({EMBEDDING_TOKEN})0.5")))
    assert diff(weighted, with_token) > 0.5  # compel's weighting applies to the embedding's vectors
    # Loaded, but a prompt without it is untouched.
    assert np.array_equal(pixels(run(runner, t2i())), plain)
    assert runner.styling.embeddings.loaded(runner.registry.get("tiny")) == {TOKEN}


def test_a_multi_vector_embedding_expands_to_all_its_vectors(runner: Runner) -> None:
    model = runner.registry.get("tiny")
    runner.styling.embeddings.ensure(model, [TOKEN])
    for tokenizer, encoder in ((model.base.tokenizer, model.base.text_encoder), (model.refiner.tokenizer_2, None)):
        ids = tokenizer.convert_tokens_to_ids([EMBEDDING_TOKEN, f"{EMBEDDING_TOKEN}_1"])
        compel = _compel(tokenizer, encoder or model.base.text_encoder_2, pooled=False)
        tokens = compel.conditioning_provider.get_token_ids([f"a {EMBEDDING_TOKEN} cat"])[0]
        assert tokens[2:4] == ids  # bos, "a", then both vectors where the one token was


def test_the_refiner_reads_the_embedding_as_the_base_does(runner: Runner) -> None:
    model = runner.registry.get("tiny")
    runner.styling.embeddings.ensure(model, [TOKEN])
    prompt = f"a cat {EMBEDDING_TOKEN}"
    base = encode_prompt(model.base, prompt, guidance=False).prompt_embeds
    clear_prompt_cache()  # the refiner must encode it itself, not find the base's result
    refiner = encode_prompt(model.refiner, prompt, guidance=False).prompt_embeds
    width = model.base.text_encoder.config.hidden_size
    assert torch.equal(refiner, base[..., width:])  # the shared second encoder, the same vectors


# --- draft mode ----------------------------------------------------------------------------------


def test_draft_runs_draft_steps_with_the_adapter_and_without_the_refiner(runner: Runner, plain: np.ndarray) -> None:
    progress: list[Progress] = []
    draft = t2i(draft=True, steps=4, sampler="euler_trailing", cfg=1.0, refiner=True)
    drafted = pixels(run(runner, draft, progress))
    assert [p.step for p in progress] == [1, 2, 3, 4] and progress[-1].total == 4  # base only, 4 steps
    assert {p.phase for p in progress} == {"base"}
    # The same schedule without the adapter: a different image (the draft LoRA is on).
    no_adapter = t2i(steps=4, sampler="euler_trailing", cfg=1.0)
    assert diff(drafted, pixels(run(runner, no_adapter))) > 1.0
    # And afterwards a plain job is the plain image again.
    assert np.array_equal(pixels(run(runner, t2i())), plain)


def test_draft_unet_replaces_the_base_unet_for_the_job(runner: Runner) -> None:
    # The fixture's "draft UNet" is the base's own UNet as one file: same weights, so the draft job
    # equals the base with the draft's scheduler, proving the file loaded and took the UNet's place.
    job = t2i(model="tiny-unet-draft", draft=True, steps=4, sampler="lcm", cfg=1.0)
    drafted = pixels(run(runner, job))
    reference = pixels(run(runner, t2i(model="tiny-unet-draft", steps=4, sampler="lcm", cfg=1.0)))
    assert np.allclose(drafted, reference, atol=1)
    model = runner.registry.get("tiny-unet-draft")
    assert runner.styling.loras.state(model).draft_unet is not model.base.unet


# --- start-up and models check -------------------------------------------------------------------


def misfit_lora(root: Path, folder: Path) -> Path:
    """The tiny kohya LoRA with every matrix twice as wide: the keys fit, the shapes do not."""
    state = {}
    with safe_open(str(root / LORA_KOHYA), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - not a dict
            tensor = handle.get_tensor(key)
            if key.endswith("lora_down.weight"):
                tensor = torch.randn(tensor.shape[0], tensor.shape[1] * 2)
            elif key.endswith("lora_up.weight"):
                tensor = torch.randn(tensor.shape[0] * 2, tensor.shape[1])
            state[key] = tensor
    path = folder / "misfit.safetensors"
    save_file(state, str(path))
    return path


def test_start_up_refuses_missing_and_wrong_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    not_lora = tmp_path / "not-a-lora.safetensors"
    save_file({"weight": torch.zeros(2)}, str(not_lora))
    catalog = catalog_for(
        tiny_model_dir,
        gone=LoraSettings(file=str(tmp_path / "gone.safetensors")),
        empty=LoraSettings(file=str(not_lora)),
    )
    catalog = Catalog(
        loras=catalog.loras,
        embeddings={**catalog.embeddings, "wrong": EmbeddingSettings(file=str(tiny_model_dir / LORA_DRAFT))},
        models=catalog.models,
        default_model="tiny",
    )
    with pytest.raises(ModelLoadError) as refused:
        Styling(catalog, 64).check_files()
    text = str(refused.value)
    assert "loras.gone.file" in text and "no such file" in text
    assert "loras.empty.file" in text and "no LoRA layers" in text
    assert "embeddings.wrong" in text and "clip_l" in text
    Styling(catalog_for(tiny_model_dir), 64).check_files()  # the good ones pass


def test_models_check_reports_a_lora_that_does_not_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    catalog = catalog_for(tiny_model_dir, misfit=LoraSettings(file=str(misfit_lora(tiny_model_dir, tmp_path))))
    models = {"tiny": catalog.models["tiny"]}
    catalog = Catalog(loras=catalog.loras, embeddings=catalog.embeddings, models=models, default_model="tiny")
    styling = Styling(catalog, 64)
    checks = check_models(models, EngineSettings(device="cpu"), also=styling.checks_for)
    results = {check.name: check for check in checks}
    assert results["tiny"].ok
    for name in ("loras.kohya", "loras.diffusers", "models.tiny.draft_lora", f"embeddings.{TOKEN}"):
        assert results[name].ok, results[name].detail
    assert "UNet layers" in results["loras.kohya"].detail
    misfit = results["loras.misfit"]
    assert not misfit.ok
    assert "does not fit 'tiny'" in misfit.detail and "size mismatch" in misfit.detail
