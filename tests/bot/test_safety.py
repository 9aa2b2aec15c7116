"""The safety rule (pure) and the checker against the REAL nudenet model.

No image is stored in the repository: the explicit-path input is drawn here with PIL. It is a
crude blurred skin-toned rectangle with two round shapes on it, which nudenet 3.4's detector
reads as two FEMALE_BREAST_EXPOSED (~0.83–0.87) and BELLY_EXPOSED (~0.63, ~0.4) at every size
from 256² to 1024² and in PNG, WebP and JPEG. A flat or noisy image gives no detection at all.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from bot.safety import (
    CLEAN,
    DEFAULT_EXPLICIT_LABELS,
    NUDENET_LABELS,
    Decision,
    SafetyChecker,
    SafetyUnavailable,
    SafetyVerdict,
    decide,
    validate_labels,
    verdict_from_detections,
)
from config.settings import SafetySettings

SKIN = (224, 172, 140)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def skin_figure(size: int = 512) -> Image.Image:
    """The synthetic input the real detector flags (see the module docstring)."""
    image = Image.new("RGB", (size, size), (40, 40, 60))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle([size * 0.2, size * 0.05, size * 0.8, size * 1.0], radius=size * 0.15, fill=SKIN)
    for x in (0.36, 0.64):
        box = [size * (x - 0.12), size * 0.3, size * (x + 0.12), size * 0.54]
        draw.ellipse(box, fill=(235, 180, 150), outline=(190, 130, 110))
        draw.ellipse([size * (x - 0.02), size * 0.40, size * (x + 0.02), size * 0.44], fill=(170, 90, 80))
    return image.filter(ImageFilter.GaussianBlur(4 * size / 512))


def landscape(size: int = 512) -> Image.Image:
    """Sky, hills and a sun: nothing nudenet detects."""
    image = Image.new("RGB", (size, size), (110, 160, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size * 0.7, size * 0.1, size * 0.85, size * 0.25], fill=(250, 220, 90))
    draw.polygon(
        [(0, size * 0.7), (size * 0.4, size * 0.45), (size, size * 0.75), (size, size), (0, size)],
        fill=(60, 130, 60),
    )
    return image


@pytest.fixture(scope="module")
def figure_png() -> bytes:
    return encode(skin_figure())


# ---------------------------------------------------------------------------- the pure rule


def det(label: str, score: float) -> dict[str, object]:
    return {"class": label, "score": score, "box": [0, 0, 10, 10]}


def test_no_detections_is_clean() -> None:
    assert verdict_from_detections([], 0.6) == SafetyVerdict(explicit=False, score=0.0, labels=[])


@pytest.mark.parametrize("label", DEFAULT_EXPLICIT_LABELS)
def test_each_default_explicit_label_at_threshold_is_explicit(label: str) -> None:
    verdict = verdict_from_detections([det(label, 0.6)], 0.6)
    assert verdict == SafetyVerdict(explicit=True, score=0.6, labels=[label])


@pytest.mark.parametrize("label", DEFAULT_EXPLICIT_LABELS)
def test_explicit_label_below_threshold_is_not_explicit_but_reports_score(label: str) -> None:
    verdict = verdict_from_detections([det(label, 0.59)], 0.6)
    assert verdict == SafetyVerdict(explicit=False, score=0.59, labels=[])


@pytest.mark.parametrize("label", sorted(set(NUDENET_LABELS) - set(DEFAULT_EXPLICIT_LABELS)))
def test_other_labels_never_explicit_by_default(label: str) -> None:
    verdict = verdict_from_detections([det(label, 0.99)], 0.6)
    assert verdict == SafetyVerdict(explicit=False, score=0.0, labels=[])


def test_default_set_is_the_exposed_intimate_labels() -> None:
    assert set(DEFAULT_EXPLICIT_LABELS) == {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    }
    assert set(DEFAULT_EXPLICIT_LABELS) <= set(NUDENET_LABELS)


def test_mixed_detections_keep_max_score_and_sorted_unique_crossing_labels() -> None:
    detections = [
        det("FACE_FEMALE", 0.95),
        det("FEMALE_BREAST_EXPOSED", 0.7),
        det("FEMALE_BREAST_EXPOSED", 0.8),
        det("BUTTOCKS_EXPOSED", 0.65),
        det("ANUS_EXPOSED", 0.3),
    ]
    verdict = verdict_from_detections(detections, 0.6)
    assert verdict == SafetyVerdict(explicit=True, score=0.8, labels=["BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED"])


@pytest.mark.parametrize(("threshold", "explicit"), [(0.0, True), (0.5, True), (0.51, False), (1.0, False)])
def test_threshold_edges(threshold: float, explicit: bool) -> None:
    assert verdict_from_detections([det("ANUS_EXPOSED", 0.5)], threshold).explicit is explicit


def test_custom_label_set() -> None:
    detections = [det("FACE_MALE", 0.9), det("FEMALE_BREAST_EXPOSED", 0.9)]
    verdict = verdict_from_detections(detections, 0.6, explicit_labels={"FACE_MALE"})
    assert verdict == SafetyVerdict(explicit=True, score=0.9, labels=["FACE_MALE"])
    assert verdict_from_detections(detections, 0.6, explicit_labels=()) == CLEAN


def test_validate_labels_rejects_typos() -> None:
    assert validate_labels(["FACE_MALE"]) == ("FACE_MALE",)
    with pytest.raises(ValueError, match="BREAST_EXPOSED"):
        validate_labels(["BREAST_EXPOSED"])
    with pytest.raises(ValueError, match="unknown safety label"):
        SafetyChecker(SafetySettings(), explicit_labels=["NUDE"])


EXPLICIT = SafetyVerdict(explicit=True, score=0.9, labels=["ANUS_EXPOSED"])
FAILED = SafetyVerdict(explicit=True, score=0.0, labels=[], error="ValueError: not a decodable image")


def expected_decision(enabled: bool, action: str, explicit: bool, age_restricted: bool) -> Decision:
    if not enabled or not explicit or age_restricted:
        return Decision.POST
    return Decision.SPOILER if action == "spoiler" else Decision.WITHHOLD


@pytest.mark.parametrize(
    ("enabled", "action", "verdict", "age_restricted"),
    list(itertools.product([True, False], ["withhold", "spoiler"], [CLEAN, EXPLICIT, FAILED], [True, False])),
)
def test_decide_every_combination(enabled: bool, action: str, verdict: SafetyVerdict, age_restricted: bool) -> None:
    settings = SafetySettings(enabled=enabled, action=action)
    got = decide(verdict, channel_age_restricted=age_restricted, settings=settings)
    assert got is expected_decision(enabled, action, verdict.explicit, age_restricted)


def test_decide_spot_checks() -> None:
    on = SafetySettings(enabled=True, action="withhold")
    assert decide(EXPLICIT, channel_age_restricted=False, settings=on) is Decision.WITHHOLD
    assert decide(EXPLICIT, channel_age_restricted=True, settings=on) is Decision.POST
    spoiler = SafetySettings(enabled=True, action="spoiler")
    assert decide(FAILED, channel_age_restricted=False, settings=spoiler) is Decision.SPOILER
    assert decide(EXPLICIT, channel_age_restricted=False, settings=SafetySettings(enabled=False)) is Decision.POST


# --------------------------------------------------------------------- the real classifier


@pytest.fixture(scope="module")
def checker() -> SafetyChecker:
    checker = SafetyChecker(SafetySettings(enabled=True, action="withhold", threshold=0.6))
    asyncio.run(checker.load())
    return checker


async def test_real_detector_flags_the_synthetic_figure_and_withholds_it(
    checker: SafetyChecker, figure_png: bytes
) -> None:
    verdict = await checker.check(figure_png)
    assert verdict.explicit
    assert verdict.labels == ["FEMALE_BREAST_EXPOSED"]
    assert verdict.score >= 0.75
    assert verdict.error is None
    settings = checker.settings
    assert decide(verdict, channel_age_restricted=False, settings=settings) is Decision.WITHHOLD
    assert decide(verdict, channel_age_restricted=True, settings=settings) is Decision.POST
    spoiler = SafetySettings(action="spoiler")
    assert decide(verdict, channel_age_restricted=False, settings=spoiler) is Decision.SPOILER


@pytest.mark.parametrize(("size", "fmt"), [(256, "WEBP"), (1024, "JPEG"), (768, "PNG")])
async def test_real_detector_across_formats_and_sizes(checker: SafetyChecker, size: int, fmt: str) -> None:
    verdict = await checker.check(encode(skin_figure(size), fmt))
    assert verdict.explicit and verdict.labels == ["FEMALE_BREAST_EXPOSED"]


async def test_real_detector_handles_alpha_and_grayscale(checker: SafetyChecker) -> None:
    """nudenet decodes raw bytes unchanged, so a 16-bit PNG would be mis-scaled (it then sees
    dozens of phantom labels); the checker decodes to 8-bit BGR first, like cv2.imread."""
    figure = skin_figure()
    sixteen_bit = Image.fromarray(np.asarray(figure.convert("L")).astype(np.uint16) * 257)
    assert sixteen_bit.mode == "I;16"
    for variant in (figure.convert("RGBA"), figure.convert("L"), sixteen_bit):
        verdict = await checker.check(encode(variant))
        assert verdict.error is None
        assert verdict.explicit and verdict.labels == ["FEMALE_BREAST_EXPOSED"], variant.mode


@pytest.mark.parametrize(
    "image",
    [
        landscape(),
        Image.new("RGB", (512, 512), (128, 128, 128)),
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)),
    ],
    ids=["landscape", "gray", "noise"],
)
async def test_real_detector_passes_harmless_images(checker: SafetyChecker, image: Image.Image) -> None:
    verdict = await checker.check(encode(image))
    assert verdict == CLEAN
    assert decide(verdict, channel_age_restricted=False, settings=checker.settings) is Decision.POST


async def test_real_detector_threshold_from_settings(figure_png: bytes) -> None:
    strict = SafetyChecker(SafetySettings(threshold=0.95))
    verdict = await strict.check(figure_png)
    assert not verdict.explicit
    assert 0.75 <= verdict.score < 0.95  # reported even below the threshold


async def test_real_detector_with_configured_labels(figure_png: bytes) -> None:
    """The label set is configurable end to end: a non-default label withholds, and dropping
    the default label lets the same image through."""
    belly = SafetyChecker(SafetySettings(threshold=0.5), explicit_labels=["BELLY_EXPOSED"])
    verdict = await belly.check(figure_png)
    assert verdict.explicit and verdict.labels == ["BELLY_EXPOSED"]
    assert decide(verdict, channel_age_restricted=False, settings=belly.settings) is Decision.WITHHOLD

    faces_only = SafetyChecker(SafetySettings(), explicit_labels=["FACE_FEMALE", "FACE_MALE"])
    assert await faces_only.check(figure_png) == CLEAN


async def test_labels_come_from_settings_when_the_key_exists(figure_png: bytes) -> None:
    class WithLabels(SafetySettings):
        explicit_labels: list[str] = ["BELLY_EXPOSED"]

    checker = SafetyChecker(WithLabels(threshold=0.5))
    assert checker.explicit_labels == {"BELLY_EXPOSED"}
    assert (await checker.check(figure_png)).labels == ["BELLY_EXPOSED"]
    assert SafetyChecker(SafetySettings()).explicit_labels == set(DEFAULT_EXPLICIT_LABELS)


async def test_concurrent_checks_load_once_and_agree(figure_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    import bot.safety as safety

    loads = 0
    real = safety._load_nudenet

    def counting() -> safety.Detector:
        nonlocal loads
        loads += 1
        return real()

    monkeypatch.setattr(safety, "_load_nudenet", counting)
    fresh = SafetyChecker(SafetySettings())
    assert not fresh.loaded
    verdicts = await asyncio.gather(*(fresh.check(figure_png) for _ in range(4)))
    assert loads == 1 and fresh.loaded
    assert all(v.explicit for v in verdicts)


async def test_check_does_not_block_the_event_loop(figure_png: bytes) -> None:
    """Loading and scanning run in threads: a ticker keeps ticking meanwhile."""
    fresh = SafetyChecker(SafetySettings())
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    await fresh.check(figure_png)
    done.set()
    await task
    assert ticks >= 3


async def test_undecodable_image_fails_closed(checker: SafetyChecker, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bot.safety"):
        verdict = await checker.check(b"definitely not an image")
    assert verdict.explicit and verdict.error and "decodable" in verdict.error
    assert decide(verdict, channel_age_restricted=False, settings=checker.settings) is Decision.WITHHOLD
    assert decide(verdict, channel_age_restricted=True, settings=checker.settings) is Decision.POST
    assert "treating the image as explicit" in caplog.text


# ------------------------------------------------------------------- disabled and broken


async def test_disabled_loads_nothing_and_passes_everything(figure_png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)  # even without nudenet installed
    off = SafetyChecker(SafetySettings(enabled=False))
    await off.load()
    assert await off.check(figure_png) == CLEAN
    assert not off.loaded


async def test_missing_nudenet_refuses_to_start_with_a_clear_message(
    figure_png: bytes, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "nudenet", None)  # `import nudenet` raises ImportError
    broken = SafetyChecker(SafetySettings(enabled=True))
    with caplog.at_level(logging.WARNING, logger="bot.safety"), pytest.raises(SafetyUnavailable) as info:
        await broken.load()
    message = str(info.value)
    assert "\n" not in message
    assert "nudenet" in message and "atelier[safety]" in message and "safety.enabled = false" in message
    # Never posts unchecked: check() raises too, at once and without logging again.
    with caplog.at_level(logging.WARNING, logger="bot.safety"), pytest.raises(SafetyUnavailable):
        await broken.check(figure_png)
    with pytest.raises(SafetyUnavailable):
        await broken.load()
    assert sum("could not load" in r.getMessage() for r in caplog.records) == 1


async def test_broken_model_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import nudenet

    def corrupt(*args: object, **kwargs: object) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF")

    monkeypatch.setattr(nudenet, "NudeDetector", corrupt)
    with pytest.raises(SafetyUnavailable, match="INVALID_PROTOBUF"):
        await SafetyChecker(SafetySettings()).load()


def test_the_classifier_runs_on_one_quiet_thread() -> None:
    """It shares the box with the engine: one onnxruntime thread that does not spin when idle."""
    from bot.safety import _load_nudenet

    options = _load_nudenet().onnx_session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
