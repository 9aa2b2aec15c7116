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
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.metrics import Metrics
from bot.permissions import serves, serves_guild
from bot.views import DYNAMIC_ITEMS, answer_unknown_button
from config.settings import Settings
from engine.spec import EngineClient, EngineHealth, Job, Progress, Result

log = logging.getLogger(__name__)

EXTENSIONS = (
    "bot.commands.generate",
    "bot.commands.images",
    "bot.commands.models",
    "bot.commands.account",
    "bot.commands.mod",
    "bot.commands.operator",
)
SHUTDOWN_GRACE_SECONDS = 10.0


def point_discord_at(api_base: str, gateway: str) -> None:
    """discord.py keeps its endpoints in class attributes; the contract lets operators move them."""
    discord.http.Route.BASE = api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)


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
        from engine.ray_client import RayEngineClient  # optional extra

        return RayEngineClient(settings)
    from engine.client import LocalEngineClient

    return LocalEngineClient(settings)


def error_text(error: app_commands.AppCommandError) -> str | None:
    """The member-facing text for an app-command error; None for an unexpected one (a bug)."""
    from bot.fairqueue import QueueFull
    from bot.requests import Refused
    from engine.validate import ValidationFailed

    if isinstance(error, app_commands.CommandInvokeError):
        original = error.original
        if isinstance(original, Refused | ValidationFailed | QueueFull):
            return str(original)
        return None
    if isinstance(error, app_commands.NoPrivateMessage):
        return "This command works in a server, not in DMs."
    if isinstance(error, app_commands.MissingPermissions):
        needed = ", ".join(p.replace("_", " ").title() for p in error.missing_permissions)
        return f"You need the {needed} permission for that."
    if isinstance(error, app_commands.BotMissingPermissions):
        needed = ", ".join(p.replace("_", " ").title() for p in error.missing_permissions)
        return f"I am missing the {needed} permission in this channel: ask a server admin to grant it."
    if isinstance(error, app_commands.CommandOnCooldown):
        return f"Slow down: try again in {error.retry_after:.0f} s."
    if isinstance(error, app_commands.CheckFailure):
        # NotModerator, GuildOnly (bot.permissions) carry their own text.
        return getattr(error, "message", None) or "You cannot use this command here."
    if isinstance(error, app_commands.TransformerError):
        return (
            f"I could not use `{str(error.value)[:80]}` for that option: pick a value Discord offers "
            "(a member, role or choice from the list) and try again."
        )
    if isinstance(error, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch):
        return "This command changed since your Discord app loaded it: reload Discord (Ctrl+R) and try again."
    return None


# Option type → the JSON types Discord sends for it (snowflakes arrive as strings).
_OPTION_VALUE_TYPES: dict[int, tuple[type, ...]] = {3: (str,), 4: (int,), 5: (bool,), 10: (int, float)}


def mistyped_option(options: list[Any]) -> str | None:
    """The name of the first option (in sub-commands too) whose value has the wrong JSON type."""
    for option in options:
        if not isinstance(option, dict):
            return "?"
        kind, value = option.get("type"), option.get("value")
        if kind in (1, 2):
            found = mistyped_option(option.get("options") or [])
            if found is not None:
                return found
            continue
        expected = _OPTION_VALUE_TYPES.get(kind)  # type: ignore[arg-type]
        if expected is None or "value" not in option:
            continue
        if isinstance(value, bool) and bool not in expected:  # bool is an int in Python, not in JSON
            return str(option.get("name"))
        if not isinstance(value, expected):
            return str(option.get("name"))
    return None


class AtelierTree(app_commands.CommandTree):
    """Every app-command error gets an ephemeral answer, so nothing ends in Discord's
    "The application did not respond"; unexpected ones are logged with the interaction id."""

    async def interaction_check(self, interaction: discord.Interaction, /) -> bool:
        if not serves(interaction):
            return False  # a server outside [discord] guilds: nothing at all, not even a refusal
        # Discord sends every option value with its declared type; a payload that does not (a
        # modified client, another compatible server) is refused here, not deep inside a command.
        if interaction.type is not discord.InteractionType.application_command:
            return True
        name = mistyped_option((interaction.data or {}).get("options") or [])
        if name is None:
            return True
        try:
            await interaction.response.send_message(
                f"The value given for `{name[:40]}` is not of the kind this option takes. Pick it again in Discord.",
                ephemeral=True,
            )
        except discord.HTTPException as exc:
            log.warning("could not answer interaction %s: %s %s", interaction.id, exc.status, exc.text)
        return False

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        text = error_text(error)
        command = interaction.command.qualified_name if interaction.command else "?"
        if text is None:
            cause = error.original if isinstance(error, app_commands.CommandInvokeError) else error
            log.error(
                "command /%s by user %s failed (interaction %s)",
                command,
                interaction.user.id,
                interaction.id,
                exc_info=(type(cause), cause, cause.__traceback__),
            )
            text = (
                f"Something went wrong on my side (reference `{interaction.id}`). Please try again; "
                "if it keeps happening, tell a moderator."
            )
        else:
            log.info("command /%s by user %s refused: %s", command, interaction.user.id, type(error).__name__)
        try:
            if interaction.response.is_done():
                await interaction.followup.send(text, ephemeral=True)
            else:
                await interaction.response.send_message(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not answer interaction %s: %s %s", interaction.id, exc.status, exc.text)


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
        from bot.services import build_services

        self.services = await build_services(self, self.settings, self._engine_factory)
        self.requests = self.services.requests
        self.add_dynamic_items(*DYNAMIC_ITEMS)
        self.add_listener(answer_unknown_button, "on_interaction")
        for extension in EXTENSIONS:
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
        services = getattr(self, "services", None)
        if services is not None:
            await services.stop(grace)
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
