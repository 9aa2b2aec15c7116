"""The job vocabulary: every kind of job Atelier runs, and the registry that ties each kind to its
spec (fields, ranges, defaults, cost, checks, storage), its label and its engine call.

Adding a kind: a module here (its frozen dataclass and its `JobKind`), its engine call in
engine/kinds/, its slash command and buttons in bot/commands/, and one line in `KINDS` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.jobs.base import (
    ImageJob,
    JobBase,
    JobKind,
    JobOrder,
    Limits,
    Parent,
    image_seeds,
    img2img_steps,
    units,
)
from engine.jobs.edit import EDIT, Edit
from engine.jobs.pan import PAN, Pan
from engine.jobs.refine import REFINE, Refine
from engine.jobs.text2img import TEXT2IMG, Text2Img
from engine.jobs.upscale import UPSCALE, Upscale
from engine.jobs.variations import VARIATIONS, Variations
from engine.jobs.zoom import ZOOM, Zoom

KINDS: dict[str, JobKind] = {kind.name: kind for kind in (TEXT2IMG, REFINE, VARIATIONS, UPSCALE, EDIT, ZOOM, PAN)}

Job = Text2Img | Refine | Variations | Upscale | Edit | Zoom | Pan


def kind_of(name: str) -> JobKind:
    """The registry entry of a kind; ValueError for a kind this Atelier does not know."""
    try:
        return KINDS[name]
    except KeyError:
        raise ValueError(f"unknown job kind {name!r}") from None


def load_order(kind: str, data: Mapping[str, Any], *, job_id: str, image: bytes | None = None) -> JobOrder:
    """A stored job, typed again (any schema version this Atelier wrote)."""
    return JobOrder.from_json(kind_of(kind).spec, data, job_id=job_id, image=image)


def label_of(kind: str) -> str:
    entry = KINDS.get(kind)
    return entry.label if entry is not None else kind


__all__ = [
    "KINDS",
    "Edit",
    "ImageJob",
    "Job",
    "JobBase",
    "JobKind",
    "JobOrder",
    "Limits",
    "Pan",
    "Parent",
    "Refine",
    "Text2Img",
    "Upscale",
    "Variations",
    "Zoom",
    "image_seeds",
    "img2img_steps",
    "kind_of",
    "label_of",
    "load_order",
    "units",
]
