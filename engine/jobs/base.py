"""What every job is: the fields all kinds share, the entry that ties a kind together, what a job
costs, how it is checked, and how it is stored and read back.

A job crosses a process boundary (pickled over a pipe, or sent to a Ray replica), so it holds only
plain values and encoded image bytes, never tensors or PIL images. In the job store it is JSON:
the spec's fields, flat, with `v` (the schema version, so jobs stored by an older Atelier still
load) and what the bot knows of how the job came to be (`JobOrder`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from engine import styles, validate
from engine.options import CFG, DEFAULT_SAMPLER, STEPS, STRENGTH

SCHEMA_VERSION = 1
# 1.0 compute unit = one 1024×1024 image denoised for 30 steps (see JobBase.cost).
REFERENCE_PIXELS = 1024 * 1024
REFERENCE_STEPS = 30
# Fields never in the stored parameters: the id is the row's, the images are in the inputs folder.
STORED_APART = frozenset({"job_id", "image", "control_image"})


def units(pixels: int, steps: int, images: int = 1) -> float:
    """Compute units of `images` images of `pixels` pixels denoised for `steps` steps."""
    return round(pixels / REFERENCE_PIXELS * steps / REFERENCE_STEPS * images, 4)


def img2img_steps(steps: int, strength: float) -> int:
    """Steps diffusers really runs for an img2img call (at least one): int(steps × strength)."""
    return max(1, int(steps * strength))


def image_seeds(seed: int, count: int) -> list[int]:
    """Per-image seeds of a batch: seed, seed+1, … (wrapping at 2**32), as A1111 does, so image i
    of a batch can be reproduced alone with count=1."""
    return [(seed + i) % 2**32 for i in range(count)]


@dataclass(frozen=True)
class Limits:
    """What a job is checked against: the operator's models and caps."""

    models: Collection[str]
    max_prompt_chars: int
    max_attachment_bytes: int
    max_attachment_pixels: int
    upscale_max_side: int
    # The LoRAs, embeddings, styles and draft adapters jobs may use (none when not given).
    catalog: styles.Catalog = field(default_factory=styles.Catalog)


@dataclass(frozen=True, kw_only=True)
class JobBase:
    """Fields every job shares. `model` is a registry name; "" means the default model."""

    job_id: str
    prompt: str = ""
    negative: str = ""
    steps: int = STEPS.default
    cfg: float = CFG.default
    seed: int = 0
    sampler: str = DEFAULT_SAMPLER
    model: str = ""
    # LoRAs as (name, weight) pairs, activated for every kind before its pipeline call; the style
    # preset the job was made with (its prompt, LoRAs and settings are already in the fields);
    # draft mode: the model's few-step adapter, with `sampler` one of its draft samplers.
    loras: tuple[tuple[str, float], ...] = ()
    style: str = ""
    draft: bool = False
    # Largest encoded size of one image, in bytes; over it the engine falls back to WebP/JPEG.
    max_image_bytes: int | None = None

    kind: ClassVar[str] = ""
    prompt_required: ClassVar[bool] = False
    # Whether jobs of this kind may share one batched pipeline call (see `batch_key`); its engine
    # module then has `run_batch` beside `run`.
    batchable: ClassVar[bool] = False
    # What may differ between the members of one batch: each its own id, prompts, seeds, images.
    PER_JOB_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"job_id", "prompt", "negative", "seed", "count", "max_image_bytes"}
    )

    @property
    def image_count(self) -> int:
        return 1

    def batch_key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys may run as ONE batched pipeline call: the same kind and every
        setting equal (model, size, steps, sampler, cfg, refiner, and whatever a kind adds: LoRAs,
        draft mode, ...), only `PER_JOB_FIELDS` differing. None: the job runs alone (its kind does
        not batch, or it carries an input image, e.g. a control image)."""
        if not self.batchable:
            return None
        key: list[Any] = [self.kind]
        for f in dataclasses.fields(self):
            if f.name in self.PER_JOB_FIELDS:
                continue
            value = getattr(self, f.name)
            if isinstance(value, bytes | bytearray):
                if value:
                    return None
                continue
            key.append((f.name, _frozen(value)))
        return tuple(key)

    def cost(self, input_size: tuple[int, int] | None = None) -> float:
        """Compute units: pixels generated × steps actually run × images. `input_size` (the
        fitted size the engine works at) prices jobs that start from an image."""
        raise NotImplementedError

    def check(self, limits: Limits) -> None:
        """The engine's second line of defence: a job as the bot built it, checked again. Prompts
        must already be clean: one with control characters is refused, not silently changed."""
        if not isinstance(self.job_id, str) or not self.job_id:
            raise validate.ValidationFailed("job_id", "The job has no id.")
        for name, text, required in (("prompt", self.prompt, self.prompt_required), ("negative", self.negative, False)):
            cleaned = validate.check_prompt(text, max_chars=limits.max_prompt_chars, field=name, required=required)
            if cleaned != text:
                raise validate.ValidationFailed(name, f"The {name} contains control characters or surrounding spaces.")
        validate.check_steps(self.steps)
        validate.check_cfg(self.cfg)
        validate.check_seed(self.seed)
        if not self.draft:
            validate.check_sampler(self.sampler)  # a draft's sampler is checked with its adapter
        validate.check_model(self.model, limits.models)
        styles.check_job(
            limits.catalog,
            model=self.model,
            loras=self.loras,
            texts=(self.prompt, self.negative),
            draft=self.draft,
            sampler=self.sampler,
        )
        if self.max_image_bytes is not None:
            validate.check_image_byte_limit(self.max_image_bytes)

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        """What this kind adds to the A1111 `parameters` written into each image (besides the
        prompt, steps, sampler, cfg, seed, size and model every image has). `refiner` is the
        model's refiner (None: it has none)."""
        return {}

    def result_fields(self) -> dict[str, str]:
        """What this kind adds to its result's embed (field name → value), besides the fields
        every result shows."""
        return {}

    # ------------------------------------------------------------------ storage
    def to_params(self) -> dict[str, Any]:
        """Every field but the id and the image bytes (the image, and a control image, live in the
        inputs folder)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in STORED_APART}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, job_id: str, image: bytes | None = None) -> Self:
        """A job from stored parameters; keys that are not fields (provenance, keys of a later
        schema) are left out."""
        names = {f.name for f in dataclasses.fields(cls)} - STORED_APART
        kwargs = {key: value for key, value in params.items() if key in names}
        if "loras" in kwargs:  # JSON keeps the pairs as lists
            kwargs["loras"] = tuple((str(name), float(weight)) for name, weight in kwargs["loras"])
        if image is not None:
            kwargs["image"] = image
        return cls(job_id=job_id, **kwargs)


def _frozen(value: Any) -> Any:
    """A field's value as something hashable (lists and dicts of a spec, e.g. a LoRA list)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    return value


