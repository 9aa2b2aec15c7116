"""The order jobs run in: priority bands, fair sharing between users inside a band, aging, caps.

A pure, synchronous data structure (no asyncio, no database): ``bot.queue.scheduler`` owns one and
does the I/O around it.

Order
-----
* **Servers.** Servers share the GPU fairly first, whatever their bands: the next job comes from the
  server with the smallest virtual start ``S_g = max(V, F_g)``, where ``V`` is the start of the last
  server served and ``F_g = S_g + cost`` of the server's last served job (start-time fair queuing
  at dequeue, so it composes with the order inside each server). A server's moderators and
  priority roles therefore go first in their own server only: no server, however many members or
  moderators it has, can starve another. Jobs from DMs count as one server (``guild_id`` None).
  A paused server's jobs stay in line but are not handed out (``pause_server``); they are ranked
  after every other job.
* **Bands** (inside a server). A lower band number runs first (0: moderators and priority roles,
  1: everyone).
* **Start-time fair queuing (SFQ) inside a band.** Every band keeps a virtual time ``V`` and
  every user a last finish tag ``F[user]``. A pushed job gets the start tag
  ``S = max(V, F[user])`` and moves the user's tag to ``F[user] = S + cost / weight``. Jobs run in
  increasing ``S`` (ties: push order); popping a job sets ``V`` to its ``S``. So a user's burst is
  spread out on their own virtual clock, weighted by cost, and never blocks anyone else: for two
  users with work queued the whole time, the units served to each differ by at most the larger of
  their biggest job costs (the SFQ bound; checked by the property tests).
* **Aging.** A job that has waited ``aging_seconds`` is promoted one band (another band per further
  ``aging_seconds``, down to band 0), where it enters that band's SFQ as a new arrival. Nothing
  starves: once in band 0 it is served after at most the jobs already tagged at or before ``V``.
* **Front.** ``push(entry, front=True)`` puts a job ahead of every non-front job of its band (and
  of the other servers' non-front jobs); it is used for jobs that already waited their turn and
  were interrupted, e.g. by an engine crash. Front jobs are not charged to the user's or the
  server's virtual clock a second time.
* Removing a job (``remove``, or the move out of a band on promotion) gives its virtual time back:
  the same user's later jobs in that band move up by its cost, so a cancelled job costs nothing.

Caps
----
``per_user_cap`` bounds one user's queued jobs, ``global_cap`` the whole queue; ``push`` raises
``QueueFull`` with ``reason`` ``"user_cap"`` or ``"global_cap"`` and a sentence for the user.

Batching rule (``pop_batch``)
-----------------------------
The head job (what ``pop`` returns) is always first. After it, walking the current pop order and
never leaving the head's server and band, a job with the head's shape key (None never matches)
that still fits the batch (``size``: the sizes add up to at most ``max_n``) joins it when either

1. every job between it and the head joined too (it would be popped next anyway), or
2. it belongs to the head's owner, is not a front job, and its start tag is within one *quantum*
   of the head's (``S <= S_head + quantum``; quantum = the largest ``cost / weight`` now queued in
   the band, at least the head's own).

So a batch only pulls ahead work its owner would have been served within the SFQ fairness bound;
pulled-ahead jobs keep their place on the owner's virtual clock and do not advance ``V``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bot.errors import CapReason, QueueFull

__all__ = ["CapReason", "FairQueue", "QueueEntry", "QueueFull"]

MIN_TAG_COST = 0.01
"""Smallest cost used for virtual-clock tags, so a burst of free jobs is still interleaved."""


@dataclass(eq=False)
class QueueEntry:
    """One queued job. ``payload`` is carried along untouched (the scheduler puts the job record
    there). ``enqueued_at`` (on the queue's clock) is set by ``push`` when left None; pass an
    earlier value to credit time already waited (e.g. before a restart)."""

    job_id: str
    owner_id: int
    cost: float
    band: int = 1
    weight: float = 1.0
    enqueued_at: float | None = None
    payload: Any = field(default=None, repr=False)
    guild_id: int | None = None
    # What decides batching (``pop_batch`` by the scheduler): jobs of equal, non-None shapes may
    # run as one batched call, and `size` is what the job adds to it (its images).
    shape: Hashable | None = None
    size: int = 1


@dataclass(eq=False)
class _Item:
    entry: QueueEntry
    seq: int
    enqueued_at: float
    front: bool
    band: int = 0  # the band whose virtual clock `start`/`finish` belong to (the effective band)
    start: float = 0.0
    finish: float = 0.0

    @property
    def owner(self) -> int:
        return self.entry.owner_id

    @property
    def server(self) -> int | None:
        return self.entry.guild_id

    def sort_key(self) -> tuple[int, int, float, int]:
        """The order inside one server."""
        return (self.band, 0 if self.front else 1, self.start, self.seq)


@dataclass
class _Band:
    vtime: float = 0.0
    last_finish: dict[int, float] = field(default_factory=dict)


@dataclass
class _Servers:
    """The servers' shares: virtual time and each server's finish tag (see "Servers" above)."""

    vtime: float = 0.0
    last_finish: dict[int | None, float] = field(default_factory=dict)

    def start(self, server: int | None, vtime: float | None = None) -> float:
        now = self.vtime if vtime is None else vtime
        return max(now, self.last_finish.get(server, now))


class FairQueue:
    """See the module docstring. ``clock`` (seconds, monotonic) drives aging only."""

    def __init__(
        self,
        *,
        per_user_cap: int | None = None,
        global_cap: int | None = None,
        aging_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_user_cap = per_user_cap
        self.global_cap = global_cap
        self.aging_seconds = aging_seconds
        self._clock = clock
        self._items: dict[str, _Item] = {}
        self._bands: dict[tuple[int | None, int], _Band] = {}  # (server, band)
        self._servers = _Servers()
        self._paused: set[int | None] = set()
        self._per_user: Counter[int] = Counter()
        self._seq = itertools.count()
        # The pop order is asked for far more often than it changes (every queue card, position
        # and ETA reads it): it is kept until a job is attached, detached or taken. Aging only
        # changes it when some job reaches its next band, so `_age` skips until then.
        self._order_cache: list[_Item] | None = None
        # Each job's (position, units queued ahead of it) in that order, built on the first
        # question after a change: a burst's cards and ETAs then cost one walk, not one each.
        self._places: dict[str, tuple[int, float]] = {}
        self._places_of: list[_Item] | None = None
        self._next_aging = math.inf

    # ------------------------------------------------------------------ admission
    def check(self, owner_id: int, *, extra_user: int = 0, extra_global: int = 0) -> None:
        """Raise ``QueueFull`` if one more job of ``owner_id`` would break a cap. ``extra_*`` count
        jobs the queue does not hold but the caller wants counted (e.g. running ones)."""
        if self.per_user_cap is not None and self._per_user[owner_id] + extra_user >= self.per_user_cap:
            raise QueueFull("user_cap", limit=self.per_user_cap)
        if self.global_cap is not None and len(self._items) + extra_global >= self.global_cap:
            raise QueueFull("global_cap", limit=self.global_cap)

    def push(self, entry: QueueEntry, *, front: bool = False, enforce_caps: bool = True, placed: bool = True) -> int:
        """Queue a job; returns its position (1-based; 0 without ``placed``, which spares a
        caller that does not read it, e.g. a burst of pushes, rebuilding the order for each).
        Raises ``QueueFull`` (when ``enforce_caps``) or ``ValueError`` for a job id already queued."""
        if entry.job_id in self._items:
            raise ValueError(f"job {entry.job_id} is already queued")
        if entry.cost < 0 or not math.isfinite(entry.cost) or entry.weight <= 0 or entry.band < 0:
            raise ValueError(f"job {entry.job_id}: cost must be >= 0, weight > 0 and band >= 0")
        if enforce_caps:
            self.check(entry.owner_id)
        now = self._clock()
        if entry.enqueued_at is None:
            entry.enqueued_at = now
        item = _Item(entry, next(self._seq), entry.enqueued_at, front)
        self._attach(item, self._effective_band(item, now))
        self._next_aging = min(self._next_aging, self._next_promotion(item, now))
        self._items[entry.job_id] = item
        self._per_user[entry.owner_id] += 1
        return (self.position(entry.job_id) or 0) if placed else 0

    # ------------------------------------------------------------------ taking work
    def pop(self) -> QueueEntry | None:
        """The next job to run, or None when empty (or every queued job's server is paused)."""
        order = self._order()
        if not order or order[0].server in self._paused:
            return None
        head = order[0]
        self._take(head, advance=True)
        return head.entry

    # ------------------------------------------------------------------ pausing servers
    def pause_server(self, guild_id: int | None) -> None:
        """Keep a server's jobs in line without handing any out (its moderators paused it)."""
        self._paused.add(guild_id)
        self._order_cache = None

    def resume_server(self, guild_id: int | None) -> None:
        self._paused.discard(guild_id)
        self._order_cache = None

    def set_paused_servers(self, guild_ids: Iterable[int | None]) -> None:
        self._paused = set(guild_ids)
        self._order_cache = None

    def is_paused(self, guild_id: int | None) -> bool:
        return guild_id in self._paused

    def pop_batch(
        self,
        max_n: int,
        key: Callable[[QueueEntry], Hashable | None],
        size: Callable[[QueueEntry], int] = lambda entry: 1,
    ) -> list[QueueEntry]:
        """The head job plus jobs with the same ``key`` (not None) whose ``size`` adds up to at
        most ``max_n`` (the head always comes, whatever its size), chosen by the rule in the module
        docstring. Empty list when the queue is empty."""
        order = self._order()
        if not order or max_n < 1:
            return []
        head = order[0]
        if head.server in self._paused:
            return []
        head_key = key(head.entry)
        batch, advance = [head], [True]
        room = max_n - size(head.entry)
        band = [i for i in order if i.band == head.band and i.server == head.server] if head_key is not None else []
        quantum = max((self._tag_cost(i) for i in band), default=0.0)
        contiguous = True
        for item in band[1:]:
            if room <= 0:
                break
            fits = size(item.entry) <= room
            same_shape = fits and key(item.entry) == head_key
            if contiguous and same_shape:
                batch.append(item)
                advance.append(True)
                room -= size(item.entry)
                continue
            contiguous = False
            if same_shape and item.owner == head.owner and not item.front and item.start <= head.start + quantum:
                batch.append(item)
                advance.append(False)
                room -= size(item.entry)
        for item, adv in zip(batch, advance, strict=True):
            self._take(item, advance=adv)
        return [i.entry for i in batch]

    def remove(self, job_id: str) -> QueueEntry | None:
        """Take a job out (cancel); its virtual time is given back to its owner. None if absent."""
        item = self._items.pop(job_id, None)
        if item is None:
            return None
        self._detach(item)
        self._forget(item)
        return item.entry

    # ------------------------------------------------------------------ queries
    def position(self, job_id: str) -> int | None:
        """1-based place in the order ``pop`` would give right now; None if not queued."""
        place = self.place(job_id)
        return None if place is None else place[0]

    def place(self, job_id: str) -> tuple[int, float] | None:
        """(position, the cost of every job ahead of it) in the order ``pop`` would give right
        now; None if not queued."""
        if job_id not in self._items:
            return None
        order = self._order()
        if self._places_of is not order:
            places: dict[str, tuple[int, float]] = {}
            ahead = 0.0
            for index, item in enumerate(order, start=1):
                places[item.entry.job_id] = (index, ahead)
                ahead += item.entry.cost
            self._places, self._places_of = places, order
        return self._places.get(job_id)

    def snapshot(self) -> list[QueueEntry]:
        """Every queued job, in pop order."""
        return [item.entry for item in self._order()]

    def ranked(self) -> list[tuple[QueueEntry, int]]:
        """Every queued job with the band it is served in now, in pop order."""
        return [(item.entry, item.band) for item in self._order()]

    def get(self, job_id: str) -> QueueEntry | None:
        item = self._items.get(job_id)
        return None if item is None else item.entry

    def effective_band(self, job_id: str) -> int | None:
        """The band a job is served in now (its own band, or better once aged)."""
        self._age()
        item = self._items.get(job_id)
        return None if item is None else item.band

    def depth_by_band(self, guild_id: int | None = None, *, every_server: bool = True) -> dict[int, int]:
        """Queued jobs per effective band, of one server unless ``every_server``."""
        self._age()
        items = [i for i in self._items.values() if every_server or i.server == guild_id]
        return dict(sorted(Counter(item.band for item in items).items()))

    def count_for(self, owner_id: int) -> int:
        return self._per_user[owner_id]

    def user_counts(self) -> dict[int, int]:
        return {user: n for user, n in self._per_user.items() if n}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._items

    # ------------------------------------------------------------------ internals
    def _order(self) -> list[_Item]:
        """The pop order (shared: callers must not change the list)."""
        self._age()
        if self._order_cache is None:
            self._order_cache = self._merge_servers()
        return self._order_cache

    def _merge_servers(self) -> list[_Item]:
        """The order ``pop`` would hand jobs out in: each server's own order (front, band, the
        members' fair shares), merged by the servers' fair shares as ``_take`` advances them.
        Paused servers' jobs come last."""
        lines: dict[int | None, list[_Item]] = {}
        for item in sorted(self._items.values(), key=_Item.sort_key):
            lines.setdefault(item.server, []).append(item)
        vtime, finish = self._servers.vtime, dict(self._servers.last_finish)
        heap: list[tuple[int, float, int, int | None]] = []
        nexts: dict[int | None, int] = {}

        def offer(server: int | None) -> None:
            head = lines[server][nexts[server]]
            start = max(vtime, finish.get(server, vtime))
            heapq.heappush(heap, (0 if head.front else 1, start, head.seq, server))

        for server in lines:
            if server not in self._paused:
                nexts[server] = 0
                offer(server)
        order: list[_Item] = []
        while heap:
            front, start, _, server = heapq.heappop(heap)
            head = lines[server][nexts[server]]
            true_start = max(vtime, finish.get(server, vtime))
            if not head.front and true_start > start:
                # V moved on since this server was offered: it competes at its true start now.
                heapq.heappush(heap, (front, true_start, head.seq, server))
                continue
            order.append(head)
            if not head.front:
                vtime = max(vtime, true_start)
                finish[server] = true_start + self._tag_cost(head)
            nexts[server] += 1
            if nexts[server] < len(lines[server]):
                offer(server)
        for server, line in lines.items():
            if server in self._paused:
                order.extend(line)
        return order

    def _effective_band(self, item: _Item, now: float) -> int:
        band = item.entry.band
        if not self.aging_seconds or band == 0:
            return band
        waited = max(0.0, now - item.enqueued_at)
        return max(0, band - int(waited // self.aging_seconds))

    def _next_promotion(self, item: _Item, now: float) -> float:
        """When the job's effective band next drops (infinity when it never will)."""
        if not self.aging_seconds or item.band == 0:
            return math.inf
        periods = max(0.0, now - item.enqueued_at) // self.aging_seconds
        return item.enqueued_at + (periods + 1) * self.aging_seconds

    def _age(self) -> None:
        if not self.aging_seconds:
            return
        now = self._clock()
        if now < self._next_aging:
            return
        next_aging = math.inf
        for item in self._items.values():
            target = self._effective_band(item, now)
            if target < item.band:
                self._detach(item)
                self._attach(item, target)
            next_aging = min(next_aging, self._next_promotion(item, now))
        self._next_aging = next_aging

    @staticmethod
    def _tag_cost(item: _Item) -> float:
        return max(item.entry.cost, MIN_TAG_COST) / item.entry.weight

    def _attach(self, item: _Item, band_no: int) -> None:
        self._order_cache = None
        band = self._bands.setdefault((item.server, band_no), _Band())
        item.band = band_no
        if item.front:
            item.start = item.finish = band.vtime
            return
        item.start = max(band.vtime, band.last_finish.get(item.owner, band.vtime))
        item.finish = item.start + self._tag_cost(item)
        band.last_finish[item.owner] = item.finish

    def _detach(self, item: _Item) -> None:
        """Undo `_attach`'s charge: shift the owner's later jobs in the band up by this job's cost."""
        self._order_cache = None
        if item.front:
            return
        band = self._bands[(item.server, item.band)]
        later = sorted(
            (
                i
                for i in self._items.values()
                if i is not item
                and i.band == item.band
                and i.server == item.server
                and i.owner == item.owner
                and not i.front
                and i.start >= item.start
            ),
            key=_Item.sort_key,
        )
        delta = item.finish - item.start
        prev_finish = item.start
        for other in later:
            length = other.finish - other.start
            other.start = max(prev_finish, other.start - delta, band.vtime)
            other.finish = other.start + length
            prev_finish = other.finish
        if later:
            band.last_finish[item.owner] = prev_finish
        elif band.last_finish.get(item.owner) == item.finish:
            band.last_finish[item.owner] = item.start

    def _take(self, item: _Item, *, advance: bool) -> None:
        self._order_cache = None
        del self._items[item.entry.job_id]
        self._forget(item)
        if advance and not item.front:
            servers = self._servers
            start = servers.start(item.server)
            servers.vtime = start
            servers.last_finish[item.server] = start + self._tag_cost(item)
            for server in [g for g, f in servers.last_finish.items() if f <= servers.vtime]:
                del servers.last_finish[server]
        band = self._bands[(item.server, item.band)]
        if advance and item.start > band.vtime:
            band.vtime = item.start
            # A finish tag at or behind V means the same as no tag: drop it to stay small.
            for owner in [o for o, f in band.last_finish.items() if f <= band.vtime]:
                del band.last_finish[owner]

    def _forget(self, item: _Item) -> None:
        self._per_user[item.owner] -= 1
        if self._per_user[item.owner] <= 0:
            del self._per_user[item.owner]
