"""Several bot processes (Discord shards) sharing one PostgreSQL and one engine: ``[database] shared``.

Roles. Every process takes commands and clicks for the guilds of its shards and enqueues jobs in
the database exactly as a lone bot does (quota reservation and job row in one transaction). One
process at a time is the **dispatcher**: it holds the PostgreSQL advisory lock
(``db.coordination.DispatcherLock``), starts the engine, runs the jobs, and shows their life in
Discord (status edits and result posts go through REST with the bot token, which works for any
guild whatever shard receives its events). The other processes start no engine.

Hand-over. Non-dispatchers try the lock every ``LOCK_POLL_SECONDS`` (at once when the dispatcher
announces it is stopping). The dispatcher's lock lives in its database session, so when the process
dies PostgreSQL releases it and the next process takes over: it re-reads the queue, requeues the
jobs the dead dispatcher was running (their interrupted attempt counts), gives back result posts it
had claimed, starts its engine and posts any finished but unposted result.

Following the queue. Every job state change sends a notice (``LISTEN/NOTIFY``) in its own
transaction. Each process mirrors the queued jobs in its ``Scheduler`` (for queue positions, ETAs,
caps, ``/queue``), but only the dispatcher's ``may_dispatch`` is true. A missed notice is repaired
by re-reading the queue every ``[database] resync_seconds``.

Exactly once. A job starts through ``JobStore.claim`` (``FOR UPDATE SKIP LOCKED`` on a queued row),
so it can never run twice even if two dispatchers overlapped; a result is posted only after
``JobStore.claim_post`` (a conditional update) succeeded. A cancel clicked on another process
cancels a queued job in the database itself (only while it is still queued, so it cannot race a
claim) or asks the dispatcher, by a notice, to stop a running one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import discord

from bot.delivery import TERMINAL, Delivery, Tracked
from bot.queue.scheduler import Scheduler
from bot.render import cancelled_text, done_text, failed_text
from config.settings import Settings
from db.coordination import DispatcherLock, JobNotice, NoticeListener, NoticeSender
from db.jobs import POSTING, InvalidTransition, JobError, JobRecord, JobStore, RecoveryResult
from db.session import Database

__all__ = ["LOCK_POLL_SECONDS", "Coordinator", "JobTaken", "SharedDelivery", "SharedScheduler", "SharedStore"]

log = logging.getLogger(__name__)

LOCK_POLL_SECONDS = 1.0
LATE_CARD_WAIT_SECONDS = 30.0


class JobTaken(JobError):
    """The job is not queued any more, or another transaction holds it: someone else has it."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was taken by someone else")
        self.job_id = job_id


