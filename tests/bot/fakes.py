"""Second implementations of the scheduler's ports, for fast property tests.

* ``MemoryJobStore`` implements ``bot.queue.scheduler.JobStorePort`` with a dict, obeying the same
  transition table as ``db.jobs.JobStore`` (invalid transitions raise ``InvalidTransition``) and
  keeping a per-job quota ledger (reserve on create, commit on done, refund on failed/cancelled),
  plus a history of every transition so tests can count terminal states.
* ``FakeEngine`` implements ``engine.api.EngineClient`` in-process: a job "runs" by yielding a
  few ``Progress`` items (sleeping 0 between them) and one ``Result``. Failures are injectable:
  retryable crashes of a job's first N attempts or of the n-th submission, non-retryable errors,
  holding jobs until released or cancelled, and ignoring cancellation (a hung engine).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from engine.api import EngineError, EngineHealth, ImageOut, JobCancelled, Result
from engine.jobs import Job, Text2Img
from engine.jobs.events import Progress

TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"done", "failed", "cancelled", "queued"}),
    "done": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
FINAL = frozenset({"done", "failed", "cancelled"})


class InvalidTransition(Exception):
    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(f"job {job_id}: cannot go from {current} to {target}")
        self.job_id, self.current, self.target = job_id, current, target


class StoreDown(Exception):
    """An injected store failure."""


@dataclass(frozen=True)
class FakeJobRecord:
    id: str
    kind: str
    owner_id: int
    guild_id: int | None
    channel_id: int
    params: dict[str, Any]
    cost: float
    band: int
    status: str
    attempts: int
    created_at: datetime
    interaction_id: int | None = None
    error: str | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    seconds: float | None = None


@dataclass(frozen=True)
class FakeRecovery:
    requeued: list[FakeJobRecord]
    failed: list[FakeJobRecord]
    queued: list[FakeJobRecord]


class MemoryJobStore:
    """A dict-backed job store with ``db.jobs.JobStore``'s transition rules."""

    def __init__(self) -> None:
        self.records: dict[str, FakeJobRecord] = {}
        self.ledger: dict[str, list[str]] = {}  # job id -> ["reserve", "commit" | "refund"]
        self.history: dict[str, list[str]] = {}  # job id -> statuses entered, in order
        self.fail_next: Counter[str] = Counter()  # method name -> how many calls raise StoreDown
        self._t0 = datetime(2025, 1, 1, tzinfo=UTC)
        self._n = 0

    # -------------------------------------------------------------- helpers for tests
    def terminal_count(self, job_id: str) -> int:
        return sum(1 for status in self.history[job_id] if status in FINAL)

    def _maybe_fail(self, method: str) -> None:
        if self.fail_next[method] > 0:
            self.fail_next[method] -= 1
            raise StoreDown(f"injected failure in {method}")

    def _move(self, job_id: str, target: str, **changes: Any) -> FakeJobRecord:
        record = self.records.get(job_id)
        if record is None:
            raise LookupError(f"no job {job_id}")
        if target not in TRANSITIONS[record.status]:
            raise InvalidTransition(job_id, record.status, target)
        record = replace(record, status=target, **changes)
        self.records[job_id] = record
        self.history[job_id].append(target)
        if target == "done":
            self.ledger[job_id].append("commit")
        elif target in ("failed", "cancelled"):
            self.ledger[job_id].append("refund")
        return record

    # -------------------------------------------------------------- the port
    async def create(
        self,
        *,
        job_id: str,
        kind: str = "text2img",
        owner_id: int,
        guild_id: int | None = 1,
        channel_id: int = 1,
        params: dict[str, Any] | None = None,
        cost: float = 1.0,
        band: int = 1,
        interaction_id: int | None = None,
    ) -> FakeJobRecord:
        if job_id in self.records:
            raise ValueError(f"duplicate job id {job_id}")
        self._n += 1
        record = FakeJobRecord(
            id=job_id,
            kind=kind,
            owner_id=owner_id,
            guild_id=guild_id,
            channel_id=channel_id,
            params=dict(params or {}),
            cost=cost,
            band=band,
            status="queued",
            attempts=0,
            created_at=self._t0 + timedelta(microseconds=self._n),
            interaction_id=interaction_id,
        )
        self.records[job_id] = record
        self.ledger[job_id] = ["reserve"]
        self.history[job_id] = ["queued"]
        return record

    async def get(self, job_id: str) -> FakeJobRecord | None:
        self._maybe_fail("get")
        return self.records.get(job_id)

    async def mark_running(self, job_id: str) -> FakeJobRecord:
        self._maybe_fail("mark_running")
        attempts = self.records[job_id].attempts + 1 if job_id in self.records else 0
        return self._move(job_id, "running", attempts=attempts)

    async def mark_done(
        self, job_id: str, *, images: list[dict[str, Any]], seeds: list[int], seconds: float
    ) -> FakeJobRecord:
        self._maybe_fail("mark_done")
        return self._move(job_id, "done", images=list(images), seeds=list(seeds), seconds=seconds, error=None)

    async def mark_failed(self, job_id: str, error: str) -> FakeJobRecord:
        self._maybe_fail("mark_failed")
        return self._move(job_id, "failed", error=error)

    async def mark_cancelled(self, job_id: str) -> FakeJobRecord:
        self._maybe_fail("mark_cancelled")
        return self._move(job_id, "cancelled")

    async def requeue(self, job_id: str, error: str, *, attempt_used: bool = True) -> FakeJobRecord:
        self._maybe_fail("requeue")
        attempts = self.records[job_id].attempts - (0 if attempt_used else 1)
        return self._move(job_id, "queued", error=error, attempts=max(0, attempts))

    async def recover_detailed(self, max_attempts: int = 3) -> FakeRecovery:
        requeued, failed = [], []
        for record in sorted(self.records.values(), key=lambda r: (r.created_at, r.id)):
            if record.status != "running":
                continue
            if record.attempts >= max_attempts:
                failed.append(self._move(record.id, "failed", error="gave up after a restart"))
            else:
                requeued.append(self._move(record.id, "queued", error="interrupted by a restart"))
        return FakeRecovery(requeued, failed, await self.list_by_status(["queued"]))

    async def recover(self, max_attempts: int = 3) -> list[FakeJobRecord]:
        return (await self.recover_detailed(max_attempts)).queued

    async def list_by_status(self, statuses: Iterable[str]) -> list[FakeJobRecord]:
        wanted = set(statuses)
        return sorted((r for r in self.records.values() if r.status in wanted), key=lambda r: (r.created_at, r.id))


