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

Two set-ups, each with its own row in the report:

* **bot in its own process** (`python -m bot`, as deployed; the sandbox stays in the test process,
  as Discord is elsewhere): the goal's figure;
* **bot and sandbox in one process and event loop** (`studio.harness.open_studio`): the sandbox's own
  work (encoding the dispatches, serving the callbacks) is then inside the figures, and this
  variant can profile the loop. Its start-up heap is frozen as `atelier run` freezes the bot's.

Queue caps and quotas are raised through settings overrides so every request is accepted.
``ATELIER_BENCH_BURSTS`` (default ``25,50,100,200,200,200``) sets the burst sizes, in order;
``ATELIER_BENCH_PROFILE=FILE`` profiles the event loop's thread during the bursts of the one-process
variant (cProfile) and prints where the time goes; ``ATELIER_BENCH_PYSPY=FILE`` samples the bot
process of the other variant with py-spy from the first burst to the last (collapsed stacks in
FILE) and prints the functions the samples were in, by own and by total share.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from bot.app import freeze_startup_heap
from sandbox import Channel, Guild, InteractionRecord, Sandbox, User
from studio.harness import build_world, open_studio, tiny_settings
from tests.bench import report
from tests.reliability.bot_process import start_bot, stop_bot, wait_bot_ready, write_config

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

BURSTS = [int(n) for n in os.environ.get("ATELIER_BENCH_BURSTS", "25,50,100,200,200,200").split(",")]
EXTRA_EVERY = 10  # one /quota and one /queue per 10 members
HOGS = 3  # long jobs keeping the engine busy
PROFILE = os.environ.get("ATELIER_BENCH_PROFILE")
PYSPY = os.environ.get("ATELIER_BENCH_PYSPY")
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
    # The event-loop thread from the burst to its last answer: time on a CPU, and time runnable
    # but waiting for one (the kernel's schedstat): what a shared 2-core machine takes away.
    loop_ran: float = 0.0
    loop_waited: float = 0.0

    @property
    def everything(self) -> list[float]:
        return [x for values in self.latencies.values() for x in values]


HEADER = (
    f"{'burst':<18} {'n':>4} {'missed':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'drained s':>9} "
    f"{'CPU ms/req':>10} {'deferred':>8} {'loop ran ms':>11} {'waited ms':>9}"
)


def row(label: str, latencies: list[float], b: Burst | None = None) -> str:
    missed = sum(x == MISSED for x in latencies)
    totals = ""
    if b is not None:
        totals = f"{b.drained:>9.1f} {b.cpu / len(latencies) * 1000:>10.1f} {b.deferred:>8}"
        totals += f" {b.loop_ran * 1000:>11.0f} {b.loop_waited * 1000:>9.0f}"
    return (
        f"{label:<18} {len(latencies):>4} {missed:>6} {ms(statistics.median(latencies))} "
        f"{ms(percentile(latencies, 99))} {ms(max(latencies))} {totals}"
    )


@dataclass
class Target:
    """Where the bursts go: the sandbox and its channel, and how to read the bot's side."""

    sb: Sandbox
    guild: Guild
    channel: Channel
    engine_busy: Callable[[], bool]
    cpu_seconds: Callable[[], float]  # CPU time of the process the bot runs in
    loop_thread: int  # native id of the thread running the bot's event loop

    def loop_schedule(self) -> tuple[float, float]:
        """(seconds on a CPU, seconds runnable but waiting for one) of the event-loop thread."""
        with open(f"/proc/{self.loop_thread}/schedstat") as stat:
            ran, waited, _ = stat.read().split()
        return int(ran) / 1e9, int(waited) / 1e9

    def new_member(self, name: str) -> User:
        user = self.sb.add_user(name)
        self.sb.add_member(self.guild, user)
        return user

    async def command(self, user: User, name: str, options: dict[str, Any]) -> InteractionRecord:
        inter = await self.sb.slash(user, self.channel, name, options)
        await inter.wait_response(10.0)
        return inter


async def burst(target: Target, number: int, size: int) -> Burst:
    sb = target.sb
    result = Burst(size, target.engine_busy())
    members = [target.new_member(f"b{number}m{i}") for i in range(size)]
    await asyncio.sleep(0.5)  # let GUILD_MEMBER_ADD reach the bot before they act
    gc.collect()
    records: list[tuple[str, InteractionRecord]] = []
    cpu_before = target.cpu_seconds()
    ran_before, waited_before = target.loop_schedule()
    started = time.perf_counter()
    for i, member in enumerate(members):
        options = {"prompt": f"burst {number} member {i}: a small boat", "steps": 2, "seed": i}
        records.append(("generate", await sb.slash(member, target.channel, "generate", options)))
        if i % EXTRA_EVERY == 0:
            records.append(("quota", await sb.slash(member, target.channel, "quota", {})))
            records.append(("queue", await sb.slash(member, target.channel, "queue", {})))
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
    result.cpu = target.cpu_seconds() - cpu_before
    ran, waited = target.loop_schedule()
    result.loop_ran, result.loop_waited = ran - ran_before, waited - waited_before

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


SETTINGS = {
    "queue": {"per_user_cap": 4, "global_cap": 100_000},
    "quota": {"default_limit": 100_000.0},
    "logging": {"level": "ERROR"},
}


