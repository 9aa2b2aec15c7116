"""Time to the first response under a burst, through the whole bot (run with
``.venv/bin/pytest -m bench tests/bench/test_bot_bench.py -s``).

The real bot (discord.py, request path, scheduler, SQLite, delivery) against the built-in sandbox,
with the engine child process on the tiny model kept busy by long jobs (4 images × 60 steps), so
the bot has what is left of the CPU, as on a box whose GPU is rendering. Then bursts: N distinct
members each send `/generate` at the same instant, and one in ten also `/quota` and `/queue`
(so 1.2 N interactions); we measure INTERACTION_CREATE → first response
(`InteractionRecord.response_latency`, as the sandbox sees it) and the bot process's CPU time per
interaction. Discord's limit is 3 s (past it the sandbox refuses the answer, like Discord: "missed");
the goal is p99 < 250 ms for a burst of 200 on 2 cores.

The sandbox runs in the bot's process and event loop, so its own work (encoding the dispatches,
serving the callbacks) is inside the figures: on Discord that part runs elsewhere.
Queue caps and quotas are raised through settings overrides so every request is accepted.
``ATELIER_BENCH_BURSTS`` (default ``25,50,100,200,200,200``) sets the burst sizes, in order;
``ATELIER_BENCH_PROFILE=FILE`` profiles the event loop's thread during the bursts (cProfile) and
prints where the time goes.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import pstats
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bot.harness import Studio, open_studio, tiny_settings
from bot.sandbox import InteractionRecord
from tests.bench import report

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

BURSTS = [int(n) for n in os.environ.get("ATELIER_BENCH_BURSTS", "25,50,100,200,200,200").split(",")]
EXTRA_EVERY = 10  # one /quota and one /queue per 10 members
HOGS = 3  # long jobs keeping the engine busy
PROFILE = os.environ.get("ATELIER_BENCH_PROFILE")
GOAL_P99 = 0.250
GOAL_BURST = 200
DISCORD_LIMIT = 3.0
DEFERRED = 5  # interaction response type: deferred channel message ("thinking…")
MISSED = float("inf")  # no first response within Discord's 3 s (the sandbox then refuses it)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(value: float) -> str:
    return f"{'>3000':>7}" if value == MISSED else f"{value * 1000:>7.0f}"


@dataclass
class Burst:
    size: int
    engine_busy: bool
    latencies: dict[str, list[float]] = field(default_factory=dict)  # by command
    cpu: float = 0.0  # bot process CPU seconds from the burst to its last answer (or late try)
    drained: float = 0.0  # seconds until every interaction was answered or answered too late
    problems: list[str] = field(default_factory=list)
    deferred: int = 0  # answered in time by a deferral (the request path took over 2 s)

    @property
    def everything(self) -> list[float]:
        return [x for values in self.latencies.values() for x in values]


HEADER = (
    f"{'burst':<18} {'n':>4} {'missed':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'drained s':>9} "
    f"{'CPU ms/req':>10} {'deferred':>8}"
)


def row(label: str, latencies: list[float], b: Burst | None = None) -> str:
    missed = sum(x == MISSED for x in latencies)
    totals = f"{b.drained:>9.1f} {b.cpu / len(latencies) * 1000:>10.1f} {b.deferred:>8}" if b is not None else ""
    return (
        f"{label:<18} {len(latencies):>4} {missed:>6} {ms(statistics.median(latencies))} "
        f"{ms(percentile(latencies, 99))} {ms(max(latencies))} {totals}"
    )


async def burst(studio: Studio, number: int, size: int) -> Burst:
    sb = studio.sb
    result = Burst(size, any(v.status == "running" for v in studio.bot.services.scheduler.snapshot()))
    members = [studio.new_member(f"b{number}m{i}") for i in range(size)]
    await asyncio.sleep(0.5)  # let GUILD_MEMBER_ADD reach the bot before they act
    gc.collect()
    records: list[tuple[str, InteractionRecord]] = []
    cpu_before = time.process_time()
    started = time.perf_counter()
    for i, member in enumerate(members):
        options = {"prompt": f"burst {number} member {i}: a small boat", "steps": 2, "seed": i}
        records.append(("generate", await sb.slash(member, studio.channel, "generate", options)))
        if i % EXTRA_EVERY == 0:
            records.append(("quota", await sb.slash(member, studio.channel, "quota", {})))
            records.append(("queue", await sb.slash(member, studio.channel, "queue", {})))
    if time.perf_counter() - started > 0.5:
        result.problems.append(f"dispatching the burst itself took {time.perf_counter() - started:.2f} s")
    # One poller, not hundreds of `wait_response` waiters: those would all wake on every change
    # in the sandbox, and that work, on the bot's event loop, would count as the bot's latency.
    # Late answers are refused by the sandbox (`rejected`); wait for those too, so the CPU time
    # covers the whole burst.
    deadline = started + 120
    while time.perf_counter() < deadline and not all(r.response or r.rejected for _, r in records):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    result.drained = time.perf_counter() - started
    result.cpu = time.process_time() - cpu_before

    def settled(rec: Any) -> bool:  # a deferral is finished once its message has content
        return rec.response is None or rec.response.type != DEFERRED or bool(rec.original and rec.original.content)

    while time.perf_counter() < deadline and not all(settled(r) for _, r in records):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for name, rec in records:
        latency = rec.response_latency
        if rec.response is None or latency is None or rec.late:
            result.latencies.setdefault(name, []).append(MISSED)
            continue
        text = rec.response.content or ""
        if rec.response.type == DEFERRED:
            # Answered in time by the deferral; the request finished in the deferred message.
            result.deferred += 1
            final = rec.original.content if rec.original is not None else ""
            if name == "generate" and "Your job is queued" not in final and not final.startswith("Queued"):
                result.problems.append(f"/generate deferred, then: {final[:100]!r}")
        elif name == "generate" and not text.startswith("Queued"):
            result.problems.append(f"/generate refused: {text[:100]}")
        result.latencies.setdefault(name, []).append(latency)
    return result


async def test_first_response_under_a_burst(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(
        tiny_model_dir,
        tmp_path,
        queue={"per_user_cap": 4, "global_cap": 100_000},
        quota={"default_limit": 100_000.0},
        logging={"level": "ERROR"},
    )
    profiler = cProfile.Profile() if PROFILE else None
    bursts: list[Burst] = []
    async with open_studio(settings) as studio:
        # Keep the engine busy for the whole run: long 4-image jobs, one of them running.
        for i in range(HOGS):
            hog = studio.new_member(f"hog{i}")
            await studio.command(
                hog, "generate", {"prompt": "a long exposure", "steps": 60, "count": 4, "aspect": "16:9"}
            )
        await studio.sb.wait_until(
            lambda: any(v.status == "running" for v in studio.bot.services.scheduler.snapshot()),
            timeout=60,
        )
        # Warm-up: first calls pay for lazy imports and caches.
        for i in range(5):
            await studio.command(studio.new_member(f"warm{i}"), "generate", {"prompt": "warm-up", "steps": 2})
        for number, size in enumerate(BURSTS, start=1):
            if profiler:
                profiler.enable()
            bursts.append(await burst(studio, number, size))
            if profiler:
                profiler.disable()
            await asyncio.sleep(3)  # let the burst's status edits settle before the next one
        queued = len(studio.bot.services.scheduler.snapshot())

    lines = [HEADER]
    for b in bursts:
        lines.append(row(f"{b.size} members{'' if b.engine_busy else ' (idle)'}", b.everything, b))
        lines += [row(f"  /{name}", b.latencies[name]) for name in ("generate", "quota", "queue")]
    goal = [x for b in bursts if b.size == GOAL_BURST for x in b.everything]
    if goal:
        p99 = percentile(goal, 99)
        missed = sum(x == MISSED for x in goal)
        lines.append(
            f"bursts of {GOAL_BURST}: p99 {ms(p99).strip()} ms, "
            f"{'meets' if p99 < GOAL_P99 else 'MISSES'} the {GOAL_P99 * 1000:.0f} ms goal; "
            f"{missed} of {len(goal)} not answered within Discord's {DISCORD_LIMIT:.0f} s"
        )
        report.record(
            "bot", f"first response under bursts of {GOAL_BURST} (p50 / p99 / over 3 s)",
            f"{ms(percentile(goal, 50)).strip()} / {ms(p99).strip()} ms / {missed} of {len(goal)}",
            f"p99 < {GOAL_P99 * 1000:.0f} ms", p99 < GOAL_P99,
        )  # fmt: skip
    lines.append(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {queued} jobs queued at the end")
    print("\n\nfirst response under a burst, engine busy\n" + "\n".join(lines))
    if profiler and PROFILE:
        profiler.dump_stats(PROFILE)
        stats = pstats.Stats(PROFILE).strip_dirs()
        stats.sort_stats("tottime").print_stats(30)
    problems = [p for b in bursts for p in b.problems]
    assert not problems, problems[:10]
    # Latency is reported, not asserted: it depends on the machine and what else runs on it.