class SharedStore:
    """The scheduler's store in shared mode: ``mark_running`` is a claim, and start-up loads the
    queue without recovering anything (recovery is the new dispatcher's job, when it takes over)."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs

    async def get(self, job_id: str) -> JobRecord | None:
        return await self.jobs.get(job_id)

    async def mark_running(self, job_id: str) -> JobRecord:
        record = await self.jobs.claim(job_id)
        if record is None:
            raise JobTaken(job_id)
        return record

    async def mark_done(
        self, job_id: str, *, images: list[dict[str, Any]], seeds: list[int], seconds: float
    ) -> JobRecord:
        return await self.jobs.mark_done(job_id, images=images, seeds=seeds, seconds=seconds)

    async def mark_failed(self, job_id: str, error: str) -> JobRecord:
        return await self.jobs.mark_failed(job_id, error)

    async def mark_cancelled(self, job_id: str) -> JobRecord:
        return await self.jobs.mark_cancelled(job_id)

    async def requeue(self, job_id: str, error: str, *, attempt_used: bool = True) -> JobRecord:
        return await self.jobs.requeue(job_id, error, attempt_used=attempt_used)

    async def recover_detailed(self, max_attempts: int = 3) -> RecoveryResult:
        # Running jobs may be running right now in the dispatcher: leave them alone.
        return RecoveryResult([], [], await self.jobs.list_by_status(["queued"]))


class SharedScheduler(Scheduler[JobRecord]):
    """A ``Scheduler`` whose cancels reach the dispatcher when this process is not it."""

    coordinator: Coordinator

    async def cancel(self, job_id: str) -> bool:
        if self.coordinator.dispatching:
            return await super().cancel(job_id)
        jobs = self.coordinator.jobs
        record = await jobs.get(job_id)
        if record is None or record.is_final:
            return False
        if record.status == "queued":
            try:
                await jobs.mark_cancelled(job_id, only_queued=True)
            except InvalidTransition:
                pass  # claimed in between: it runs in the dispatcher now
            else:
                self.forget(job_id)  # the dispatcher edits the queue card when it hears of it
                return True
        await self.coordinator.send("cancel", job_id)
        return True


class SharedDelivery(Delivery):
    """Only the dispatcher shows jobs in Discord, and a result is posted after a claim."""

    def __init__(self, client: discord.Client, *, dispatching: Callable[[], bool], **parts: Any) -> None:
        super().__init__(client, **parts)
        self._dispatching = dispatching
        self._in_flight: set[asyncio.Future[None]] = set()

    def track(self, record: JobRecord) -> Tracked:
        if self._dispatching():
            return super().track(record)
        return Tracked(record=record)  # not followed here: the dispatcher shows this job's life

    async def post_result(
        self, record: JobRecord, result: Any, *, status_message_id: int | None
    ) -> discord.Message | None:
        if not await self.jobs.claim_post(record.id):
            log.info("job %s: result already posted (or being posted) by another process", record.id)
            return None
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight.add(finished)
        try:
            message = await super().post_result(record, result, status_message_id=status_message_id)
        finally:
            finished.set_result(None)
            self._in_flight.discard(finished)
        if message is None:  # not posted: the claim goes back for a later try. (Interrupted half-way,
            # it stays claimed: the next dispatcher gives it back when it takes over.)
            await self.jobs.release_post(record.id)
        return message

    async def drain(self, timeout: float) -> None:
        # Posts run inside the follow tasks: let those in flight save their message id before the
        # tasks are cancelled, or the next dispatcher would post the result a second time.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout)
        await super().drain(max(0.0, deadline - loop.time()))

    async def note_card(self, job_id: str, message_id: int) -> None:
        """Another process sent a job's queue card: edit that message from now on."""
        tracked = self._jobs.get(job_id)
        if tracked is not None and not isinstance(tracked.latest, TERMINAL):
            tracked.status_message_id = message_id
            tracked.last_edit = time.monotonic()  # the card itself was the last "edit"
            tracked.changed.set()
            return
        if tracked is not None and tracked.task is not None:
            await asyncio.wait([tracked.task])  # its ending went out without the card: redo it
        await self._late_ending(job_id, message_id)

    async def _late_ending(self, job_id: str, message_id: int) -> None:
        deadline = time.monotonic() + LATE_CARD_WAIT_SECONDS
        record = await self.jobs.get(job_id)
        while record is not None and record.result_message_id == POSTING and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            record = await self.jobs.get(job_id)
        if record is None or not record.is_final:
            return
        if record.status == "done":
            url = None
            if record.result_message_id not in (None, POSTING):
                channel = self.client.get_partial_messageable(record.channel_id, guild_id=record.guild_id)
                url = channel.get_partial_message(record.result_message_id).jump_url
            content = done_text(record.id, url)
        elif record.status == "failed":
            content = failed_text(record.id, record.error or "failed", record.cost)
        else:
            content = cancelled_text(record.id, record.cost)
        await self._edit(record, message_id, content=content, view=None, attachments=[])


class SharedParts(Protocol):
    """What the coordinator works with (bot.wiring.Wiring in shared mode)."""

    settings: Settings
    db: Database
    jobs: JobStore
    scheduler: SharedScheduler
    delivery: SharedDelivery
    engine: Any  # bot.wiring.StartingEngine

    async def load_pauses(self) -> None: ...


