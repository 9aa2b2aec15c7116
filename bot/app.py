"""The Atelier bot: a small `commands.Bot` whose `setup_hook` wires the parts together.

Start-up order matters for the "never lose a job" guarantee: the database is upgraded and the
scheduler recovers queued/running jobs before the first interaction can arrive; the engine loads
its models in the background (that can take minutes with real SDXL), and the scheduler simply waits
for it, so the bot answers commands from its first second online.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import pkgutil
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import discord
import yarl
from discord.ext import commands

import bot.commands
from bot.buttons import answer_unknown_button
from bot.metrics import Metrics
from bot.permissions import serves_guild
from bot.tree import AtelierTree
from bot.wiring import Wiring, make_engine, wire
from config.settings import Settings
from db.moderation import ModerationStore
from engine.api import EngineClient

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0


def extensions() -> list[str]:
    """Every cog module of bot/commands: one per feature, each with its `setup` (the helpers they
    share are in bot/commands/common.py and scoped.py, without one)."""
    found = pkgutil.iter_modules(bot.commands.__path__, prefix="bot.commands.")
    helpers = {"bot.commands.common", "bot.commands.scoped"}
    return sorted(module.name for module in found if module.name not in helpers)


def point_discord_at(api_base: str, gateway: str) -> None:
    """discord.py keeps its endpoints in class attributes; the contract lets operators move them."""
    discord.http.Route.BASE = api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


def discord_connector(settings: Settings, options: dict[str, Any]) -> aiohttp.TCPConnector:
    """The HTTP connection pool for Discord: ``[discord] http_connections`` for REST calls, plus one
    for each gateway shard's websocket, which holds its connection for good.

    discord.py's own pool has no limit, so a burst of 200 interactions opened 200 connections at
    once to send 200 deferrals: 200 TLS handshakes against Discord, 200 connects on loopback
    (the first such burst answered ~40 % slower than the next). A few dozen kept-alive connections
    carry a burst's requests one after another instead."""
    rest = settings.discord.http_connections
    if rest == 0:
        return aiohttp.TCPConnector(limit=0)
    shards = len(options.get("shard_ids") or ()) or options.get("shard_count") or 1
    return aiohttp.TCPConnector(limit=rest + shards)


class AtelierBot(commands.Bot):
    def __init__(
        self,
        settings: Settings,
        *,
        engine_factory: Callable[[Settings], EngineClient] = make_engine,
        freeze_heap: bool = False,
        **options: Any,
    ) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        options.setdefault("guild_ready_timeout", 1.0)
        metrics = Metrics()
        options.setdefault("http_trace", metrics.discord_trace())
        if "connector" not in options:
            options["connector"] = discord_connector(settings, options)
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            tree_cls=AtelierTree,
            **options,
        )
        self.settings = settings
        self.metrics = metrics
        self._engine_factory = engine_factory
        self._freeze_heap = freeze_heap
        self.accepting = True
        self.wiring: Wiring

    @property
    def moderation(self) -> ModerationStore:
        """For bot.permissions (a moderator role set with /mod)."""
        return self.wiring.moderation

    async def on_ready(self) -> None:
        await self.leave_unlisted_guilds()

    async def on_guild_join(self, guild: discord.Guild) -> None:
        await self._leave_unless_served(guild)

    async def on_guild_available(self, guild: discord.Guild) -> None:
        await self._leave_unless_served(guild)

    async def _leave_unless_served(self, guild: discord.Guild) -> None:
        if not serves_guild(self.settings, guild.id):
            log.warning("added to server %s (%s), which is not in [discord] guilds: leaving it", guild.id, guild.name)
            await guild.leave()

    async def leave_unlisted_guilds(self) -> None:
        """With `[discord] guilds` set, the bot stays in those servers only (it may have been
        added elsewhere while it was offline: anyone can add a public bot)."""
        for guild in list(self.guilds):
            if not serves_guild(self.settings, guild.id):
                log.warning("in server %s (%s), which is not in [discord] guilds: leaving it", guild.id, guild.name)
                try:
                    await guild.leave()
                except discord.HTTPException as exc:
                    log.error("could not leave server %s: %s %s", guild.id, exc.status, exc.text)

    async def on_interaction(self, interaction: discord.Interaction) -> None:
        # For the first-response metric, which only sees the callback URL (see Metrics.discord_trace).
        kinds = {
            discord.InteractionType.application_command: "command",
            discord.InteractionType.component: "component",
            discord.InteractionType.autocomplete: "autocomplete",
        }
        self.metrics.note_interaction(interaction.id, kinds.get(interaction.type, "other"))

    async def setup_hook(self) -> None:
        self.wiring = await wire(
            self, self.settings, self.metrics, engine_factory=self._engine_factory, accepting=lambda: self.accepting
        )
        self.add_listener(answer_unknown_button, "on_interaction")
        for extension in extensions():
            await self.load_extension(extension)
        await self.sync_commands()
        if self._freeze_heap:
            freeze_startup_heap()

    async def sync_commands(self) -> None:
        guild_id = self.settings.discord.dev_guild_id
        try:
            if guild_id:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
            else:
                synced = await self.tree.sync()
        except discord.HTTPException as exc:
            # The bot still works with the commands Discord already has; say so and go on.
            log.error("command sync failed: %s %s", exc.status, exc.text)
            return
        log.info("synced %d commands %s", len(synced), f"to guild {guild_id}" if guild_id else "globally")

    async def shutdown(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop taking work, let the running job finish or requeue it, then disconnect."""
        if not self.accepting:
            return
        self.accepting = False
        log.info("shutting down: grace %.0f s for the running job", grace)
        wiring: Wiring | None = getattr(self, "wiring", None)
        if wiring is not None:
            await wiring.stop(grace)
        await self.close()


class ShardedAtelierBot(AtelierBot, commands.AutoShardedBot):
    """The same bot over one or more gateway shards of ``[discord] shard_count`` in this process
    (``shard_ids``, default all). Several such processes share work through ``[database] shared``."""


def freeze_startup_heap() -> None:
    """Take what start-up built (modules, ORM mappers, discord.py's and our own tables: some 140k
    objects) out of the cyclic garbage collector's sight. Each full collection walked them all:
    80-140 ms with the event loop stopped, and a burst of interactions, which allocates a lot, set
    one off just when its answers were due. Only a process that owns its interpreter does this
    (`run_bot`): frozen objects that later die in a reference cycle are never freed, a small cost
    for start-up state, which lives as long as the process."""
    gc.collect()
    gc.freeze()
    log.info("start-up heap frozen: %d objects left out of full garbage collections", gc.get_freeze_count())


def make_bot(settings: Settings, **options: Any) -> AtelierBot:
    """A plain bot (one gateway connection, no sharding) unless ``[discord] shard_count`` is set."""
    discord_settings = settings.discord
    if discord_settings.shard_count:
        options.setdefault("shard_count", discord_settings.shard_count)
        options.setdefault("shard_ids", list(discord_settings.shard_ids) or None)
        return ShardedAtelierBot(settings, **options)
    return AtelierBot(settings, **options)


def run_bot(settings: Settings, token: str) -> int:
    """`atelier run`: connect to Discord (or a compatible server) until SIGTERM/SIGINT."""
    point_discord_at(settings.discord.api_base, settings.discord.gateway)

    async def main() -> None:
        bot = make_bot(settings, freeze_heap=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.create_task(bot.shutdown()))
        async with bot:
            try:
                await bot.start(token)
            except discord.LoginFailure:
                log.error("Discord refused the token (401): check DISCORD_TOKEN")
                raise SystemExit(2) from None

    asyncio.run(main())
    return 0