@dataclass(frozen=True, kw_only=True)
class ImageJob(JobBase):
    """A job that starts from an image (the member's attachment, or a result's image)."""

    image: bytes = field(default=b"", repr=False)
    strength: float = STRENGTH.default

    # Whether a source larger than ~1 MP keeps its resolution (validate.input_work_size): edits.
    keep_resolution: ClassVar[bool] = False

    @property
    def output_scale(self) -> int:
        """The output is this many times the input's size, each side (an upscale: its factor)."""
        return 1

    def cost(self, input_size: tuple[int, int] | None = None) -> float:
        if input_size is None:
            raise ValueError("input_size is required to price a job that starts from an image")
        width, height = input_size
        pixels = width * self.output_scale * height * self.output_scale
        return units(pixels, img2img_steps(self.steps, self.strength), self.image_count)

    def check(self, limits: Limits) -> None:
        super().check(limits)
        validate.check_strength(self.strength)
        validate.probe_image(self.image, max_bytes=limits.max_attachment_bytes, max_pixels=limits.max_attachment_pixels)

    def image_params(self, *, refiner: str | None, refiner_switch: float) -> dict[str, Any]:
        return {"strength": self.strength}


@dataclass(frozen=True)
class JobKind:
    """One registry entry: everything that makes a kind a kind. `run` names the engine's call
    ("module:function"), imported in the engine process only, so the bot never loads torch."""

    name: str
    label: str  # what members read on queue cards and results ("Refine")
    spec: type[JobBase]
    run: str


# ---------------------------------------------------------------------- provenance and storage
@dataclass(frozen=True)
class Parent:
    """The job a job was made from by a button: which action, on which of its images."""

    job: str
    action: str
    index: int | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"job": self.job, "action": self.action}
        if self.index is not None:
            data["index"] = self.index
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Parent:
        index = data.get("index")
        return cls(str(data["job"]), str(data.get("action", "")), None if index is None else int(index))


@dataclass(frozen=True)
class JobOrder:
    """A job as the job store keeps it: the spec, and how it came to be (what a Reroll and the
    result's embed need beyond the spec)."""

    spec: JobBase
    parent: Parent | None = None
    # Jobs that start from an image: the size it is worked at (it prices the job), and for an
    # attachment the URL it was uploaded at (a Reroll fetches it again: inputs are not kept).
    input_size: tuple[int, int] | None = None
    input_url: str | None = None
    aspect: str | None = None  # the aspect choice a text2img job was made with
    control_url: str | None = None  # where a control image was uploaded (a Reroll fetches it again)
    typed: str | None = None  # the member's own prompt, when a style or LoRA trigger words changed it

    def to_json(self) -> dict[str, Any]:
        data = {"v": SCHEMA_VERSION, **self.spec.to_params()}
        if self.parent is not None:
            data["parent"] = self.parent.to_json()
        if self.input_size is not None:
            data["input_size"] = list(self.input_size)
        if self.input_url is not None:
            data["input_url"] = self.input_url
        if self.aspect is not None:
            data["aspect"] = self.aspect
        if self.control_url is not None:
            data["control_url"] = self.control_url
        if self.typed is not None:
            data["typed"] = self.typed
        return data

    @classmethod
    def from_json(
        cls, spec: type[JobBase], data: Mapping[str, Any], *, job_id: str, image: bytes | None = None
    ) -> JobOrder:
        data = upgrade(data)
        parent = data.get("parent")
        size = data.get("input_size")
        return cls(
            spec=spec.from_params(data, job_id=job_id, image=image),
            parent=Parent.from_json(parent) if isinstance(parent, Mapping) and "job" in parent else None,
            input_size=(int(size[0]), int(size[1])) if size else None,
            input_url=data.get("input_url"),
            aspect=data.get("aspect"),
            control_url=data.get("control_url"),
            typed=data.get("typed"),
        )


def upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
    """Stored parameters in today's schema. Version 0 (before `v`): the input's file name was
    stored as `input`; inputs are now found by job id."""
    data = dict(data)
    if int(data.get("v", 0)) < 1:
        data.pop("input", None)
        data["v"] = 1
    return data


__all__ = [
    "REFERENCE_PIXELS",
    "REFERENCE_STEPS",
    "SCHEMA_VERSION",
    "ImageJob",
    "JobBase",
    "JobKind",
    "JobOrder",
    "Limits",
    "Parent",
    "image_seeds",
    "img2img_steps",
    "units",
]
