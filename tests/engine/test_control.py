"""ControlNet text2img through the engine's Runner on the tiny model and its tiny ControlNet and
estimators (engine.tiny_addons): real diffusers pipelines, real annotators, no stand-ins.

What is proved: at strength 0 the image is exactly the one without control (so the pipeline runs
the same computation, the ControlNet's residuals times 0), at strength 1 it follows the map; each
annotator's map is what the pipeline gets; `control_as_is` skips the annotator; batches stay exact;
the ControlNet is loaded once and kept with its model; and what does not fit is refused."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from config.addons import ControlNetSettings
from config.settings import ConfigError, EngineSettings, GenerationSettings, load_settings
from engine import annotators, control
from engine.jobs import Limits, Text2Img
from engine.models import ModelRegistry
from engine.pipelines import Generated, Runner
from engine.pnginfo import read_parameters
from engine.protocol import WorkerConfig
from engine.serving import encode_result
from engine.tiny_addons import CONTROLNET, CONTROLNET_COND_CHANNELS, DEPTH_ANNOTATOR, POSE_ANNOTATOR
from engine.validate import ValidationFailed
from engine.weights import ModelLoadError

SIZE = 128
BAR = 4.0  # mean |diff| on 0–255 that counts as "follows the map" (the contract's bar)


def upload(shape: str = "box", size: tuple[int, int] = (200, 150)) -> bytes:
    """A member's picture: white outlines on grey, PNG."""
    image = Image.new("RGB", size, (60, 60, 60))
    draw = ImageDraw.Draw(image)
    if shape == "box":
        draw.rectangle((40, 30, 150, 120), outline="white", width=4)
    else:
        draw.ellipse((20, 40, 180, 110), outline="white", width=4)
    return png(image)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def pixels(generated: Generated) -> np.ndarray:
    return np.asarray(generated.image, dtype=np.float64)


def diff(a: Generated, b: Generated) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def same(a: Generated, b: Generated) -> bool:
    return np.array_equal(pixels(a), pixels(b))


def controlnets(folder: Path, **tables: dict[str, Any]) -> dict[str, ControlNetSettings]:
    defaults = {
        "edges": {"model": str(folder / CONTROLNET)},
        "depth": {"model": str(folder / CONTROLNET), "annotator": str(folder / DEPTH_ANNOTATOR)},
        "pose": {"model": str(folder / CONTROLNET), "annotator": str(folder / POSE_ANNOTATOR)},
    }
    return {mode: ControlNetSettings(**table) for mode, table in {**defaults, **tables}.items()}


def make_runner(models: dict[str, Any], nets: dict[str, ControlNetSettings], **engine: Any) -> Runner:
    settings = EngineSettings(device="cpu", **engine)
    return Runner(ModelRegistry(models, settings, controlnets=nets), settings, GenerationSettings())


@pytest.fixture(scope="module")
def runner(
    one_thread: None, tiny_addons_dir: Path, tiny_models_config: dict[str, dict[str, object]]
) -> Iterator[Runner]:
    made = make_runner(tiny_models_config, controlnets(tiny_addons_dir))
    yield made
    made.registry.unload()
    annotators.clear_annotators()


def run(runner: Runner, **fields: Any) -> list[Generated]:
    job = Text2Img(
        **{"job_id": "t", "prompt": "a cat on a windowsill", "width": SIZE, "height": SIZE, "steps": 4, "seed": 7}
        | fields
    )
    return runner.run(job, on_progress=lambda _: None, cancelled=lambda: False)


def controlled(runner: Runner, mode: str = "edges", data: bytes | None = None, **fields: Any) -> list[Generated]:
    return run(runner, control=mode, control_image=data if data is not None else upload(), **fields)


