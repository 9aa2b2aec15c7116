"""PostgreSQL coordination between several bot processes sharing one database.

Three primitives, all plain PostgreSQL features (no broker):

* **Notices** (``LISTEN/NOTIFY`` on ``CHANNEL``): every job state change written by a ``JobStore``
  built with a ``NoticeSender`` sends a ``JobNotice`` *inside the same transaction*, so PostgreSQL
  delivers it exactly when (and only if) the change commits. Listeners therefore never see a
  notice for a state they cannot read yet. Notices are hints, not the truth: a listener that was
  disconnected misses them and must re-read the table (``NoticeListener`` calls ``on_reconnect``).
* **The dispatcher lock** (``DispatcherLock``): a session-level advisory lock on a dedicated
  connection. Whoever holds it dispatches to the engine; when that process dies its session ends,
  PostgreSQL releases the lock, and the next ``try_acquire`` elsewhere succeeds.
* **Claims**: ``JobStore.claim`` (``SELECT … FOR UPDATE SKIP LOCKED`` on a queued row), so even two
  overlapping dispatchers can never both start one job.

Only this module talks to asyncpg directly: LISTEN and advisory locks live on one connection for
a long time, which a SQLAlchemy pool (which recycles and pre-pings connections) must not own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

__all__ = [
    "CHANNEL",
    "DispatcherLock",
    "JobNotice",
    "NoticeListener",
    "NoticeSender",
    "lock_key",
    "raw_dsn",
]

log = logging.getLogger(__name__)

CHANNEL = "atelier_jobs"
NOTICE_EVENTS = frozenset(
    {
        "queued",  # a job was enqueued or went back to the queue
        "running",  # a dispatcher claimed it
        "done",
        "failed",
        "cancelled",
        "card",  # its status message (queue card) is known: message_id
        "cancel",  # please cancel it (sent to the dispatcher by another process)
        "pause",
        "resume",
        "released",  # the dispatcher lock was released on purpose: try to take it now
    }
)


def raw_dsn(url: str) -> str:
    """The libpq-style DSN asyncpg wants, from a ``postgresql+asyncpg://`` URL."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def lock_key(name: str) -> int:
    """A stable 63-bit advisory lock key for ``name`` (Python's ``hash`` is salted per process)."""
    return zlib.crc32(f"atelier:{name}".encode()) | (0x4174 << 32)


@dataclass(frozen=True)
class JobNotice:
    event: str
    job_id: str | None
    origin: str
    """The sending process (``NoticeSender.origin``), so a process can skip its own notices."""
    message_id: int | None = None

    def encode(self) -> str:
        body: dict[str, Any] = {"e": self.event, "o": self.origin}
        if self.job_id is not None:
            body["j"] = self.job_id
        if self.message_id is not None:
            body["m"] = self.message_id
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def decode(cls, payload: str) -> JobNotice | None:
        try:
            body = json.loads(payload)
            event = str(body["e"])
            message_id = body.get("m")
            notice = cls(event, body.get("j"), str(body.get("o", "")), int(message_id) if message_id else None)
        except (ValueError, KeyError, TypeError):
            return None
        return notice if notice.event in NOTICE_EVENTS else None


class NoticeSender:
    """Sends ``JobNotice`` s on ``CHANNEL``; ``origin`` names this process."""

    def __init__(self, origin: str | None = None, channel: str = CHANNEL) -> None:
        self.origin = origin or secrets.token_hex(6)
        self.channel = channel

    async def in_session(
        self, session: AsyncSession, event: str, job_id: str | None, *, message_id: int | None = None
    ) -> None:
        """Queue a notice in ``session``'s transaction: delivered at its commit, dropped on rollback."""
        payload = JobNotice(event, job_id, self.origin, message_id).encode()
        await session.execute(
            text("SELECT pg_notify(:channel, :payload)"), {"channel": self.channel, "payload": payload}
        )


NoticeHandler = Callable[[JobNotice], object]


class NoticeListener:
    """A dedicated connection LISTENing on the channel; reconnects with a short backoff.

    ``handler`` is called (from the event loop) for every well-formed notice, own ones included.
    ``on_reconnect`` (a coroutine function) runs after every reconnection, because notices sent
    while the connection was down are lost for good."""

    def __init__(
        self,
        url: str,
        handler: NoticeHandler,
        *,
        channel: str = CHANNEL,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
        retry_seconds: float = 1.0,
    ) -> None:
        self._dsn = raw_dsn(url)
        self._handler = handler
        self._channel = channel
        self._on_reconnect = on_reconnect
        self._retry = retry_seconds
        self._conn: Any = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.received = 0

    async def start(self) -> None:
        """Connect and LISTEN (raises if the first connection fails), then keep it up."""
        await self._connect()
        self._task = asyncio.create_task(self._keep_alive(), name="atelier-notice-listener")

    async def _connect(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(self._dsn)
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        await conn.add_listener(self._channel, self._on_notify)
        self._conn = conn
        self._ready.set()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        notice = JobNotice.decode(payload)
        if notice is None:
            log.warning("ignored a malformed notice on %s: %.200s", self._channel, payload)
            return
        self.received += 1
        try:
            self._handler(notice)
        except Exception:
            log.exception("notice handler failed on %s", notice)

    async def _keep_alive(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("lost the LISTEN connection; reconnecting")
            self._ready.clear()
            while True:
                await asyncio.sleep(self._retry)
                try:
                    await self._connect()
                    break
                except Exception as exc:  # asyncpg raises many kinds (OSError, its own errors)
                    log.warning("LISTEN reconnect failed: %s", exc)
            if self._on_reconnect is not None:
                try:
                    await self._on_reconnect()
                except Exception:
                    log.exception("re-reading the queue after a reconnect failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=2)
        self._conn = None


class DispatcherLock:
    """A session-level advisory lock held on its own connection.

    ``try_acquire`` never waits. ``held`` turns False as soon as the connection is seen to be gone
    (``on_lost`` is then called once): the server has released the lock and another process may
    take it, so the caller must stop dispatching at once."""

    def __init__(self, url: str, name: str = "dispatcher", *, on_lost: Callable[[], object] | None = None) -> None:
        self._dsn = raw_dsn(url)
        self.key = lock_key(name)
        self._on_lost = on_lost
        self._conn: Any = None
        self.held = False

    async def try_acquire(self) -> bool:
        import asyncpg

        if self.held:
            return True
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self._dsn)
            self._conn.add_termination_listener(self._terminated)
        got = bool(await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key))
        self.held = got
        return got

    async def check(self) -> bool:
        """Whether the lock is still held (a round trip on its connection)."""
        if not self.held or self._conn is None:
            return False
        try:
            await asyncio.wait_for(self._conn.fetchval("SELECT 1"), 5)
        except Exception:
            log.error("the dispatcher lock connection does not answer; giving the lock up")
            self._terminated(self._conn)
            with contextlib.suppress(Exception):
                self._conn.terminate()
        return self.held

    def _terminated(self, _conn: Any) -> None:
        if self.held:
            self.held = False
            log.error("lost the dispatcher lock (its database connection ended)")
            if self._on_lost is not None:
                self._on_lost()

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        was_held, self.held = self.held, False
        if conn is None or conn.is_closed():
            return
        try:
            if was_held:
                await conn.fetchval("SELECT pg_advisory_unlock($1)", self.key)
            await conn.close(timeout=2)
        except Exception:
            conn.terminate()
