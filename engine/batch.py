"""Several jobs of one shape as one batched pipeline call (the engine process's side of batching).

The bot joins queued jobs whose `JobBase.batch_key` is equal (same kind, model, size, steps,
sampler, cfg, refiner, LoRAs, …; only prompts, seeds and image counts differ) and the engine runs
them with one pipeline call per expert. Each job keeps what is its own:

- its conditioning: every job's prompt and negative are encoded alone (engine.prompts, as for a
  job run alone) and the results stacked, each repeated for the job's images, so the batch sees
  exactly the tensors each job would have seen. Jobs whose embeddings differ in length (a prompt
  longer than another by a 77-token chunk) are not padded to one length, which would change their
  images: they run in separate calls (`shape_groups`).
- its seeds: one generator per image, as for a job run alone. With exact batches (PerImageUNet)
  each image is then bit-identical to the same job run alone.
- its progress, previews and cancel (`BatchSteps`): every member's `JobSteps` is told each step,
  with a preview of its own rows; a cancelled member stops being told and its images are dropped
  by the worker; the call itself stops only when every member is cancelled.

A batch of one job is the plain job: `batch_steps` then returns that job's own `JobSteps` and
`joined` its own pipeline arguments, so single jobs run exactly the code they always ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.api import JobCancelled
from engine.callbacks import JobSteps, StepCallback, X0Tap
from engine.jobs.events import Phase
from engine.prompts import Conditioning


class BatchSteps:
    """`JobSteps` of every member of a batch, stepped together (the same interface)."""

    def __init__(self, members: Sequence[JobSteps], counts: Sequence[int]) -> None:
        self.members = list(members)
        rows, start = [], 0
        for count in counts:
            rows.append((start, start + count))
            start += count
        self.rows = rows

    @property
    def total(self) -> int:
        return self.members[0].total

    @total.setter
    def total(self, value: int) -> None:
        """Every member's total moves with the call's (a scheduler that plans other steps)."""
        delta = value - self.members[0].total
        for member in self.members:
            member.total += delta

    def live(self) -> list[tuple[JobSteps, tuple[int, int]]]:
        """The members not cancelled, with their image rows."""
        return [(m, rows) for m, rows in zip(self.members, self.rows, strict=True) if not m.cancelled()]

    def check_cancelled(self) -> None:
        """Raise JobCancelled once every member is cancelled (the call has nobody left to serve)."""
        if all(m.cancelled() for m in self.members):
            raise JobCancelled(self.members[0].job_id)

    def advance(self, phase: Phase, latents: torch.Tensor | None = None) -> None:
        """One step of the call: every member still wanted is told, with a preview of its rows."""
        for member, (start, end) in self.live():
            member.advance(phase, None if latents is None else latents[start:end])

    def callback(
        self, phase: Phase, *, planned: int, tap: X0Tap | None = None, cfg_off_after: int | None = None
    ) -> StepCallback:
        """engine.callbacks.StepCallback over the whole batch."""
        return StepCallback(self, phase, planned=planned, tap=tap, cfg_off_after=cfg_off_after)


def batch_steps(
    tracks: Sequence[Callable[[int], JobSteps]], total: int, counts: Sequence[int]
) -> JobSteps | BatchSteps:
    """The steps of a call for these jobs: one job's own `JobSteps`, or a `BatchSteps`."""
    if len(tracks) == 1:
        return tracks[0](total)
    return BatchSteps([track(total) for track in tracks], counts)


def joined(conds: Sequence[Conditioning], counts: Sequence[int]) -> dict[str, Any]:
    """Pipeline arguments for one call making `counts[j]` images of `conds[j]`, in order.

    One job: its conditioning and `num_images_per_prompt` (diffusers repeats it). Several: each
    job's tensors repeated for its images and stacked, `num_images_per_prompt=1`. When some jobs
    have a negative and others none (an empty negative on a model that zeroes it), the others get
    the zeros diffusers would have used."""
    if len(conds) == 1:
        return {**conds[0].pipeline_kwargs(), "num_images_per_prompt": counts[0]}

    def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.expand(n, *t.shape[1:]) for t, n in zip(tensors, counts, strict=True)])

    kwargs: dict[str, Any] = {
        "prompt_embeds": stack([c.prompt_embeds for c in conds]),
        "pooled_prompt_embeds": stack([c.pooled_prompt_embeds for c in conds]),
        "num_images_per_prompt": 1,
    }
    if any(c.negative_prompt_embeds is not None for c in conds):
        negatives = [
            c.negative_prompt_embeds if c.negative_prompt_embeds is not None else torch.zeros_like(c.prompt_embeds)
            for c in conds
        ]
        pooled = [
            c.negative_pooled_prompt_embeds
            if c.negative_pooled_prompt_embeds is not None
            else torch.zeros_like(c.pooled_prompt_embeds)
            for c in conds
        ]
        kwargs["negative_prompt_embeds"] = stack(negatives)
        kwargs["negative_pooled_prompt_embeds"] = stack(pooled)
    return kwargs


def _shape(cond: Conditioning) -> tuple[Any, ...]:
    negative = cond.negative_prompt_embeds
    return (tuple(cond.prompt_embeds.shape), None if negative is None else tuple(negative.shape))


def shape_groups(*conds_per_call: Sequence[Conditioning]) -> list[list[int]]:
    """Indices of the jobs that can share calls: equal embedding lengths in every call (the base's,
    the refiner's), in the jobs' order. One group when all can."""
    count = len(conds_per_call[0])
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index in range(count):
        signature = tuple(_shape(conds[index]) for conds in conds_per_call if conds)
        groups.setdefault(signature, []).append(index)
    return list(groups.values())


def split_outputs(images: Sequence[Any], counts: Sequence[int]) -> list[list[Any]]:
    """A batch's images, `counts[j]` for job j in turn."""
    out, start = [], 0
    for count in counts:
        out.append(list(images[start : start + count]))
        start += count
    return out


__all__ = ["BatchSteps", "batch_steps", "joined", "shape_groups", "split_outputs"]
