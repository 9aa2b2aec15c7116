"""Group commit for admissions: the enqueues that arrive together share ONE durable transaction.

Each admission (a quota reservation and its job row, ``JobStore.enqueue``) waits in a queue; a
drain task takes everything waiting (up to ``MAX_GROUP``) and runs it as one transaction, then
answers every caller once it is committed, so an accepted job is on disk before its caller goes
on (posts its queue card). While one group commits, the next gathers: under a burst the groups
grow and the per-admission cost shrinks (one BEGIN/COMMIT, a few statements for the whole group,
see db.reservations); alone, an admission is a group of one.

Each request is still decided on its own against its member's remaining allowance
(``QuotaStore.reserve_many_in``), so quotas stay exact. A group whose transaction fails (a
duplicate job id, a lost connection) is run again one admission at a time, so one bad request
fails alone and the others are admitted as if it had never been there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

# A group's size bound: a huge burst becomes a few transactions, none holding the write lock long.
MAX_GROUP = 256

T = TypeVar("T")
O = TypeVar("O")  # noqa: E741 - the outcome type


@dataclass(eq=False)
class _Waiting(Generic[T, O]):
    item: T
    future: asyncio.Future[O] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class GroupCommit(Generic[T, O]):
    """Runs ``commit(items) -> outcomes`` (one transaction, one outcome per item, in order) for
    the items submitted together (see the module docstring)."""

    def __init__(self, commit: Callable[[Sequence[T]], Awaitable[Sequence[O]]], *, max_group: int = MAX_GROUP) -> None:
        self._commit = commit
        self._max_group = max_group
        self._pending: list[_Waiting[T, O]] = []
        self._task: asyncio.Task[None] | None = None
        self.groups = 0  # transactions run, and the items they held (for the bench)
        self.items = 0

    async def submit(self, item: T) -> O:
        waiting: _Waiting[T, O] = _Waiting(item)
        self._pending.append(waiting)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="atelier-group-commit")
        return await waiting.future

    async def _drain(self) -> None:
        group: list[_Waiting[T, O]] = []
        try:
            await asyncio.sleep(0)  # the admissions of this loop turn join the first group
            while self._pending:
                group, self._pending = self._pending[: self._max_group], self._pending[self._max_group :]
                await self._run(group)
                group = []
        except BaseException:
            # Cancelled (the loop is closing) or a bug: nobody may wait forever.
            stranded, self._pending = group + self._pending, []
            for waiting in stranded:
                _answer(waiting, error=RuntimeError("the admission queue stopped"))
            raise

    async def _run(self, group: list[_Waiting[T, O]]) -> None:
        try:
            outcomes = await self._commit([w.item for w in group])
        except Exception as exc:
            if len(group) == 1:
                _answer(group[0], error=exc)
                return
            log.info("a group of %d admissions failed (%s); admitting them one by one", len(group), exc)
            for waiting in group:
                try:
                    [outcome] = await self._commit([waiting.item])
                except Exception as single:
                    _answer(waiting, error=single)
                else:
                    _answer(waiting, outcome)
            return
        self.groups += 1
        self.items += len(group)
        for waiting, outcome in zip(group, outcomes, strict=True):
            _answer(waiting, outcome)


def _answer(waiting: _Waiting[Any, Any], outcome: Any = None, *, error: BaseException | None = None) -> None:
    if waiting.future.done():  # its caller went away (cancelled): the outcome stands in the store
        return
    if error is not None:
        waiting.future.set_exception(error)
    else:
        waiting.future.set_result(outcome)


__all__ = ["MAX_GROUP", "GroupCommit"]
