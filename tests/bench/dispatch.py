"""The bot scheduler's dispatch rule, for benchmarks that drive an engine client directly.

A job holds one of the engine's `slots` until its "encode" Progress (its images are then encoded
beside the next job) or its Result; an engine with `prefetch` gets that many more jobs per slot
ahead (the local engine: 1, waiting in its worker; Ray replicas: 0). This is what
bot/scheduler.py does, without the database and the fair queue, so a bench measures the engine
as the bot uses it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable

from engine.api import EngineClient, Result
from engine.jobs import Job
from engine.jobs.events import Progress


async def dispatch_block(client: EngineClient, jobs: Iterable[Job]) -> float:
    """Run `jobs` to completion with the scheduler's rule; returns the wall time in seconds."""
    pending = deque(jobs)
    wake = asyncio.Event()
    holding = 0

    async def consume(job: Job) -> None:
        nonlocal holding
        freed = False
        async for item in client.submit(job):
            if not freed and (isinstance(item, Result) or (isinstance(item, Progress) and item.phase == "encode")):
                freed = True
                holding -= 1
                wake.set()

    started = time.perf_counter()
    consumers: list[asyncio.Task[None]] = []
    while pending:
        wake.clear()
        while pending and holding < client.slots * (1 + getattr(client, "prefetch", 0)):
            holding += 1
            consumers.append(asyncio.create_task(consume(pending.popleft())))
        if pending:
            await wake.wait()
    await asyncio.gather(*consumers)
    return time.perf_counter() - started
