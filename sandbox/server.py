"""The :class:`Sandbox`: one in-process Discord-compatible server on 127.0.0.1.

It wires the pieces together (REST, webhooks, gateway, CDN, fault injection) and is the object
tests and ``make demo`` hold: create users/guilds/channels, point discord.py at ``api_base`` and
``gateway_url``, act as users through the :class:`~sandbox.driver.Driver` methods, and
inspect what the bot did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from . import api_errors as errors
from .builder import WorldBuilder
from .cdn import FileStore
from .command_registry import CommandRegistry, RegisteredCommand
from .faults import FaultInjector, FaultRule
from .gateway import Gateway, GatewaySession
from .http_json import error_response, json_response, redact
from .interactions import InteractionRecord
from .member_actions import Driver
from .messages import MessageService
from .payloads import application_payload, guild_payload, members_chunk, ready_payload
from .records import Guild, Message, Ref, StoredFile, User, ref_id
from .rest import RestApi
from .snowflakes import SnowflakeFactory, make_bot_token
from .tuning import MIB, SandboxSettings
from .webhooks import WebhookApi
from .world import World

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn

API_VERSIONS = ("10", "9")


@dataclass
class RequestRecord:
    """One HTTP request the sandbox answered (tokens redacted from ``path``)."""

    method: str
    path: str
    status: int
    at: float
    fault: bool = False
    client_port: int = 0  # the client's end of the TCP connection it came on: which requests shared one


class Sandbox(WorldBuilder, Driver):
    """A Discord-compatible server for one bot application.

    ``token``/``application_id`` are generated unless given. See :class:`SandboxSettings` for
    ``response_window`` (3 s), ``token_ttl`` (15 min) and ``upload_limit`` (10 MiB).
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        application_id: int | None = None,
        bot_name: str = "Atelier",
        host: str = "127.0.0.1",
        port: int = 0,
        response_window: float = 3.0,
        token_ttl: float = 15 * 60.0,
        upload_limit: int = 10 * MIB,
        heartbeat_interval: float = 41.25,
        allowed_intents: int | None = None,
    ) -> None:
        self.settings = SandboxSettings(
            response_window=response_window,
            token_ttl=token_ttl,
            upload_limit=upload_limit,
            heartbeat_interval=heartbeat_interval,
        )
        if allowed_intents is not None:
            self.settings.allowed_intents = allowed_intents
        snowflakes = SnowflakeFactory()
        self.world = World(snowflakes)
        self.application_id = application_id or snowflakes.next()
        self.bot_user = User(id=self.application_id, username=bot_name, global_name=None, bot=True)
        self.world.users[self.bot_user.id] = self.bot_user
        self.world.bot_user = self.bot_user
        self.owner = self.add_user("operator", global_name="Operator")
        self.token = token or make_bot_token(self.bot_user.id)
        self.commands = CommandRegistry(self.application_id, snowflakes)
        self.world.commands = self.commands
        self.faults = FaultInjector()
        self.requests: list[RequestRecord] = []
        self._host = host
        self._port = port
        self._base_url = ""
        self._runner: web.AppRunner | None = None
        self.files = FileStore(self.world, snowflakes, lambda: self._base_url)
        self.gateway = Gateway(
            self.world,
            token=lambda: self.token,
            ready_payload=self._ready_payload,
            guild_payloads=self._guild_payloads,
            members_chunk=self._members_chunk,
            settings=self.settings,
        )
        self.messages = MessageService(self.world, self.files, self.gateway, self.settings)

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> Sandbox:
        # Size limits are Discord's (checked per message), not aiohttp's: accept big bodies here.
        app = web.Application(middlewares=[self._middleware], client_max_size=1024 * MIB)
        for prefix in (f"/api/v{v}" for v in API_VERSIONS):
            for method, path, handler in RestApi(self).routes() + WebhookApi(self).routes():
                app.router.add_route(method, prefix + path, handler)
        app.router.add_get("/gateway", self.gateway.handle)
        app.router.add_get("/gateway/resume", self.gateway.handle)
        app.router.add_routes(self.files.routes())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._port = sock.getsockname()[1]
        self._base_url = f"http://{self._host}:{self._port}"
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        # discord.py opens a connection per concurrent request (its connector has no limit), so a
        # burst of 200 deferrals opens 200 at once; with aiohttp's default backlog of 128 the
        # kernel drops the extra SYNs and those clients retry a second later. Discord's edge
        # takes them all: so does the sandbox.
        await web.SockSite(self._runner, sock, backlog=LISTEN_BACKLOG).start()
        log.info("Discord sandbox listening on %s (application %s)", self._base_url, self.application_id)
        return self

    async def stop(self) -> None:
        if self._runner is None:
            return
        await self.gateway.close()
        await self._runner.cleanup()
        self._runner = None
        log.info("Discord sandbox stopped")

    async def __aenter__(self) -> Sandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- addresses ------------------------------------------------------------------------
    @property
    def url(self) -> str:
        if not self._base_url:
            raise errors.SandboxError("the sandbox is not started")
        return self._base_url

    @property
    def api_base(self) -> str:
        """Value for ``discord.http.Route.BASE`` / ``ATELIER_DISCORD_API_BASE``."""
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        """Value for ``DiscordWebSocket.DEFAULT_GATEWAY`` / ``ATELIER_DISCORD_GATEWAY``."""
        return f"ws://{self._host}:{self._port}/gateway"

    @property
    def resume_gateway_url(self) -> str:
        return f"ws://{self._host}:{self._port}/gateway/resume"

    def env(self) -> dict[str, str]:
        """Environment for running the bot against this sandbox."""
        return {
            "DISCORD_TOKEN": self.token,
            "ATELIER_DISCORD_API_BASE": self.api_base,
            "ATELIER_DISCORD_GATEWAY": self.gateway_url,
        }

    @contextlib.contextmanager
    def patch_discord(self) -> Iterator[None]:
        """Point discord.py (process-wide class attributes) at this sandbox, restoring on exit."""
        import discord.gateway
        import discord.http
        import yarl

        old_base = discord.http.Route.BASE
        old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        try:
            yield
        finally:
            discord.http.Route.BASE = old_base
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway

    # -- inspection -----------------------------------------------------------------------
    def channel_messages(
        self, channel: Ref, *, include_ephemeral: bool = True, include_deleted: bool = False
    ) -> list[Message]:
        """Messages of a channel in order (live records: ``.history`` holds earlier versions)."""
        msgs = self.world.channel_messages(ref_id(channel), include_deleted=include_deleted)
        return [m for m in msgs if include_ephemeral or not m.ephemeral]

    def registered_commands(self, guild: Ref | None = None) -> list[RegisteredCommand]:
        return self.commands.list(ref_id(guild) if guild is not None else None)

    def interactions(self) -> list[InteractionRecord]:
        """Every interaction dispatched so far, oldest first."""
        return list(self.world.interactions.values())

    def file_bytes(self, attachment: StoredFile | dict[str, Any]) -> bytes:
        """Bytes of an attachment (a StoredFile or an attachment payload dict)."""
        file_id = attachment.id if isinstance(attachment, StoredFile) else int(attachment["id"])
        return self.world.files[file_id].data

    async def download(self, url: str) -> bytes:
        """Fetch a CDN url over HTTP, exactly as a client would."""
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            resp.raise_for_status()
            return await resp.read()

    async def wait_until(self, predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
        """Wait (without polling) until ``predicate()`` is truthy; returns its value."""
        return await self.world.signal.wait_until(predicate, timeout, what)

    async def wait_for_message(
        self,
        predicate: Callable[[Message], bool] = lambda m: True,
        timeout: float = 5.0,
        *,
        channel: Ref | None = None,
        after: Message | int | None = None,
    ) -> Message:
        """First (oldest) live message matching ``predicate``, waiting for it if needed."""
        after_id = ref_id(after) if after is not None else 0
        channel_id = ref_id(channel) if channel is not None else None

        def find() -> Message | None:
            for msg in self.world.messages.values():
                if msg.deleted or msg.id <= after_id or (channel_id is not None and msg.channel_id != channel_id):
                    continue
                if predicate(msg):
                    return msg
            return None

        return await self.wait_until(find, timeout, "a matching message")

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until a bot identified on the gateway and has a live connection."""
        await self.wait_until(
            lambda: self.gateway.connected and self.gateway.identify_count,
            timeout,
            "the bot to identify on the gateway",
        )

    async def wait_for_commands(self, *names: str, guild: Ref | None = None, timeout: float = 10.0) -> None:
        """Wait until the bot synced commands (all of ``names`` if given) to global or ``guild``."""
        scope = ref_id(guild) if guild is not None else None

        def synced() -> bool:
            have = {c.name for c in self.commands.list(scope)}
            return bool(have) and set(names) <= have

        await self.wait_until(synced, timeout, f"command sync {names or ''}")

    # -- fault injection ------------------------------------------------------------------
    def inject_fault(
        self,
        method: str | None,
        path: str,
        *,
        status: int | None = 429,
        count: int | None = 1,
        retry_after: float = 0.05,
        scope: str = "user",
        is_global: bool = False,
        delay: float = 0.0,
    ) -> FaultRule:
        """Fail the next ``count`` requests with ``method`` whose API path (after /api/v10,
        e.g. ``/channels/123/messages``) matches the regex ``path``: 429 with Discord's headers,
        or 500/502/...; ``status=None`` with ``delay`` only slows them down."""
        return self.faults.add(
            method,
            path,
            status=status,
            count=count,
            retry_after=retry_after,
            scope=scope,
            is_global=is_global,
            delay=delay,
        )

    def clear_faults(self) -> None:
        self.faults.clear()

    async def drop_gateway(self, code: int = 4000, *, abrupt: bool = False) -> None:
        """Disconnect the bot with a resumable close code (or abort the TCP connection)."""
        await self.gateway.drop(code, abrupt=abrupt)

    async def wait_resumed(self, count: int = 1, timeout: float = 10.0) -> None:
        await self.wait_until(
            lambda: self.gateway.resume_count >= count and self.gateway.connected,
            timeout,
            f"{count} gateway resume(s)",
        )

    def expire_tokens(self) -> None:
        """Make every interaction token issued so far expire now (webhooks then answer 50027)."""
        now = asyncio.get_running_loop().time()
        for inter in self.world.interactions.values():
            inter.token_expires_at = min(inter.token_expires_at, now)
        self.world.changed()

    # -- payload builders used by the gateway and REST ------------------------------------
    def application_payload(self) -> dict[str, Any]:
        return application_payload(self.world, self.application_id, self.bot_user, self.owner)

    def _shard_guilds(self, session: GatewaySession) -> list[Guild]:
        shard_id, count = session.shard
        return [g for g in self.world.guilds_of(self.bot_user.id) if (g.id >> 22) % count == shard_id]

    def _ready_payload(self, session: GatewaySession) -> dict[str, Any]:
        app = self.application_payload()
        return ready_payload(session, self.bot_user, app, self._shard_guilds(session), self.resume_gateway_url)

    def _guild_payloads(self, session: GatewaySession) -> list[dict[str, Any]]:
        return [guild_payload(g) for g in self._shard_guilds(session)]

    def _members_chunk(self, data: dict[str, Any]) -> dict[str, Any]:
        return members_chunk(self.world, data)

    # -- middleware -----------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        path = request.path
        api_path = None
        for v in API_VERSIONS:
            if path.startswith(f"/api/v{v}/"):
                api_path = path[len(f"/api/v{v}") :]
        if api_path is None:
            return await handler(request)
        shown = redact(api_path)
        rule = self.faults.take(request.method, api_path)
        if rule is not None:
            injected = await self.faults.apply(rule)
            if injected is not None:
                self._record(request, shown, injected.status, fault=True)
                log.info("sandbox: injected %s for %s %s", injected.status, request.method, shown)
                return injected
        try:
            response = await handler(request)
        except errors.ApiError as exc:
            response = error_response(exc)
        except web.HTTPNotFound:
            response = json_response({"message": "404: Not Found", "code": 0}, status=404)
        except web.HTTPMethodNotAllowed:
            response = json_response({"message": "405: Method Not Allowed", "code": 0}, status=405)
        self._record(request, shown, response.status)
        log.debug("%s %s -> %s", request.method, shown, response.status)
        return response

    def _record(self, request: web.Request, path: str, status: int, *, fault: bool = False) -> None:
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        self.requests.append(
            RequestRecord(
                method=request.method,
                path=path,
                status=status,
                at=asyncio.get_running_loop().time(),
                fault=fault,
                client_port=peer[1] if peer else 0,
            )
        )
        self.world.changed()
