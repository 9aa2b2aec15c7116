"""Everything the cogs use, built once in `setup_hook`: database stores, engine, scheduler,
output store, safety checker, metrics, and the request/delivery services on top of them."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bot.delivery import Delivery
from bot.metrics import Metrics
from bot.requests import JobRequests, build_engine_job
from bot.safety import SafetyChecker
from bot.scheduler import Scheduler
from bot.storage import OutputStore
from config.settings import Settings
from db.jobs import JobRecord, JobStore
from db.migrate import upgrade
from db.moderation import ModerationStore
from db.quotas import QuotaStore
from db.session import Database
from engine.spec import EngineClient

if TYPE_CHECKING:
    from bot.app import AtelierBot

log = logging.getLogger(__name__)

# Bot-wide flags (the queue is shared by every server the bot is in) live on this guild id.
GLOBAL_GUILD = 0
PRUNE_EVERY_SECONDS = 3600.0


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
    scheduler: Scheduler[JobRecord] = field(init=False)
    requests: JobRequests = field(init=False)
    delivery: Delivery = field(init=False)
    config_blocklist: list[str] = field(default_factory=list)
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

    def blocked_term(self, text: str) -> str | None:
        for pattern in self.config_blocklist:
            match = re.search(pattern, text, re.IGNORECASE)
            if match:
                return match.group(0) or pattern
        return None

    async def set_paused(self, paused: bool) -> None:
        await self.moderation.set_paused(GLOBAL_GUILD, paused)
        if paused:
            self.scheduler.pause()
        else:
            self.scheduler.resume()

    async def stop(self, grace: float) -> None:
        for task in self._tasks:
            task.cancel()
        await self.scheduler.stop(grace)
        await self.delivery.drain(timeout=5.0)
        await self.engine.close()
        self.metrics.stop_http()
        await self.db.close()


async def build_services(
    bot: AtelierBot, settings: Settings, engine_factory: Callable[[Settings], EngineClient]
) -> Services:
    from bot.app import StartingEngine

    await upgrade(settings.database.url)
    db = Database(settings.database.url)
    await db.connect()
    jobs = JobStore(db)
    quotas = QuotaStore(
        db, window_seconds=settings.quota.window_hours * 3600, default_limit=settings.quota.default_limit
    )
    moderation = ModerationStore(db)
    outputs = OutputStore(settings.storage)
    safety = SafetyChecker(settings.safety)
    if settings.safety.enabled:
        await safety.load()
    metrics = Metrics()
    if settings.metrics.port:
        metrics.start_http(settings.metrics.port)
    engine = StartingEngine(engine_factory(settings))
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
        config_blocklist=list(settings.moderation.blocklist),
    )
    services.delivery = Delivery(bot, services)
    services.scheduler = scheduler = Scheduler(
        jobs,
        engine,
        queue=settings.queue,
        job_factory=lambda record: build_engine_job(record, inputs_dir),
        store_images=services.delivery.store_images,
    )
    services.requests = JobRequests(bot, services, inputs_dir=inputs_dir)
    scheduler.on_event(services.delivery.on_event)
    if (await moderation.get_settings(GLOBAL_GUILD)).paused:
        scheduler.pause()
    await scheduler.start()
    for view in scheduler.snapshot():  # jobs recovered from the previous run
        services.delivery.track(view.record)
    services._tasks.append(asyncio.create_task(services.delivery.deliver_pending(), name="deliver-pending"))
    services._tasks.append(asyncio.create_task(_prune_forever(outputs), name="prune-outputs"))
    return services


async def _prune_forever(outputs: OutputStore) -> None:
    while True:
        try:
            report = await asyncio.to_thread(outputs.prune)
            if report.deleted_files:
                log.info("pruned %d old output files (%d bytes)", report.deleted_files, report.deleted_bytes)
        except Exception:
            log.exception("pruning outputs failed")
        await asyncio.sleep(PRUNE_EVERY_SECONDS)
