"""Everything the cogs use, built once in `setup_hook`: the stores, the engine, the scheduler, the
delivery of results, the intake of new jobs, the actions on existing ones. One bot process alone
(SQLite or PostgreSQL), or several sharing one PostgreSQL (`[database] shared`, bot.coordination):
the choice is made here, once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import discord

from bot.blocklists import Blocklists
from bot.coordination import Coordinator, SharedDelivery, SharedScheduler, SharedStore
from bot.delivery import Delivery
from bot.intake import Intake, engine_job
from bot.job_actions import JobActions
from bot.metrics import JobObserver, Metrics
from bot.queue.batching import batch_shape
from bot.queue.scheduler import Scheduler
from bot.results import ResultPoster
from bot.safety import SafetyChecker
from bot.storage import OutputStore
from config.settings import Settings
from db.coordination import NoticeSender
from db.jobs import JobRecord, JobStore
from db.migrate import upgrade
from db.moderation import EVERYWHERE, ModerationStore
from db.quotas import QuotaStore
from db.session import Database
from engine.api import EngineClient, EngineHealth, Result
from engine.jobs import KINDS, Job
from engine.jobs.events import Cancelled, Done, Failed, JobEvent, Progress

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 3600.0
SHARED_CACHE_SECONDS = 2.0


class StartingEngine:
    """An EngineClient that starts the real one in the background and makes `submit` wait for it,
    so a slow model load never delays the bot's own start-up."""

    def __init__(self, inner: EngineClient) -> None:
        self.inner = inner
        self._started: asyncio.Task[None] | None = None

    @property
    def slots(self) -> int:
        # Read through: a distributed engine's slots follow its live replicas.
        return self.inner.slots

    @property
    def prefetch(self) -> int:
        return int(getattr(self.inner, "prefetch", 0))

    async def start(self) -> None:
        if self._started is None:
            self._started = asyncio.create_task(self.inner.start(), name="engine-start")

    async def ready(self) -> None:
        await self.start()
        assert self._started is not None
        await asyncio.shield(self._started)

    async def submit(self, job: Job) -> AsyncIterator[Progress | Result]:
        await self.ready()
        async for item in self.inner.submit(job):
            yield item

    async def cancel(self, job_id: str) -> bool:
        return await self.inner.cancel(job_id)

    async def close(self) -> None:
        if self._started is not None and not self._started.done():
            self._started.cancel()
        await self.inner.close()

    def health(self) -> EngineHealth:
        return self.inner.health()


def make_engine(settings: Settings) -> EngineClient:
    if settings.engine.backend == "ray":
        from engine.ray_client import RayEngineClient  # an optional extra: imported only when asked for

        return RayEngineClient(settings)
    from engine.client import LocalEngineClient  # torch-free, but not needed for a Ray backend

    return LocalEngineClient(settings)


@dataclass
class Wiring:
    settings: Settings
    db: Database
    jobs: JobStore
    quotas: QuotaStore
    moderation: ModerationStore
    engine: StartingEngine
    outputs: OutputStore
    safety: SafetyChecker
    metrics: Metrics
    blocklists: Blocklists
    results: ResultPoster
    delivery: Delivery
    scheduler: Scheduler[JobRecord]
    intake: Intake
    actions: JobActions
    coordinator: Coordinator | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def set_paused(self, scope: int, paused: bool) -> None:
        """Pause or resume one server's jobs, or (scope EVERYWHERE, the operator's) all of them."""
        await self.moderation.set_paused(scope, paused)
        if self.coordinator is not None:
            await self.coordinator.send("pause" if paused else "resume", None)
        apply_pauses(self.scheduler, [scope] if paused else [], only=scope)

    async def load_pauses(self) -> None:
        """The pauses in the database (at start-up, and when another process changed one)."""
        apply_pauses(self.scheduler, await self.moderation.paused_guilds())

    async def stop(self, grace: float) -> None:
        for task in self._tasks:
            task.cancel()
        await self.scheduler.stop(grace)
        await self.delivery.drain(timeout=5.0)
        await self.engine.close()
        if self.coordinator is not None:
            # After the engine is gone, so two engines never share the GPU during a hand-over.
            await self.coordinator.stop()
        self.metrics.stop_http()
        await self.db.close()


