"""The gateway websocket: HELLO, heartbeats, IDENTIFY/READY, RESUME with replay, dispatches.

Sessions outlive connections, as on Discord: events dispatched while the bot is disconnected
are kept in the session log and replayed after a RESUME. ``drop()`` closes connections with a
resumable close code so tests can check that the bot resumes and keeps receiving interactions.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from .tuning import PRIVILEGED_INTENTS, SandboxSettings
from .world import World

log = logging.getLogger(__name__)

DISPATCH = 0
HEARTBEAT = 1
IDENTIFY = 2
PRESENCE_UPDATE = 3
VOICE_STATE_UPDATE = 4
RESUME = 6
RECONNECT = 7
REQUEST_GUILD_MEMBERS = 8
INVALID_SESSION = 9
HELLO = 10
HEARTBEAT_ACK = 11
HEARTBEAT_ACK_DELAY = 0.2  # seconds

GUILDS = 1 << 0
GUILD_MEMBERS = 1 << 1
GUILD_PRESENCES = 1 << 8
GUILD_MESSAGES = 1 << 9
DIRECT_MESSAGES = 1 << 12
MESSAGE_CONTENT = 1 << 15

LOG_SIZE = 2000

EVENT_INTENTS = {
    "GUILD_CREATE": GUILDS,
    "GUILD_UPDATE": GUILDS,
    "GUILD_DELETE": GUILDS,
    "GUILD_ROLE_CREATE": GUILDS,
    "GUILD_ROLE_UPDATE": GUILDS,
    "GUILD_ROLE_DELETE": GUILDS,
    "CHANNEL_CREATE": GUILDS,
    "CHANNEL_UPDATE": GUILDS,
    "CHANNEL_DELETE": GUILDS,
    "GUILD_MEMBER_ADD": GUILD_MEMBERS,
    "GUILD_MEMBER_UPDATE": GUILD_MEMBERS,
    "GUILD_MEMBER_REMOVE": GUILD_MEMBERS,
}
MESSAGE_EVENTS = ("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE")


@dataclass
class GatewaySession:
    id: str
    shard: tuple[int, int]
    intents: int
    seq: int = 0
    log: deque[tuple[int, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=LOG_SIZE))
    connection: GatewayConnection | None = None
    valid: bool = True


class GatewayConnection:
    """One websocket; a writer task sends queued frames in order (zlib-stream if requested)."""

    def __init__(
        self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None, *, compress: bool, path: str
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.path = path
        self.session: GatewaySession | None = None
        self._zlib = zlib.compressobj() if compress else None
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(), name="sandbox-gateway-writer")

    def send(self, payload: dict[str, Any]) -> None:
        self._queue.put_nowait(payload)

    async def _write_loop(self) -> None:
        while True:
            payload = await self._queue.get()
            if payload is None or self.ws.closed:
                return
            text = json.dumps(payload, separators=(",", ":"))
            try:
                if self._zlib is not None:
                    data = self._zlib.compress(text.encode()) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                return  # the peer went away; undelivered events stay in the session log

    async def stop(self) -> None:
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(self._writer, timeout=1)
        except (TimeoutError, asyncio.CancelledError):
            self._writer.cancel()


class Gateway:
    """Gateway server for one bot token. Builders supply READY/GUILD_CREATE payloads."""

    def __init__(
        self,
        world: World,
        *,
        token: Callable[[], str],
        ready_payload: Callable[[GatewaySession], dict[str, Any]],
        guild_payloads: Callable[[GatewaySession], list[dict[str, Any]]],
        members_chunk: Callable[[dict[str, Any]], dict[str, Any]],
        settings: SandboxSettings,
    ) -> None:
        self._world = world
        self._token = token
        self._ready_payload = ready_payload
        self._guild_payloads = guild_payloads
        self._members_chunk = members_chunk
        self._settings = settings
        self.sessions: dict[str, GatewaySession] = {}
        self.connections: list[GatewayConnection] = []
        self.identify_count = 0
        self.resume_count = 0
        self.heartbeat_count = 0
        self.connect_paths: list[str] = []

    # -- public ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return any(c.session is not None and not c.ws.closed for c in self.connections)

    def live_sessions(self) -> list[GatewaySession]:
        """The newest valid session per shard (older ones were replaced by a new IDENTIFY)."""
        newest: dict[int, GatewaySession] = {}
        for session in self.sessions.values():
            if session.valid:
                newest[session.shard[0]] = session
        return list(newest.values())

    def dispatch(self, event: str, data: dict[str, Any], *, guild_id: int | None = None) -> int:
        """Send a DISPATCH to the sessions that should get it; returns how many did."""
        delivered = 0
        for session in self.live_sessions():
            shard_id, shard_count = session.shard
            target = ((guild_id >> 22) % shard_count) if guild_id is not None else 0
            if target != shard_id:
                continue
            body = self._filter_for(session, event, data, guild_id)
            if body is None:
                continue
            self._send_dispatch(session, event, body)
            delivered += 1
        return delivered

    async def drop(self, code: int = 4000, *, abrupt: bool = False) -> None:
        """Close every connection (sessions survive, so the client can RESUME)."""
        for conn in list(self.connections):
            if abrupt and conn.transport is not None:
                conn.transport.abort()  # like a network failure: no close frame at all
            else:
                await conn.ws.close(code=code, message=b"sandbox: connection dropped")
        self._world.changed()

    def request_reconnect(self) -> None:
        """Op 7: ask the client to reconnect and resume."""
        for conn in self.connections:
            conn.send({"op": RECONNECT, "d": None, "s": None, "t": None})

    def invalidate_sessions(self, *, resumable: bool = False) -> None:
        """Op 9: invalidate sessions; with ``resumable=False`` the client must IDENTIFY again."""
        for conn in self.connections:
            if conn.session is not None and not resumable:
                conn.session.valid = False
            conn.send({"op": INVALID_SESSION, "d": resumable, "s": None, "t": None})

    async def close(self) -> None:
        for conn in list(self.connections):
            await conn.ws.close(code=1001, message=b"sandbox stopping")

    # -- websocket handler ----------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        version = request.query.get("v", "10")
        compress = request.query.get("compress") == "zlib-stream"
        conn = GatewayConnection(ws, request.transport, compress=compress, path=request.path)
        self.connections.append(conn)
        self.connect_paths.append(request.path)
        log.debug("gateway connection on %s (compress=%s)", request.path, compress)
        if version not in ("9", "10"):
            await ws.close(code=4012, message=b"Invalid API version")
            return ws
        if request.query.get("encoding", "json") != "json":
            await ws.close(code=4002, message=b"Error while decoding payload.")
            return ws
        interval_ms = int(self._settings.heartbeat_interval * 1000)
        conn.send({"op": HELLO, "d": {"heartbeat_interval": interval_ms}, "s": None, "t": None})
        try:
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                try:
                    payload = json.loads(msg.data)
                    op = payload["op"]
                except (ValueError, KeyError, TypeError):
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
                await self._on_op(conn, op, payload.get("d"))
        finally:
            await conn.stop()
            if conn in self.connections:
                self.connections.remove(conn)
            if conn.session is not None and conn.session.connection is conn:
                conn.session.connection = None
            self._world.changed()
            log.debug("gateway connection closed (code %s)", ws.close_code)
        return ws

    async def _on_op(self, conn: GatewayConnection, op: int, data: Any) -> None:
        if op == HEARTBEAT:
            self.heartbeat_count += 1
            # Acked after a short delay, like over a real network: discord.py's heartbeat thread
            # records the send time only after the send completes, so an instant local ACK can
            # arrive first and log "Can't keep up, websocket is 41.3s behind".
            ack = {"op": HEARTBEAT_ACK, "d": None, "s": None, "t": None}
            delay = min(HEARTBEAT_ACK_DELAY, self._settings.heartbeat_interval / 4)
            asyncio.get_running_loop().call_later(delay, conn.send, ack)
            self._world.changed()
        elif op == IDENTIFY:
            await self._identify(conn, data or {})
        elif op == RESUME:
            await self._resume(conn, data or {})
        elif conn.session is None:
            await conn.ws.close(code=4003, message=b"Not authenticated.")
        elif op == REQUEST_GUILD_MEMBERS:
            self._send_dispatch(conn.session, "GUILD_MEMBERS_CHUNK", self._members_chunk(data or {}))
        elif op in (PRESENCE_UPDATE, VOICE_STATE_UPDATE):
            pass
        else:
            await conn.ws.close(code=4001, message=b"Unknown opcode.")

    async def _identify(self, conn: GatewayConnection, data: dict[str, Any]) -> None:
        if conn.session is not None:
            await conn.ws.close(code=4005, message=b"Already authenticated.")
            return
        if data.get("token") != self._token():
            log.warning("gateway: IDENTIFY with a wrong token, closing with 4004")
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        intents = data.get("intents")
        if not isinstance(intents, int) or intents < 0 or intents >= 1 << 26:
            await conn.ws.close(code=4013, message=b"Invalid intent(s).")
            return
        if intents & PRIVILEGED_INTENTS & ~self._settings.allowed_intents:
            await conn.ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        shard = data.get("shard") or [0, 1]
        session = GatewaySession(id=secrets.token_hex(16), shard=(int(shard[0]), int(shard[1])), intents=intents)
        # A new IDENTIFY for the same shard replaces the old session.
        for old in self.sessions.values():
            if old.shard[0] == session.shard[0]:
                old.valid = False
        self.sessions[session.id] = session
        session.connection = conn
        conn.session = session
        self.identify_count += 1
        self._send_dispatch(session, "READY", self._ready_payload(session))
        if intents & GUILDS:
            for guild in self._guild_payloads(session):
                self._send_dispatch(session, "GUILD_CREATE", guild)
        log.info("gateway: bot identified (session %s…, intents %d)", session.id[:6], intents)
        self._world.changed()

    async def _resume(self, conn: GatewayConnection, data: dict[str, Any]) -> None:
        if data.get("token") != self._token():
            await conn.ws.close(code=4004, message=b"Authentication failed.")
            return
        session = self.sessions.get(str(data.get("session_id")))
        seq = data.get("seq") or 0
        if session is None or not session.valid or seq > session.seq:
            conn.send({"op": INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        previous = session.connection
        session.connection = conn
        conn.session = session
        if previous is not None and previous is not conn:
            previous.session = None
            await previous.ws.close(code=4000, message=b"Session resumed elsewhere")
        replay = [payload for s, payload in session.log if s > seq and payload["t"] not in ("READY", "RESUMED")]
        for payload in replay:
            conn.send(payload)
        self.resume_count += 1
        self._send_dispatch(session, "RESUMED", {"_trace": ["sandbox"]})
        log.info("gateway: session resumed, replayed %d event(s)", len(replay))
        self._world.changed()

    # -- helpers ----------------------------------------------------------------------------
    def _send_dispatch(self, session: GatewaySession, event: str, data: dict[str, Any]) -> None:
        session.seq += 1
        payload = {"op": DISPATCH, "t": event, "s": session.seq, "d": data}
        session.log.append((session.seq, payload))
        if session.connection is not None:
            session.connection.send(payload)

    def _filter_for(
        self, session: GatewaySession, event: str, data: dict[str, Any], guild_id: int | None
    ) -> dict[str, Any] | None:
        """Apply intents the way Discord does; None means "this session does not get it"."""
        needed = EVENT_INTENTS.get(event)
        if needed is not None and not session.intents & needed:
            return None
        if event not in MESSAGE_EVENTS:
            return data
        if not session.intents & (GUILD_MESSAGES if guild_id is not None else DIRECT_MESSAGES):
            return None
        if event == "MESSAGE_DELETE" or session.intents & MESSAGE_CONTENT or guild_id is None:
            return data
        bot = self._world.bot_user
        author = (data.get("author") or {}).get("id")
        mentioned = any(m.get("id") == str(bot.id) for m in data.get("mentions") or []) if bot else False
        if bot is not None and (author == str(bot.id) or mentioned):
            return data
        stripped = copy.deepcopy(data)
        for key, empty in (("content", ""), ("embeds", []), ("attachments", []), ("components", [])):
            if key in stripped:
                stripped[key] = empty
        return stripped
