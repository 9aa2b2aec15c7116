"""The offline image safety check run on every result before it is posted.

The classifier is nudenet's NudeDetector (an ONNX model shipped inside the nudenet wheel, so it
works with no network). It loads once, lazily, in a worker thread (~0.2–0.6 s), and every check
runs in a worker thread too (~0.02–0.09 s per image): the event loop never blocks, so the
3-second interaction deadline holds while images are being scanned.

The rule lives in two pure functions, so it can be read and tested without the model:

* `verdict_from_detections`: an image is explicit when any detection whose label is in the
  explicit set scores at or above `threshold`. The default set is nudenet's exposed genitalia,
  exposed female breast, exposed buttocks and exposed anus. `MALE_BREAST_EXPOSED` (a bare
  chest) and the covered/face/feet/belly/armpit labels are not explicit by default; operators
  change the set with `safety.explicit_labels`.
* `decide`: disabled → POST; not explicit → POST; age-restricted channel → POST; otherwise the
  configured `action` (SPOILER or WITHHOLD).

Failure policy (a deliberate choice):

* Safety enabled but the classifier cannot load (nudenet not installed, a broken onnxruntime,
  a corrupt model): **refuse to start**. `SafetyChecker.load()` raises `SafetyUnavailable` with
  a one-line message saying how to fix it (install the `safety` extra) or how to opt out
  (`safety.enabled = false`). The bot calls `load()` at startup, before it takes any work.
  Posting unchecked images would silently break the operator's explicit setting (fail open),
  and withholding every image would make a broken install look like a bot that hates all
  pictures; a loud refusal at start is the one outcome the operator cannot miss. The failure
  is logged once and remembered: later `load()`/`check()` calls raise the same error at once
  without retrying the import.
* One image cannot be scanned (undecodable bytes, an inference error): that image **fails
  closed**. `check()` returns an explicit verdict carrying `error`, so `decide` spoilers or
  withholds it outside age-restricted channels. This is rare (the engine made the image) and a
  single missing picture is a better failure than an unchecked one.
* Safety disabled: nothing is loaded and every verdict is clean.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from config.settings import SafetySettings

log = logging.getLogger(__name__)

# Every label nudenet 3.4's detector can emit (nudenet/nudenet.py, `__labels`).
NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
)

# The default for `safety.explicit_labels`.
DEFAULT_EXPLICIT_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
)

INSTALL_HINT = (
    "install it with `pip install 'atelier[safety]'` (make install does), "
    "or set safety.enabled = false (ATELIER_SAFETY__ENABLED=false) to post images unchecked"
)


class Decision(enum.Enum):
    """What to do with one image."""

    POST = "post"
    SPOILER = "spoiler"
    WITHHOLD = "withhold"


@dataclass(frozen=True)
class SafetyVerdict:
    """The classifier's answer for one image.

    `score` is the highest score among explicit-label detections (0.0 when none), reported
    even below the threshold so operators can tune it from the logs. `labels` are the
    explicit labels that crossed the threshold, sorted: what made the image explicit.
    `error` is set when the image could not be scanned (then `explicit` is True: fail closed).
    """

    explicit: bool
    score: float
    labels: list[str] = field(default_factory=list)
    error: str | None = None


CLEAN = SafetyVerdict(explicit=False, score=0.0, labels=[])


class SafetyUnavailable(RuntimeError):
    """Safety is enabled but the classifier cannot load; the bot must not start."""


def validate_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """The labels as a tuple, or ValueError naming any label nudenet never emits (a typo in the
    config would otherwise silently disable the check for that body part)."""
    labels = tuple(labels)
    unknown = sorted(set(labels) - set(NUDENET_LABELS))
    if unknown:
        raise ValueError(f"unknown safety label(s) {', '.join(unknown)}; known labels: {', '.join(NUDENET_LABELS)}")
    return labels


def verdict_from_detections(
    detections: Iterable[Mapping[str, Any]],
    threshold: float,
    explicit_labels: Collection[str] = DEFAULT_EXPLICIT_LABELS,
) -> SafetyVerdict:
    """Apply the rule to nudenet detections (`{"class": str, "score": float, ...}` dicts)."""
    score = 0.0
    crossed: set[str] = set()
    for detection in detections:
        label = str(detection.get("class", ""))
        if label not in explicit_labels:
            continue
        value = float(detection.get("score", 0.0))
        score = max(score, value)
        if value >= threshold:
            crossed.add(label)
    return SafetyVerdict(explicit=bool(crossed), score=score, labels=sorted(crossed))


def decide(verdict: SafetyVerdict, *, channel_age_restricted: bool, settings: SafetySettings) -> Decision:
    """Post, spoiler or withhold one image. Age-restricted (NSFW) channels get everything:
    their members opted in, and Discord itself gates them."""
    if not settings.enabled or not verdict.explicit or channel_age_restricted:
        return Decision.POST
    return Decision.SPOILER if settings.action == "spoiler" else Decision.WITHHOLD


class Detector(Protocol):
    def detect(self, image: Any) -> list[dict[str, Any]]: ...


def _load_nudenet() -> Detector:
    """nudenet's detector on an onnxruntime session of one thread that sleeps when idle.

    nudenet opens its session with onnxruntime's defaults: a thread per core, spinning between
    runs. That took 38 ms of CPU per 256² image here against 23 ms on one quiet thread, for
    3 ms less wall time, and the engine on the same box needs those cores (measured with
    tests/bench/test_e2e_bench.py).
    """
    import nudenet
    import onnxruntime
    from nudenet import NudeDetector

    model = str(Path(nudenet.__file__).parent / "320n.onnx")  # the weights NudeDetector loads
    detector = NudeDetector(model_path=model)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    detector.onnx_session = onnxruntime.InferenceSession(
        model, sess_options=options, providers=["CPUExecutionProvider"]
    )
    return detector


def _decode_bgr(image_bytes: bytes) -> Any:
    """Bytes → an 8-bit 3-channel BGR array, exactly what `cv2.imread(path)` gives nudenet.

    nudenet's `detect` accepts bytes itself, but decodes them unchanged (16-bit PNGs would be
    mis-scaled, grayscale would break its colour conversion); decoding here as IMREAD_COLOR
    matches its path route for every format and needs no temp file.
    """
    import cv2
    import numpy as np

    array = cv2.imdecode(np.frombuffer(image_bytes, np.uint8), cv2.IMREAD_COLOR)
    if array is None:
        raise ValueError("not a decodable image")
    return array


class SafetyChecker:
    """Scans images with the real classifier; one per bot.

    `explicit_labels` overrides the settings' `explicit_labels` (when the settings have that
    key) and otherwise defaults to `DEFAULT_EXPLICIT_LABELS`.
    """

    def __init__(self, settings: SafetySettings, *, explicit_labels: Iterable[str] | None = None) -> None:
        self.settings = settings
        if explicit_labels is None:
            explicit_labels = getattr(settings, "explicit_labels", None) or DEFAULT_EXPLICIT_LABELS
        self.explicit_labels = frozenset(validate_labels(explicit_labels))
        self._detector: Detector | None = None
        self._failure: SafetyUnavailable | None = None
        self._load_lock = threading.Lock()
        # One inference at a time: onnxruntime already uses every core for one image, and
        # the engine process needs the CPU too.
        self._detect_lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._detector is not None

    async def load(self) -> None:
        """Load the classifier (once) in a worker thread; call at startup. No-op when disabled.

        Raises SafetyUnavailable when it cannot load: the bot must refuse to start.
        """
        if not self.settings.enabled or self._detector is not None:
            return
        await asyncio.to_thread(self._ensure_detector)

    async def check(self, image_bytes: bytes) -> SafetyVerdict:
        """Scan one encoded image (PNG/WebP/JPEG bytes). Clean when safety is disabled."""
        if not self.settings.enabled:
            return CLEAN
        return await asyncio.to_thread(self._check_sync, image_bytes)

    def _ensure_detector(self) -> Detector:
        with self._load_lock:
            if self._detector is not None:
                return self._detector
            if self._failure is not None:
                raise self._failure
            try:
                self._detector = _load_nudenet()
            except Exception as exc:  # ImportError, onnxruntime errors, a corrupt model...
                reason = f"{type(exc).__name__}: {exc}"
                self._failure = SafetyUnavailable(
                    f"safety.enabled is true but the image safety classifier (nudenet) could not "
                    f"load ({reason}); {INSTALL_HINT}"
                )
                log.warning("%s", self._failure)
                raise self._failure from exc
            log.info("safety classifier loaded (explicit labels: %s)", ", ".join(sorted(self.explicit_labels)))
            return self._detector

    def _check_sync(self, image_bytes: bytes) -> SafetyVerdict:
        detector = self._ensure_detector()  # raises SafetyUnavailable: never post unchecked
        try:
            image = _decode_bgr(image_bytes)
            with self._detect_lock:
                detections = detector.detect(image)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("safety check failed, treating the image as explicit: %s", reason)
            return SafetyVerdict(explicit=True, score=0.0, labels=[], error=reason)
        verdict = verdict_from_detections(detections, self.settings.threshold, self.explicit_labels)
        if verdict.explicit:
            log.info("explicit image: %s (score %.2f)", ", ".join(verdict.labels), verdict.score)
        return verdict


__all__ = [
    "CLEAN",
    "DEFAULT_EXPLICIT_LABELS",
    "NUDENET_LABELS",
    "Decision",
    "SafetyChecker",
    "SafetyUnavailable",
    "SafetyVerdict",
    "decide",
    "validate_labels",
    "verdict_from_detections",
]
