"""Reading an engine client's job stream in tests (the local and the Ray client give the same one)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from engine.api import Result
from engine.jobs.events import Progress


async def collect(stream: AsyncIterator[Progress | Result]) -> tuple[list[Progress], Result]:
    """Every progress of a job, then its Result; fails if the stream ends without one."""
    progress: list[Progress] = []
    async for item in stream:
        if isinstance(item, Result):
            return progress, item
        progress.append(item)
    raise AssertionError("the stream ended without a Result")
