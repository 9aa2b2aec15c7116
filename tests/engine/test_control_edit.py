"""ControlNet for Variations (img2img) and Vary Region (inpainting), as jobs made from a controlled
result carry it (engine.control_edit): real diffusers ControlNet img2img and inpainting pipelines
on the tiny model and its tiny ControlNet.

What is proved: at strength 0 the images are exactly those of the same job without control (the
same computation, the ControlNet's residuals times 0, the source encoded as engine.vae does); at
strength 1 they follow the map; an edit still keeps its kept pixels exactly; a batch stays exact;
the map fitted to an inpainting work box runs; the fields are checked, stored and shown."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw

from config.addons import ControlNetSettings
from config.settings import EngineSettings, GenerationSettings, load_settings
from engine import annotators
from engine.control_edit import prepare_inpaint
from engine.inpaint import inpaint
from engine.jobs import Edit, JobOrder, Limits, Variations, load_order
from engine.masks import region_mask
from engine.models import ModelRegistry
from engine.pipelines import Generated, Runner
from engine.pnginfo import read_parameters
from engine.protocol import WorkerConfig
from engine.serving import encode_result
from engine.tiny_addons import CONTROLNET
from engine.validate import ValidationFailed
from tests.engine.test_editing import far_from

SIZE = 128
LIMITS = Limits(
    models=("tiny",),
    max_prompt_chars=500,
    max_attachment_bytes=10**6,
    max_attachment_pixels=10**6,
    upscale_max_side=4096,
)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def picture(size: tuple[int, int] = (SIZE, SIZE), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)


def edge_map(size: tuple[int, int] = (SIZE, SIZE), shape: str = "box") -> bytes:
    """A parent's stored control map: white edges on black."""
    image = Image.new("RGB", size, "black")
    draw = ImageDraw.Draw(image)
    width, height = size
    box = (width // 5, height // 5, width * 4 // 5, height * 4 // 5)
    (draw.rectangle if shape == "box" else draw.ellipse)(box, outline="white", width=3)
    return png(image)


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int64)


def mean_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(arr(a) - arr(b)).mean())


def control(strength: float, shape: str = "box", size: tuple[int, int] = (SIZE, SIZE)) -> dict[str, Any]:
    """The control a child job carries: the parent's mode, strength and map, given as is."""
    return {
        "control": "edges",
        "control_as_is": True,
        "control_strength": strength,
        "control_image": edge_map(size, shape),
    }


@pytest.fixture(scope="module")
def runner(
    one_thread: None, tiny_addons_dir: Path, tiny_models_config: dict[str, dict[str, object]]
) -> Iterator[Runner]:
    settings = EngineSettings(device="cpu", preview_every=0)
    nets = {"edges": ControlNetSettings(model=str(tiny_addons_dir / CONTROLNET))}
    made = Runner(ModelRegistry(tiny_models_config, settings, controlnets=nets), settings, GenerationSettings())
    yield made
    made.registry.unload()
    annotators.clear_annotators()


def run(runner: Runner, job: Any) -> list[Generated]:
    return runner.run(job, on_progress=lambda _: None, cancelled=lambda: False)


def variations(**fields: Any) -> Variations:
    defaults: dict[str, Any] = {
        "job_id": "v",
        "prompt": "a cat on a windowsill",
        "steps": 4,
        "seed": 11,
        "count": 1,
        "strength": 0.6,
        "image": png(picture()),
    }
    return Variations(**{**defaults, **fields})


def edit(**fields: Any) -> Edit:
    defaults: dict[str, Any] = {
        "job_id": "e",
        "prompt": "a red door",
        "steps": 4,
        "seed": 5,
        "regions": ("center",),
        "image": png(picture(seed=2)),
    }
    return Edit(**{**defaults, **fields})


def test_variations_strength_0_is_exactly_no_control_and_strength_1_follows_the_map(runner: Runner) -> None:
    plain = run(runner, variations())[0]
    off = run(runner, variations(**control(0.0)))[0]
    full = run(runner, variations(**control(1.0)))[0]
    other = run(runner, variations(**control(1.0, "ellipse")))[0]
    print(f"variations: |strength 1 - none| = {mean_diff(full.image, plain.image):.2f}")
    assert off.image.tobytes() == plain.image.tobytes()
    assert mean_diff(full.image, plain.image) > 1.0
    assert mean_diff(full.image, other.image) > 0.5  # the map steers, not only the ControlNet being there
    assert full.control is not None and full.control.size == (SIZE, SIZE)
    assert full.params["Control"] == "edges"
    assert full.params["ControlNet 0"].startswith("Module: none, Model: controlnet, Weight: 1,")


