"""Everything the cogs use, built once in `setup_hook`: database stores, engine, scheduler,
output store, safety checker, metrics, and the request/delivery services on top of them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bot.blocklists import Blocklists
from bot.coordination import Coordinator, SharedDelivery, SharedScheduler, SharedStore
from bot.delivery import Delivery
from bot.metrics import JobObserver, Metrics
from bot.requests import JobRequests, build_engine_job
from bot.safety import SafetyChecker
from bot.scheduler import Cancelled, Done, Failed, JobEvent, Scheduler
from bot.storage import OutputStore
from config.settings import Settings
from db.coordination import NoticeSender
from db.jobs import JobRecord, JobStore
from db.migrate import upgrade
from db.moderation import EVERYWHERE, ModerationStore
from db.quotas import QuotaStore
from db.session import Database
from engine.spec import EngineClient

if TYPE_CHECKING:
    from bot.app import AtelierBot

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 3600.0
SHARED_CACHE_SECONDS = 2.0


@dataclass
class Services:
    settings: Settings
    db: Database
    jobs: JobStore
    quotas: QuotaStore
    moderation: ModerationStore
    engine: EngineClient
    outputs: OutputStore
    safety: SafetyChecker
    metrics: Metrics
    blocklists: Blocklists
    scheduler: Scheduler[JobRecord] = field(init=False)
    requests: JobRequests = field(init=False)
    delivery: Delivery = field(init=False)
    coordinator: Coordinator | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def server_default_model(self, guild_id: int | None) -> str:
        if guild_id is not None:
            stored = (await self.moderation.get_settings(guild_id)).default_model
            if stored in self.settings.models:
                return stored
        return self.settings.default_model

    def unknown_model_text(self, name: str) -> str:
        known = ", ".join(f"`{n}`" for n in self.settings.models)
        return f"There is no model `{name}`. Pick one of: {known} (see `/model list`)."

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


async def build_services(
    bot: AtelierBot, settings: Settings, engine_factory: Callable[[Settings], EngineClient]
) -> Services:
    from bot.app import StartingEngine

    await upgrade(settings.database.url)
    db = Database(settings.database.url)
    await db.connect()
    shared = settings.database.shared  # several bot processes on one PostgreSQL: bot.coordination
    notices = NoticeSender() if shared else None
    jobs = JobStore(db, notices=notices)
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
    metrics = bot.metrics  # made with the bot: its HTTP trace counts Discord errors from the first request
    if settings.metrics.port:
        metrics.start_http(settings.metrics.port, settings.metrics.host)
    engine = StartingEngine(engine_factory(settings))
    if not shared:  # shared: only the process that becomes the dispatcher starts its engine
        await engine.start()
    inputs_dir = Path(settings.storage.output_dir) / "inputs"
    services = Services(
        settings=settings,
        db=db,
        jobs=jobs,
        quotas=quotas,
        moderation=moderation,
        engine=engine,
        outputs=outputs,
        safety=safety,
        metrics=metrics,
        blocklists=Blocklists(moderation, settings.moderation.blocklist),
    )
    coordinator = Coordinator(services, notices, resync_seconds=settings.database.resync_seconds) if notices else None
    services.coordinator = coordinator
    if coordinator is None:
        services.delivery = Delivery(bot, services)
    else:
        services.delivery = SharedDelivery(bot, services, dispatching=lambda: coordinator.dispatching)
    services.scheduler = scheduler = (Scheduler if coordinator is None else SharedScheduler)(
        jobs if coordinator is None else SharedStore(jobs),
        engine,
        queue=settings.queue,
        job_factory=lambda record: build_engine_job(record, inputs_dir),
        store_images=services.delivery.store_images,
        may_dispatch=None if coordinator is None else lambda: coordinator.dispatching,
    )
    if isinstance(scheduler, SharedScheduler) and coordinator is not None:
        scheduler.coordinator = coordinator
        await coordinator.start_listening()
    services.requests = JobRequests(bot, services, inputs_dir=inputs_dir)
    scheduler.on_event(services.delivery.on_event)
    scheduler.on_event(lambda event: _drop_input_when_ended(outputs, event))
    observer = JobObserver(metrics, scheduler, engine)
    scheduler.on_event(observer.on_event)
    services._tasks.append(asyncio.create_task(observer.run(), name="metrics-refresh"))
    await services.load_pauses()
    await scheduler.start()
    if coordinator is not None:
        coordinator.start()  # recovery and pending posts happen when it becomes the dispatcher
    else:
        for view in scheduler.snapshot():  # jobs recovered from the previous run
            services.delivery.track(view.record)
        services._tasks.append(asyncio.create_task(services.delivery.deliver_pending(), name="deliver-pending"))
    services._tasks.append(asyncio.create_task(_prune_forever(outputs, jobs), name="prune-outputs"))
    return services


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