async def wire(
    client: discord.Client,
    settings: Settings,
    metrics: Metrics,
    *,
    engine_factory: Callable[[Settings], EngineClient],
    accepting: Callable[[], bool],
) -> Wiring:
    await upgrade(settings.database.url)
    db = Database(settings.database.url)
    await db.connect()
    shared = settings.database.shared  # several bot processes on one PostgreSQL: bot.coordination
    notices = NoticeSender() if shared else None
    jobs = JobStore(db, notices=notices, kinds=KINDS)
    # On PostgreSQL other bot processes may write too: see their moderation changes within 2 s.
    moderation = ModerationStore(db, cache_ttl=None if db.is_sqlite else SHARED_CACHE_SECONDS)
    quotas = QuotaStore(
        db,
        window_seconds=settings.quota.window_hours * 3600,
        default_limit=settings.quota.default_limit,
        settings_written=moderation.guild_settings_written,
    )
    outputs = OutputStore(settings.storage)
    safety = SafetyChecker(settings.safety)
    if settings.safety.enabled:
        await safety.load()
    if settings.metrics.port:
        metrics.start_http(settings.metrics.port, settings.metrics.host)
    engine = StartingEngine(engine_factory(settings))
    if not shared:  # shared: only the process that becomes the dispatcher starts its engine
        await engine.start()

    results = ResultPoster(client, settings=settings, jobs=jobs, safety=safety, outputs=outputs)
    parts: dict[str, Any] = {"jobs": jobs, "results": results, "safety": safety, "safety_settings": settings.safety}
    coordinator: Coordinator | None = None
    delivery: Delivery
    scheduler: Scheduler[JobRecord]
    if notices is None:
        delivery = Delivery(client, **parts)
        scheduler = Scheduler(
            jobs,
            engine,
            queue=settings.queue,
            job_factory=lambda record: engine_job(record, outputs),
            store_images=results.store_images,
            batch_shape=batch_shape,
        )
    else:
        dispatching = lambda: coordinator is not None and coordinator.dispatching  # noqa: E731
        delivery = SharedDelivery(client, dispatching=dispatching, **parts)
        scheduler = SharedScheduler(
            SharedStore(jobs),
            engine,
            queue=settings.queue,
            job_factory=lambda record: engine_job(record, outputs),
            store_images=results.store_images,
            may_dispatch=dispatching,
            batch_shape=batch_shape,
        )
    blocklists = Blocklists(moderation, settings.moderation.blocklist)
    intake = Intake(
        settings=settings,
        jobs=jobs,
        quotas=quotas,
        moderation=moderation,
        blocklists=blocklists,
        scheduler=scheduler,
        delivery=delivery,
        outputs=outputs,
        metrics=metrics,
        accepting=accepting,
        shares_guild=lambda guild_id: client.get_guild(guild_id) is not None,
        fetch=client.http.get_from_cdn,
    )
    actions = JobActions(
        client=client,
        settings=settings,
        jobs=jobs,
        quotas=quotas,
        scheduler=scheduler,
        delivery=delivery,
        results=results,
        outputs=outputs,
    )
    wiring = Wiring(
        settings=settings,
        db=db,
        jobs=jobs,
        quotas=quotas,
        moderation=moderation,
        engine=engine,
        outputs=outputs,
        safety=safety,
        metrics=metrics,
        blocklists=blocklists,
        results=results,
        delivery=delivery,
        scheduler=scheduler,
        intake=intake,
        actions=actions,
    )
    if notices is not None:
        coordinator = wiring.coordinator = Coordinator(wiring, notices, resync_seconds=settings.database.resync_seconds)  # type: ignore[arg-type]
        assert isinstance(scheduler, SharedScheduler)
        scheduler.coordinator = coordinator
        await coordinator.start_listening()
    await _start(wiring, outputs, jobs, engine)
    return wiring


async def _start(wiring: Wiring, outputs: OutputStore, jobs: JobStore, engine: StartingEngine) -> None:
    scheduler, delivery = wiring.scheduler, wiring.delivery
    scheduler.on_event(delivery.on_event)
    scheduler.on_event(lambda event: _drop_input_when_ended(outputs, event))
    observer = JobObserver(wiring.metrics, scheduler, engine)
    scheduler.on_event(observer.on_event)
    wiring._tasks.append(asyncio.create_task(observer.run(), name="metrics-refresh"))
    await wiring.load_pauses()
    await scheduler.start()
    if wiring.coordinator is not None:
        wiring.coordinator.start()  # recovery and pending posts happen when it becomes the dispatcher
    else:
        for view in scheduler.snapshot():  # jobs recovered from the previous run
            delivery.track(view.record)
        wiring._tasks.append(asyncio.create_task(delivery.deliver_pending(), name="deliver-pending"))
    wiring._tasks.append(asyncio.create_task(_prune_forever(outputs, jobs), name="prune-outputs"))


def apply_pauses(scheduler: Scheduler[JobRecord], paused: list[int], *, only: int | None = None) -> None:
    """Make the scheduler's pauses what `paused` says (scope EVERYWHERE pauses everything); with
    `only`, just that one scope's."""
    if only is None or only == EVERYWHERE:
        if EVERYWHERE in paused:
            scheduler.pause()
        else:
            scheduler.resume()
    if only is None:
        scheduler.set_paused_servers([g for g in paused if g != EVERYWHERE])
    elif only != EVERYWHERE:
        scheduler.pause_server(only, only in paused)


def _drop_input_when_ended(outputs: OutputStore, event: JobEvent) -> None:
    """An input image is kept only while a retry may need it: not once its job ended."""
    if isinstance(event, Done | Failed | Cancelled):
        outputs.drop_input(event.job_id)


async def _prune_forever(outputs: OutputStore, jobs: JobStore) -> None:
    while True:
        try:
            active = {record.id for record in await jobs.list_by_status(["queued", "running"])}
            report = await asyncio.to_thread(outputs.prune, active=active)
            if report.deleted_files:
                log.info("pruned %d old output files (%d bytes)", report.deleted_files, report.deleted_bytes)
        except Exception:
            log.exception("pruning outputs failed")
        await asyncio.sleep(PRUNE_EVERY_SECONDS)


__all__ = ["StartingEngine", "Wiring", "apply_pauses", "make_engine", "wire"]