class PySpy:
    """py-spy sampling another process from `enable()` on (it cannot pause), collapsed stacks."""

    def __init__(self, pid: int, path: str) -> None:
        self.pid, self.path = pid, path
        self.process: subprocess.Popen[bytes] | None = None

    def enable(self) -> None:
        if self.process is None:
            spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
            command = [spy, "record", "--pid", str(self.pid), "--rate", "250", "--gil", "--format", "raw"]
            command += ["-o", self.path]
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def disable(self) -> None:
        return None  # sampling goes on until `stop`

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(30)

    def summary(self, top: int = 30) -> str:
        own: Counter[str] = Counter()
        total: Counter[str] = Counter()
        samples = 0
        with open(self.path) as collapsed:
            for line in collapsed:
                stack, _, count = line.rstrip().rpartition(" ")
                frames = stack.split(";")
                samples += int(count)
                own[frames[-1]] += int(count)
                for frame in set(frames):
                    total[frame] += int(count)
        lines = [f"{samples} samples (250/s, the thread holding the GIL) of the bot during the bursts; own time:"]
        lines += [f"{n / samples:6.1%}  {frame}" for frame, n in own.most_common(top)]
        lines.append("total time (the frame or what it called):")
        lines += [f"{n / samples:6.1%}  {frame}" for frame, n in total.most_common(top)]
        return "\n".join(lines)


async def run_bursts(target: Target, profiler: cProfile.Profile | PySpy | None = None) -> list[Burst]:
    # Keep the engine busy for the whole run: long 4-image jobs, one of them running.
    for i in range(HOGS):
        hog = target.new_member(f"hog{i}")
        await target.command(hog, "generate", {"prompt": "a long exposure", "steps": 60, "count": 4, "aspect": "16:9"})
    await target.sb.wait_until(target.engine_busy, timeout=60)
    # Warm-up: first calls pay for lazy imports and caches.
    for i in range(5):
        await target.command(target.new_member(f"warm{i}"), "generate", {"prompt": "warm-up", "steps": 2})
    bursts: list[Burst] = []
    for number, size in enumerate(BURSTS, start=1):
        if profiler:
            profiler.enable()
        bursts.append(await burst(target, number, size))
        if profiler:
            profiler.disable()
        await asyncio.sleep(3)  # let the burst's status edits settle before the next one
    return bursts


def summarize(title: str, bursts: list[Burst]) -> None:
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
        big = [b for b in bursts if b.size == GOAL_BURST]
        ran, waited = sum(b.loop_ran for b in big), sum(b.loop_waited for b in big)
        lines.append(
            f"event loop over those bursts: on a CPU {ran * 1000:.0f} ms, waiting for one {waited * 1000:.0f} ms "
            f"({waited / max(1e-9, ran + waited):.0%} of its runnable time)"
        )
        report.record(
            "bot", f"event loop in bursts of {GOAL_BURST}, {title}: on a CPU / waiting for a CPU",
            f"{ran * 1000 / len(big):.0f} / {waited * 1000 / len(big):.0f} ms per burst",
        )  # fmt: skip
        report.record(
            "bot", f"first response under bursts of {GOAL_BURST}, {title} (p50 / p99 / over 3 s)",
            f"{ms(percentile(goal, 50)).strip()} / {ms(p99).strip()} ms / {missed} of {len(goal)}",
            f"p99 < {GOAL_P99 * 1000:.0f} ms", p99 < GOAL_P99,
        )  # fmt: skip
    lines.append(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"\n\nfirst response under a burst, engine busy; {title}\n" + "\n".join(lines))
    problems = [p for b in bursts for p in b.problems]
    assert not problems, problems[:10]
    # Latency is reported, not asserted: it depends on the machine and what else runs on it.


async def test_first_response_bot_in_its_own_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    aspects = {"1:1": "256x256", "16:9": "448x256"}  # as in tiny_settings: the hogs are 16:9
    config = write_config(
        tmp_path, tiny_model_dir, safety={"enabled": True}, generation={"aspects": aspects}, **SETTINGS
    )
    async with Sandbox() as sb:
        world = build_world(sb)
        bot = await start_bot(sb, config, tmp_path / "bot.log")
        try:
            await wait_bot_ready(sb, 1)
            process = psutil.Process(bot.pid)

            def engine_busy() -> bool:
                return any(m.content.startswith("Running") for m in sb.channel_messages(world["channel"]))

            def cpu_seconds() -> float:
                times = process.cpu_times()
                return times.user + times.system

            target = Target(sb, world["guild"], world["channel"], engine_busy, cpu_seconds, bot.pid)
            spy = PySpy(bot.pid, PYSPY) if PYSPY else None
            try:
                bursts = await run_bursts(target, spy)
            finally:
                if spy is not None:
                    spy.stop()
        finally:
            await stop_bot(bot)
    summarize("bot in its own process", bursts)
    if spy is not None:
        print(spy.summary())


async def test_first_response_bot_and_sandbox_in_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path, **SETTINGS)
    profiler = cProfile.Profile() if PROFILE else None
    async with open_studio(settings) as studio:

        def engine_busy() -> bool:
            return any(v.status == "running" for v in studio.bot.wiring.scheduler.snapshot())

        loop_thread = threading.get_native_id()
        target = Target(studio.sb, studio.guild, studio.channel, engine_busy, time.process_time, loop_thread)
        freeze_startup_heap()  # as `atelier run` does once the bot is set up
        try:
            bursts = await run_bursts(target, profiler)
        finally:
            gc.unfreeze()
    summarize("bot and sandbox in one process", bursts)
    if profiler and PROFILE:
        profiler.dump_stats(PROFILE)
        stats = pstats.Stats(PROFILE).strip_dirs()
        stats.sort_stats("tottime").print_stats(30)