def text2img_factory(record: Any) -> Job:
    """The job_factory used with the fakes: a small Text2Img carrying the record's id."""
    return Text2Img(job_id=record.id, prompt=str(record.params.get("prompt", "x")), width=256, height=256)


class FakeEngine:
    """An in-process ``EngineClient``. See the module docstring for the injectable failures."""

    def __init__(
        self,
        *,
        slots: int = 1,
        prefetch: int = 0,
        steps: int = 2,
        crash_attempts: dict[str, int] | None = None,
        crash_submissions: Iterable[int] = (),
        fatal: Iterable[str] = (),
        hold: Iterable[str] = (),
        hold_after: int | None = None,
        ignore_cancel: bool = False,
        compute_seconds: float = 2.0,
    ) -> None:
        self.slots = slots
        self.prefetch = prefetch  # the fake runs prefetched jobs at once (it has no queue of its own)
        self.steps = steps
        self.crash_attempts = dict(crash_attempts or {})  # job id -> how many attempts crash
        self.crash_submissions = set(crash_submissions)  # 1-based submission numbers that crash
        self.fatal = set(fatal)
        self.hold = set(hold)
        self.hold_after = hold_after  # submissions after this many are held
        self.ignore_cancel = ignore_cancel
        self.compute_seconds = compute_seconds
        self.submitted: list[str] = []
        self.results: Counter[str] = Counter()
        self.running: set[str] = set()
        self.max_running = 0
        self.overlaps = 0  # a job id submitted while already running (must stay 0)
        self._cancelled: set[str] = set()
        self._released: dict[str, asyncio.Event] = {}
        self._attempts: Counter[str] = Counter()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> EngineHealth:
        return EngineHealth(alive=True, slots=self.slots, busy=len(self.running), restarts=0)

    def release(self, job_id: str | None = None) -> None:
        """Let a held job (or every held job, and no more holding) finish."""
        if job_id is None:
            self.hold.clear()
            self.hold_after = None
            for event in self._released.values():
                event.set()
        else:
            self.hold.discard(job_id)
            self._released.setdefault(job_id, asyncio.Event()).set()

    def submit(self, job: Job) -> AsyncIterator[Progress | Result]:
        return self._run(job)

    async def cancel(self, job_id: str) -> bool:
        if job_id not in self.running:
            return False
        if not self.ignore_cancel:
            self._cancelled.add(job_id)
            self._released.setdefault(job_id, asyncio.Event()).set()
        return True

    async def _run(self, job: Job) -> AsyncIterator[Progress | Result]:
        job_id = job.job_id
        if job_id in self.running:
            self.overlaps += 1
        self.submitted.append(job_id)
        number = len(self.submitted)
        self._attempts[job_id] += 1
        self._cancelled.discard(job_id)
        self.running.add(job_id)
        self.max_running = max(self.max_running, len(self.running))
        try:
            await asyncio.sleep(0)
            if number in self.crash_submissions or self._attempts[job_id] <= self.crash_attempts.get(job_id, 0):
                raise EngineError(f"engine process died running {job_id}", retryable=True)
            if job_id in self.fatal:
                raise EngineError(f"out of memory at this size ({job_id})", retryable=False)
            for step in range(1, self.steps + 1):
                yield Progress(job_id, step, self.steps, "base")
                await asyncio.sleep(0)
                if job_id in self._cancelled:
                    raise JobCancelled(job_id)
            if job_id in self.hold or (self.hold_after is not None and number > self.hold_after):
                await self._released.setdefault(job_id, asyncio.Event()).wait()
            if job_id in self._cancelled:
                raise JobCancelled(job_id)
            self.results[job_id] += 1
            yield Result(
                job_id,
                [ImageOut(b"png", "png", job.seed, 64, 64)],
                model="fake",
                seconds=self.compute_seconds + 0.5,
                compute_seconds=self.compute_seconds,
            )
        finally:
            self.running.discard(job_id)