@pytest.mark.parametrize("refiner", [False, True], ids=["base-alone", "base-to-refiner"])
def test_strength_0_is_exactly_no_control_and_strength_1_follows_the_map(runner: Runner, refiner: bool) -> None:
    plain = run(runner, refiner=refiner)[0]
    off = controlled(runner, control_strength=0.0, refiner=refiner)[0]
    full = controlled(runner, control_strength=1.0, refiner=refiner)[0]
    other = controlled(runner, data=upload("ellipse"), control_strength=1.0, refiner=refiner)[0]
    print(f"refiner={refiner}: |strength 1 - none| = {diff(full, plain):.2f}, box vs ellipse {diff(full, other):.2f}")
    assert same(off, plain)  # the same computation, the ControlNet's residuals times 0
    assert diff(full, plain) > BAR
    assert diff(full, other) > 1.0  # the map itself steers the image, not just the ControlNet being there


def fitted(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return ImageOps.fit(image.convert("RGB"), (SIZE, SIZE), Image.Resampling.LANCZOS)


@pytest.mark.parametrize("mode", ["edges", "depth", "pose"])
def test_each_annotator_makes_the_map_the_pipeline_follows(runner: Runner, tiny_addons_dir: Path, mode: str) -> None:
    data = upload()
    made = controlled(runner, mode, data, control_strength=1.0, refiner=False)
    plain = run(runner, refiner=False)[0]
    source = fitted(data)
    expected = (
        annotators.edges(source)
        if mode == "edges"
        else annotators.load_annotator(mode, str(tiny_addons_dir / f"annotators/{mode}"))(source)  # type: ignore[arg-type]
    )
    assert made[0].control is not None and made[0].control.size == (SIZE, SIZE)
    assert np.array_equal(np.asarray(made[0].control), np.asarray(expected))
    # The same map given as is: the very same image, so the map is what reached the pipeline.
    as_is = controlled(runner, mode, png(expected), control_as_is=True, control_strength=1.0, refiner=False)
    assert same(as_is[0], made[0])
    assert diff(made[0], plain) > BAR
    module = {"edges": "canny", "depth": "depth", "pose": "openpose"}[mode]
    assert made[0].params["Control"] == mode
    assert made[0].params["ControlNet 0"].startswith(f"Module: {module}, Model: controlnet, Weight: 1,")


def test_control_as_is_never_runs_an_annotator(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an annotator ran for a map given as is")

    monkeypatch.setattr(annotators, "edges", refuse)
    monkeypatch.setattr(annotators, "load_annotator", refuse)
    data = upload()
    for mode in ("edges", "depth", "pose"):
        made = controlled(runner, mode, data, control_as_is=True, refiner=False)
        assert made[0].control is not None
        assert np.array_equal(np.asarray(made[0].control), np.asarray(fitted(data)))
        assert made[0].params["ControlNet 0"].startswith("Module: none,")


def test_batch_image_i_is_the_one_image_job_with_seed_plus_i(runner: Runner) -> None:
    batch = controlled(runner, control_strength=1.0, count=2, seed=20, refiner=True)
    alone = [controlled(runner, control_strength=1.0, count=1, seed=seed, refiner=True)[0] for seed in (20, 21)]
    assert [g.seed for g in batch] == [20, 21]
    assert same(batch[0], alone[0]) and same(batch[1], alone[1])
    assert batch[0].control is not None and batch[1].control is None  # the map once per job


def test_cfg_cutoff_halves_the_control_image_too(
    one_thread: None, tiny_addons_dir: Path, tiny_models_config: dict[str, dict[str, object]]
) -> None:
    cut = make_runner(tiny_models_config, controlnets(tiny_addons_dir), cfg_cutoff=0.5)
    try:
        plain = run(cut, count=2, refiner=False)
        off = controlled(cut, control_strength=0.0, count=2, refiner=False)
        full = controlled(cut, control_strength=1.0, count=2, refiner=False)
        assert same(off[0], plain[0]) and same(off[1], plain[1])
        assert diff(full[1], plain[1]) > BAR
    finally:
        cut.registry.unload()


def test_loaded_once_per_source_kept_with_its_model(runner: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    runner.registry.unload()
    loads: list[str] = []
    real = control.load_controlnet

    def counting(mode: str, settings: ControlNetSettings, dtype: torch.dtype) -> torch.nn.Module:
        loads.append(mode)
        return real(mode, settings, dtype)

    monkeypatch.setattr(control, "load_controlnet", counting)
    for mode in ("edges", "depth", "edges"):  # both modes name the same ControlNet folder
        controlled(runner, mode, control_as_is=True, steps=1, refiner=False)
    model = runner.registry.get("tiny")
    assert loads == ["edges"] and len(model.controlnets) == 1
    run(runner, steps=1, model="tiny-base", refiner=False)  # another model: ours leaves memory with it
    runner.registry.get("tiny-base")
    controlled(runner, "edges", control_as_is=True, steps=1, model="tiny-base", refiner=False)
    assert loads == ["edges", "edges"]  # tiny-base has its own, loaded in its dtype for it


def test_a_mode_not_configured_is_refused(tiny_addons_dir: Path, tiny_models_config: dict[str, Any]) -> None:
    only_edges = make_runner(tiny_models_config, {"edges": controlnets(tiny_addons_dir)["edges"]})
    with pytest.raises(ValidationFailed, match="`pose` is not set up here: pick one of `edges`"):
        controlled(only_edges, "pose", steps=1)
    nothing = make_runner(tiny_models_config, {})
    with pytest.raises(ValidationFailed, match="Control images are not set up"):
        controlled(nothing, "edges", steps=1)


def test_a_controlnet_made_for_another_unet_is_refused(
    tiny_addons_dir: Path, tiny_models_config: dict[str, Any], tmp_path: Path
) -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    refiner_unet = UNet2DConditionModel.from_pretrained(tiny_addons_dir / "refiner" / "unet")
    ControlNetModel.from_unet(
        refiner_unet, conditioning_embedding_out_channels=CONTROLNET_COND_CHANNELS
    ).save_pretrained(tmp_path / "refiner-controlnet")
    wrong = make_runner(tiny_models_config, {"edges": ControlNetSettings(model=str(tmp_path / "refiner-controlnet"))})
    with pytest.raises(ModelLoadError, match=r"controlnets\.edges\.model does not fit the model 'tiny'"):
        controlled(wrong, steps=1)


def test_a_single_file_with_its_config_beside_it_loads_like_the_folder(
    runner: Runner, tiny_addons_dir: Path, tiny_models_config: dict[str, Any], tmp_path: Path
) -> None:
    folder = tiny_addons_dir / CONTROLNET
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path / "tiny-canny.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    single = make_runner(
        tiny_models_config, {"edges": ControlNetSettings(model=str(tmp_path / "tiny-canny.safetensors"))}
    )
    try:
        made = controlled(single, control_strength=1.0, refiner=False)[0]
        assert same(made, controlled(runner, control_strength=1.0, refiner=False)[0])
        assert made.params["ControlNet 0"].startswith("Module: canny, Model: tiny-canny,")
    finally:
        single.registry.unload()
    (tmp_path / "config.json").unlink()
    alone = make_runner(
        tiny_models_config, {"edges": ControlNetSettings(model=str(tmp_path / "tiny-canny.safetensors"))}
    )
    with pytest.raises(ModelLoadError, match=r"put the ControlNet's config\.json"):
        controlled(alone, steps=1)


@pytest.fixture(scope="module")
def union_dir(tiny_addons_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ControlNet-Union (xinsir's architecture, random weights, zero convolutions redrawn)."""
    from diffusers import ControlNetUnionModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_addons_dir / "base" / "unet")
    config = dict(
        ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_COND_CHANNELS).config
    )
    width = unet.config.block_out_channels[0]  # the control features' width (320 on SDXL)
    config |= {"num_trans_channel": width, "num_proj_channel": width, "num_trans_head": 2}
    config.pop("_use_default_values", None)  # it would put the defaults (320) back
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        net = ControlNetUnionModel.from_config(config)
        with torch.no_grad():
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0.0, 1.0 / conv.weight[0].numel() ** 0.5)
            # The control type reaches the features through the task embedding and a projection
            # that starts at zero too: drawn so that the types differ visibly.
            net.spatial_ch_projs.weight.normal_(0.0, 1.0)
            net.task_embedding.normal_(0.0, 4.0)
    folder = tmp_path_factory.mktemp("union") / "controlnet-union"
    net.save_pretrained(folder, safe_serialization=True)
    return folder


def test_union_controlnet_gets_each_modes_control_type(
    one_thread: None, union_dir: Path, tiny_addons_dir: Path, tiny_models_config: dict[str, Any]
) -> None:
    nets = {
        "edges": ControlNetSettings(model=str(union_dir), union_mode=3),
        "depth": ControlNetSettings(
            model=str(union_dir), union_mode=1, annotator=str(tiny_addons_dir / DEPTH_ANNOTATOR)
        ),
    }
    union = make_runner(tiny_models_config, nets, cfg_cutoff=0.5)
    try:
        plain = run(union, refiner=True)[0]
        off = controlled(union, control_strength=0.0, refiner=True)[0]
        assert same(off, plain)
        as_edges = controlled(union, "edges", control_as_is=True, control_strength=1.0, refiner=False)[0]
        as_depth = controlled(union, "depth", control_as_is=True, control_strength=1.0, refiner=False)[0]
        assert diff(as_edges, run(union, refiner=False)[0]) > BAR
        assert diff(as_edges, as_depth) > 1.0  # same map, other control type
        assert len(union.registry.get("tiny").controlnets) == 1  # one Union model serves both modes
        batch = controlled(union, "edges", control_strength=1.0, count=2, seed=3, refiner=False)
        assert same(batch[1], controlled(union, "edges", control_strength=1.0, seed=4, refiner=False)[0])
    finally:
        union.registry.unload()
    bad = make_runner(tiny_models_config, {"edges": ControlNetSettings(model=str(union_dir), union_mode=9)})
    with pytest.raises(ModelLoadError, match="union_mode to one of 0–5"):
        controlled(bad, steps=1)


def test_png_parameters_and_the_result_carry_the_control(runner: Runner, tiny_addons_dir: Path) -> None:
    job = Text2Img(
        job_id="pnginfo",
        prompt="a cat",
        width=SIZE,
        height=SIZE,
        steps=2,
        refiner=False,
        control="edges",
        control_image=upload(),
        control_strength=0.8,
    )
    images = runner.run(job, on_progress=lambda _: None, cancelled=lambda: False)
    config = WorkerConfig.from_settings(load_settings(models={"tiny": {"base": "x/y"}}))
    result = encode_result(config, job, list(images), started=0.0, compute_seconds=0.0, version="test")
    params = read_parameters(result.images[0].data)
    assert params is not None
    assert params["Control"] == "edges"
    assert params["ControlNet 0"] == (
        "Module: canny, Model: controlnet, Weight: 0.8, Resize Mode: Crop and Resize, "
        "Guidance Start: 0, Guidance End: 0.8"
    )
    assert result.control is not None and (result.control.width, result.control.height) == (SIZE, SIZE)
    with Image.open(io.BytesIO(result.control.data)) as shown:
        assert np.array_equal(np.asarray(shown.convert("RGB")), np.asarray(images[0].control))


def test_job_checks_and_storage_keep_the_upload_out_of_the_params() -> None:
    limits = Limits(
        models=["tiny"],
        max_prompt_chars=100,
        max_attachment_bytes=10**6,
        max_attachment_pixels=10**6,
        upscale_max_side=4096,
    )
    good = Text2Img(job_id="j", prompt="p", width=256, height=256, control="depth", control_image=upload())
    good.check(limits)
    params = good.to_params()
    assert "control_image" not in params and params["control"] == "depth" and params["control_strength"] == 0.8
    assert Text2Img.from_params(json.loads(json.dumps(params)), job_id="j").control_image == b""
    assert good.batch_key() is None  # a job with an upload runs alone
    bad = [
        ({"control": "depth"}, "needs a control image"),
        ({"control": "scribble", "control_image": upload()}, "`scribble` is not set up"),
        ({"control": "edges", "control_image": b"not a picture"}, "PNG, JPEG or WebP"),
        (
            {"control": "edges", "control_image": upload(), "control_strength": 2.5},
            "control_strength must be between 0",
        ),
        ({"control_guidance_start": 0.9, "control_guidance_end": 0.5}, "control_guidance_end must be after"),
    ]
    for fields, needle in bad:
        with pytest.raises(ValidationFailed, match=needle):
            Text2Img(job_id="j", prompt="p", width=256, height=256, **fields).check(limits)


def test_models_check_loads_each_mode_and_reports_a_misfit(
    tiny_addons_dir: Path, tiny_models_config: dict[str, Any], tmp_path: Path
) -> None:
    from config.addons import ModelSettings

    models = {"tiny": ModelSettings.model_validate(tiny_models_config["tiny"])}
    nets = controlnets(
        tiny_addons_dir, pose={"model": str(tmp_path / "missing"), "annotator": str(tiny_addons_dir / POSE_ANNOTATOR)}
    )
    checks = {c.name: c for c in control.check_controlnets(models, "tiny", EngineSettings(device="cpu"), nets)}
    assert checks["controlnets.edges"].ok and "ControlNet (folder)" in checks["controlnets.edges"].detail
    assert checks["controlnets.depth"].ok and "depth estimator (folder)" in checks["controlnets.depth"].detail
    assert not checks["controlnets.pose"].ok and "controlnets.pose.model" in checks["controlnets.pose"].detail


def test_settings_and_start_up_refuse_what_cannot_work(
    tiny_addons_dir: Path, tiny_models_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = {"tiny": {"base": "org/model"}}
    cases = [
        ({"scribble": {"model": "org/cn"}}, "controlnets.scribble: unknown mode"),
        ({"edges": {"model": "org/cn", "annotator": "org/depth"}}, "edges are found by Canny"),
        ({"depth": {"model": "org/cn"}}, "controlnets.depth.annotator: set it to the depth estimator"),
        ({"edges": {"model": "/models/cn.ckpt"}}, "pickle checkpoint"),
        ({"edges": {"model": "org/cn", "union_mode": -1}}, "union_mode"),
        ({"edges": {"model": "org/cn", "strength": 1}}, "unknown key"),
    ]
    for table, needle in cases:
        with pytest.raises(ConfigError, match=needle):
            load_settings(models=model, controlnets=table)
    settings = load_settings(
        models=model, controlnets={"pose": {"model": "org/cn", "annotator": "org/pose"}, "edges": {"model": "org/cn"}}
    )
    assert settings.control_modes == ["edges", "pose"]  # /generate's order, not the file's
    with pytest.raises(ModelLoadError, match=r"controlnets\.edges\.model = '/nowhere/cn': no such file or folder"):
        ModelRegistry(
            tiny_models_config,
            EngineSettings(device="cpu"),
            controlnets={"edges": ControlNetSettings(model="/nowhere/cn")},
        )
    with pytest.raises(ModelLoadError, match=r"controlnets\.depth\.annotator = .* has no config\.json"):
        ModelRegistry(
            tiny_models_config,
            EngineSettings(device="cpu"),
            controlnets={"depth": ControlNetSettings(model=str(tiny_addons_dir / CONTROLNET), annotator=str(tmp_path))},
        )


def test_atelier_models_check_lists_each_controlnet(
    tiny_addons_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bot.cli import main

    config = tmp_path / "atelier.toml"
    config.write_text(
        "[engine]\ndevice = 'cpu'\n"
        f"[models.tiny]\nbase = '{tiny_addons_dir / 'base'}'\n"
        f"[controlnets.edges]\nmodel = '{tiny_addons_dir / CONTROLNET}'\n"
        f"[controlnets.pose]\nmodel = '{tiny_addons_dir / CONTROLNET}'\n"
        f"annotator = '{tiny_addons_dir / POSE_ANNOTATOR}'\n"
    )
    monkeypatch.setenv("ATELIER_CONFIG", str(config))
    assert main(["models", "check"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "tiny"],
        ["ok", "controlnets.edges"],
        ["ok", "controlnets.pose"],
    ]
    assert "pose estimator (folder)" in lines[2] and "fits model 'tiny'" in lines[2]