class Coordinator:
    """Listens for notices, keeps the local queue in step with the database, and takes the
    dispatcher role when the lock is free. See the module docstring."""

    def __init__(self, services: SharedParts, notices: NoticeSender, *, resync_seconds: float) -> None:
        self.services = services
        self.jobs = services.jobs
        self.notices = notices
        self.origin = notices.origin
        self.resync_seconds = resync_seconds
        url = services.settings.database.url
        self._lock = DispatcherLock(url, on_lost=self._lost)
        self._listener = NoticeListener(url, self._on_notice, on_reconnect=self.resync)
        self._inbox: asyncio.Queue[JobNotice] = asyncio.Queue()
        self._lock_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._dispatching = False
        self.takeovers = 0

    @property
    def dispatching(self) -> bool:
        """True while this process holds the lock and has taken the dispatcher role."""
        return self._dispatching and self._lock.held

    async def start_listening(self) -> None:
        """Before the scheduler loads the queue, so no notice falls between the two."""
        await self._listener.start()
        self._tasks.append(asyncio.create_task(self._handle_notices(), name="atelier-notices"))

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._lock_loop(), name="atelier-dispatcher-lock"))
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="atelier-resync"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        was_dispatching = self.dispatching
        self._dispatching = False
        await self._lock.release()
        if was_dispatching:
            # After the release, so the next process's first try succeeds.
            with contextlib.suppress(Exception):
                await self.send("released", None)
        await self._listener.close()

    async def send(self, event: str, job_id: str | None) -> None:
        async with self.services.db.session() as s:
            await self.notices.in_session(s, event, job_id)

    # ------------------------------------------------------------------ the dispatcher role
    async def _lock_loop(self) -> None:
        while True:
            # A process that lost the lock while running jobs waits until they are over: the next
            # dispatcher requeues whatever is "running" when it takes over.
            if not self._lock.held and not self._running_here():
                try:
                    if await self._lock.try_acquire():
                        await self._take_over()
                except Exception:
                    log.exception("trying the dispatcher lock failed")
            self._lock_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lock_wake.wait(), LOCK_POLL_SECONDS)

    def _running_here(self) -> bool:
        return any(view.status == "running" for view in self.services.scheduler.snapshot())

    async def _take_over(self) -> None:
        services = self.services
        scheduler = services.scheduler
        started = time.monotonic()
        # Whatever is "running" now was run by a dispatcher that is gone (it held the lock until
        # its session ended): back to the queue, or failed and refunded after max_attempts.
        recovery = await self.jobs.recover_detailed(services.settings.queue.max_attempts)
        stale = await self.jobs.release_stale_posts()
        self._dispatching = True
        self.takeovers += 1
        for record in recovery.queued:
            services.delivery.track(record)  # fresh rows: they carry the queue card ids
        await services.load_pauses()
        for record in recovery.requeued:  # interrupted attempts go first, as retries do
            scheduler.adopt(record, publish=False, front=True)
        scheduler.absorb(recovery)
        await services.engine.start()
        scheduler.wake()
        self._tasks.append(asyncio.create_task(services.delivery.deliver_pending(), name="deliver-pending"))
        log.info(
            "took the dispatcher role in %.2f s: %d queued, %d requeued from the previous dispatcher, "
            "%d failed for good, %d result post(s) to retry",
            time.monotonic() - started,
            len(recovery.queued),
            len(recovery.requeued),
            len(recovery.failed),
            stale,
        )

    def _lost(self) -> None:
        if self._dispatching:
            self._dispatching = False
            log.error("no longer the dispatcher: running jobs finish, nothing new starts here")
        self._lock_wake.set()

    # ------------------------------------------------------------------ following the queue
    def _on_notice(self, notice: JobNotice) -> None:
        if notice.origin != self.origin:  # this process already acted on its own changes
            self._inbox.put_nowait(notice)

    async def _handle_notices(self) -> None:
        while True:
            notice = await self._inbox.get()
            try:
                await self._handle(notice)
            except Exception:
                log.exception("handling notice %s failed", notice)

    async def _handle(self, notice: JobNotice) -> None:
        scheduler = self.services.scheduler
        event, job_id = notice.event, notice.job_id
        if event == "released":
            self._lock_wake.set()
        elif event in ("pause", "resume"):
            await self.services.load_pauses()
        elif job_id is None:
            return
        elif event == "queued":
            if not scheduler.knows(job_id):
                record = await self.jobs.get(job_id)
                if record is not None and record.status == "queued":
                    self._adopt(record)
        elif event == "running":
            scheduler.forget(job_id)
        elif event in ("done", "failed", "cancelled"):
            if scheduler.knows(job_id):
                record = await self.jobs.get(job_id) if self.dispatching else None
                scheduler.forget(job_id, ended=record)
        elif event == "card" and notice.message_id is not None:
            if self.dispatching:
                await self.services.delivery.note_card(job_id, notice.message_id)
        elif event == "cancel" and self.dispatching:
            await scheduler.cancel(job_id)

    def _adopt(self, record: JobRecord) -> None:
        if self.dispatching and not self.services.scheduler.knows(record.id):
            self.services.delivery.track(record)
        self.services.scheduler.adopt(record)

    async def _resync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            try:
                await self.resync()
                if self._dispatching:
                    await self._lock.check()
            except Exception:
                log.exception("re-reading the queue failed")

    async def resync(self) -> None:
        """Make the local queue match the database (notices may have been missed)."""
        scheduler = self.services.scheduler
        queued = await self.jobs.list_by_status(["queued"])
        in_db = {record.id for record in queued}
        for record in queued:
            if not scheduler.knows(record.id):
                self._adopt(record)
        for view in scheduler.snapshot():
            if view.status == "queued" and view.job_id not in in_db:
                current = await self.jobs.get(view.job_id)
                if current is None or current.status != "queued":
                    scheduler.forget(view.job_id, ended=current if self.dispatching else None)
