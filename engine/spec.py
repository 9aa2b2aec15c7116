"""What the engine is asked to do and what it answers.

These dataclasses are the whole vocabulary between the bot and the engine process: they
cross a process boundary (pickled over a pipe, or sent to a Ray replica), so they hold
only plain values and encoded image bytes, never tensors or PIL images.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

SAMPLERS: tuple[str, ...] = (
    "dpmpp_2m_karras",
    "euler_a",
    "euler",
    "ddim",
    "unipc",
    "dpmpp_sde_karras",
)
DEFAULT_SAMPLER = "dpmpp_2m_karras"

Phase = Literal["load", "base", "refiner", "upscale", "decode", "encode"]
ImageFormat = Literal["png", "webp", "jpeg"]


@dataclass(frozen=True, kw_only=True)
class JobBase:
    """Fields every job shares. `model` is a registry name; "" means the default model."""

    job_id: str
    prompt: str = ""
    negative: str = ""
    steps: int = 30
    cfg: float = 7.0
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    model: str = ""
    # Largest encoded size of one image, in bytes; over it the engine falls back to WebP/JPEG.
    max_image_bytes: int | None = None

    kind: ClassVar[str] = ""

    @property
    def image_count(self) -> int:
        return 1


@dataclass(frozen=True, kw_only=True)
class Text2Img(JobBase):
    """Base → refiner ensemble of experts (or base alone when `refiner` is False)."""

    width: int = 1024
    height: int = 1024
    count: int = 1
    # None: use the refiner when the model has one.
    refiner: bool | None = None

    kind: ClassVar[str] = "text2img"

    @property
    def image_count(self) -> int:
        return self.count


@dataclass(frozen=True, kw_only=True)
class Refine(JobBase):
    """Refiner img2img on an input image (falls back to base img2img when the model has no refiner)."""

    image: bytes = field(repr=False)
    strength: float = 0.3

    kind: ClassVar[str] = "refine"


@dataclass(frozen=True, kw_only=True)
class Variations(JobBase):
    """Base-weights img2img of one input image with `count` different seeds."""

    image: bytes = field(repr=False)
    strength: float = 0.6
    count: int = 4

    kind: ClassVar[str] = "variations"

    @property
    def image_count(self) -> int:
        return self.count


@dataclass(frozen=True, kw_only=True)
class Upscale(JobBase):
    """×2 upscale: Lanczos (or a configured spandrel model) then low-strength img2img, tiled when large."""

    image: bytes = field(repr=False)
    strength: float = 0.3
    factor: int = 2

    kind: ClassVar[str] = "upscale"


Job = Text2Img | Refine | Variations | Upscale
JOB_KINDS: dict[str, type[JobBase]] = {cls.kind: cls for cls in (Text2Img, Refine, Variations, Upscale)}


def image_seeds(seed: int, count: int) -> list[int]:
    """Per-image seeds of a batch: seed, seed+1, … (wrapping at 2**32), as A1111 does, so image i
    of a batch can be reproduced alone with count=1."""
    return [(seed + i) % 2**32 for i in range(count)]


@dataclass(frozen=True)
class Progress:
    job_id: str
    step: int
    total: int
    phase: Phase
    # A small encoded preview (JPEG) of the current denoised estimate, every N steps.
    preview: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ImageOut:
    data: bytes = field(repr=False)
    format: ImageFormat
    seed: int
    width: int
    height: int

    @property
    def filename_suffix(self) -> str:
        return "jpg" if self.format == "jpeg" else self.format


@dataclass(frozen=True)
class Result:
    job_id: str
    images: list[ImageOut]
    model: str
    seconds: float
    # Pure compute time (pipeline calls), without loading/encoding: the scheduler's ETA source.
    compute_seconds: float = 0.0


class EngineError(Exception):
    """A job failed in the engine. `retryable` is True when the failure was not the job's fault
    (the process died, a replica was lost) and the job should go back to the queue. The message is
    what members may read; `detail` (paths, exception text) is for the operator's log only."""

    def __init__(self, message: str, *, retryable: bool, detail: str = "") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.detail = detail


class JobCancelled(Exception):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class EngineHealth:
    alive: bool
    slots: int
    busy: int
    restarts: int
    detail: str = ""


class EngineClient(Protocol):
    """What the bot's scheduler needs from an engine, local process or distributed.

    `submit` yields Progress items and ends with exactly one Result; it raises EngineError
    (check `retryable`) or JobCancelled instead when the job does not finish. `slots` is how
    many jobs may run at once (one per GPU). `prefetch` is how many more jobs per slot may be
    submitted ahead: they wait inside the engine and start the moment a slot frees, so the GPU
    does not idle while the bot hands over the next job (0: submit to free slots only).
    """

    slots: int
    prefetch: int

    async def start(self) -> None: ...

    def submit(self, job: Job) -> AsyncIterator[Progress | Result]: ...

    async def cancel(self, job_id: str) -> bool: ...

    async def close(self) -> None: ...

    def health(self) -> EngineHealth: ...