def test_variations_batch_image_i_is_the_one_image_job_with_seed_plus_i(runner: Runner) -> None:
    batch = run(runner, variations(count=2, **control(1.0)))
    second = run(runner, variations(seed=12, **control(1.0)))[0]
    assert batch[1].image.tobytes() == second.image.tobytes()
    assert batch[0].control is not None and batch[1].control is None  # the map once, on the first


def test_edit_strength_0_is_exactly_no_control_keeps_the_rest_and_strength_1_follows_the_map(
    runner: Runner,
) -> None:
    source = Image.open(io.BytesIO(edit().image)).convert("RGB")
    plain = run(runner, edit())[0]
    off = run(runner, edit(**control(0.0)))[0]
    full = run(runner, edit(**control(1.0)))[0]
    print(f"edit: |strength 1 - none| = {mean_diff(full.image, plain.image):.2f}")
    assert off.image.tobytes() == plain.image.tobytes()
    mask = np.asarray(region_mask(("center",), source.size)) == 255
    redone = np.abs(arr(full.image) - arr(plain.image))[mask].mean()
    assert redone > 1.0
    kept = far_from(region_mask(("center",), source.size), 32)
    assert kept.any()
    assert np.abs(arr(full.image) - arr(source))[kept].max() == 0  # the kept pixels, exactly
    assert full.control is not None and full.control.size == source.size
    assert full.params["Control"] == "edges"


def test_inpainting_in_a_work_box_gets_the_map_cut_and_scaled_like_the_source(runner: Runner) -> None:
    """A region worked on around itself (a large source's path): the map is cut to the same box
    and scaled to the same work size; at strength 0 still exactly the image without control."""
    model = runner.registry.get("tiny")
    size = (256, 256)
    source = picture(size, seed=4)
    mask = region_mask(("top-left",), size)
    common: dict[str, Any] = {
        "image": source,
        "mask": mask,
        "prompt": "a red door",
        "steps": 4,
        "cfg": 5.0,
        "sampler": "euler",
        "strength": 0.9,
        "seeds": [3],
        "padding_mask_crop": 16,
        "work_pixels": SIZE * SIZE,
    }
    plain = inpaint(model.base, **common)[0]
    made = []
    for strength in (0.0, 1.0):
        job = edit(**control(strength, size=size))
        ctl = prepare_inpaint(runner, model, job, base=model.base, images=1, size=size)
        made.append(inpaint(model.base, control=ctl, **common)[0])
    assert made[0].tobytes() == plain.tobytes()
    assert mean_diff(made[1], plain) > 0.1


def test_fields_are_checked_stored_and_shown() -> None:
    for job in (variations(**control(0.7)), edit(**control(0.7))):
        job.check(LIMITS)
        stored = json.loads(json.dumps(JobOrder(job, input_size=(SIZE, SIZE)).to_json()))
        assert "control_image" not in stored and stored["control"] == "edges" and stored["control_as_is"] is True
        again = load_order(job.kind, stored, job_id=job.job_id, image=job.image).spec
        assert again == replace(job, control_image=b"")  # the map lives in the inputs folder
        assert replace(again, control_image=job.control_image) == job
        assert job.result_fields()["Control"] == "edges (map as given) · strength 0.7"
        assert job.batch_key() is None
        plain = replace(job, control="", control_image=b"")
        assert "Control" not in plain.result_fields()
        assert plain.cost((SIZE, SIZE)) == job.cost((SIZE, SIZE))  # control is part of the service
        for bad, needle in (
            ({"control_image": b""}, "needs a control image"),
            ({"control_strength": 2.5}, "control_strength must be between 0"),
            ({"control": "scribble"}, "`scribble` is not set up"),
        ):
            with pytest.raises(ValidationFailed, match=needle):
                replace(job, **bad).check(LIMITS)
    # A job stored before these fields existed still loads, without control.
    old = {k: v for k, v in JobOrder(variations(), input_size=(SIZE, SIZE)).to_json().items() if "control" not in k}
    assert load_order("variations", old, job_id="v").spec.control == ""


def test_result_png_parameters_name_the_controlnet(runner: Runner) -> None:
    job = variations(steps=2, **control(0.8))
    images = run(runner, job)
    config = WorkerConfig.from_settings(load_settings(models={"tiny": {"base": "x/y"}}))
    result = encode_result(config, job, list(images), started=0.0, compute_seconds=0.0, version="test")
    params = read_parameters(result.images[0].data)
    assert params is not None and params["Control"] == "edges"
    assert params["ControlNet 0"] == (
        "Module: none, Model: controlnet, Weight: 0.8, Resize Mode: Crop and Resize, "
        "Guidance Start: 0, Guidance End: 0.8"
    )
    assert result.control is not None and (result.control.width, result.control.height) == (SIZE, SIZE)
