"""Two bot processes (`python -m bot`, one Discord shard each) sharing one PostgreSQL and one engine,
against one sandbox with two shards: `[database] shared = true`.

Concurrent /generate and button clicks from members of guilds on both shards: no job runs twice,
none is lost, quotas are exact, every result is posted once. Then the process holding the
dispatcher role is killed (SIGKILL, no goodbye): the other one takes over, requeues the job that was
running, starts its own engine and finishes the queue.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from bot.app import AtelierBot, ShardedAtelierBot, make_bot
from bot.coordination import LOCK_POLL_SECONDS
from db.jobs import JobRecord, JobStore
from db.ledger import SIGN
from db.migrate import upgrade
from db.quotas import QuotaStore
from db.session import Database
from sandbox import Channel, Guild, InteractionRecord, Message, Sandbox, User
from sandbox import permission_bits as perms
from studio.harness import JOB_IN_TEXT, tiny_settings
from tests.db import pgserver
from tests.db.conftest import PgTarget

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

LIMIT = 0.0147  # units: room for exactly three 256² 2-step jobs (0.0042 each)
TOOK_OVER = "took the dispatcher role"


@pytest.fixture(scope="module")
def pg_url() -> AsyncIterator[str]:
    external = os.environ.get("ATELIER_TEST_PG_URL")
    server = None
    if external:
        target = PgTarget(external)
    else:
        server, reason = pgserver.start_server()
        if server is None:
            pytest.skip(reason)
        target = PgTarget(server.admin_url)

    async def create() -> str:
        name = await target.create_database()
        url = target.url(name)
        await upgrade(url)  # what `atelier db upgrade` does before the shards start
        return url

    from tests.db.conftest import run_blocking

    try:
        yield run_blocking(create())
    finally:
        if server is not None:
            pgserver.remove_server(server)


def write_config(path: Path, data_dir: Path, model_dir: Path, pg_url: str, shard: int) -> Path:
    path.write_text(
        f"""
[discord]
shard_count = 2
shard_ids = [{shard}]
[database]
url = "{pg_url}"
shared = true
resync_seconds = 2.0
[storage]
output_dir = "{data_dir / "outputs"}"
[engine]
device = "cpu"
torch_threads = 1
preview_every = 0
[generation]
default_steps = 2
[generation.aspects]
"1:1" = "256x256"
"big" = "512x512"
[quota]
default_limit = {LIMIT}
[queue]
per_user_cap = 10
[safety]
enabled = false
[models.tiny]
base = "{model_dir / "base"}"
refiner = "{model_dir / "refiner"}"
"""
    )
    return path


@dataclass
class Outcome:
    inter: InteractionRecord
    job_id: str | None  # None: refused
    card_id: int | None
    text: str


@dataclass
class Shard:
    name: str
    shard_id: int
    config: Path
    log: Path
    process: asyncio.subprocess.Process | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self, sb: Sandbox, cwd: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
        env.update(sb.env(), ATELIER_CONFIG=str(self.config), HF_HUB_OFFLINE="1")
        out = self.log.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=cwd, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )

    async def wait_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"{self.name} exited: {self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {text!r} in {timeout} s: {self.log_text()[-3000:]}")
            await asyncio.sleep(0.2)

    async def stop(self) -> int | None:
        if self.process is None or self.process.returncode is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.process.wait(), 25)
        except TimeoutError:
            self.process.kill()
            return await self.process.wait()


@dataclass
class Fleet:
    sb: Sandbox
    shards: list[Shard]
    guilds: list[Guild]
    channels: list[Channel]
    db: Database
    jobs: JobStore
    quotas: QuotaStore

    def member(self, index: int, name: str) -> User:
        user = self.sb.add_user(f"{name}{index}")
        self.sb.add_member(self.guilds[index], user)
        return user

    async def generate(self, index: int, user: User, **options: object) -> Outcome:
        inter = await self.sb.slash(user, self.channels[index], "generate", {"prompt": user.username, **options})
        return await self.outcome(inter)

    async def outcome(self, inter: InteractionRecord) -> Outcome:
        """What the member saw: the queue card (answered at once, or posted in the channel with the
        deferred answer pointing at it), or a refusal."""
        await inter.wait_response(5)

        def final() -> str | None:
            if inter.response is not None and inter.response.content:
                return inter.response.content
            message = inter.original
            return message.content if message is not None and message.content else None

        text = await self.sb.wait_until(final, timeout=30, what="the final answer")
        card_id = inter.original_message_id
        pointer = re.search(r"Your job is queued: \S+/(\d+)$", text)
        if pointer is not None:
            card_id = int(pointer[1])
            text = self.sb.world.messages[card_id].content
        if not text.startswith("Queued"):
            return Outcome(inter, None, None, text)
        match = JOB_IN_TEXT.search(text)
        assert match is not None, text
        return Outcome(inter, match[1], card_id, text)

    def card(self, outcome: Outcome) -> Message | None:
        return self.sb.world.messages.get(outcome.card_id or 0)

    def result_posts(self, job_id: str) -> list[Message]:
        """Every message carrying the job's result buttons (not its cancel button)."""
        return [
            m
            for channel in self.channels
            for m in self.sb.channel_messages(channel)
            if any(
                f":{job_id}" in (c.get("custom_id") or "")
                and not (c.get("custom_id") or "").startswith("atelier:cancel")
                for row in m.components or []
                for c in row.get("components", [])
            )
        ]

    async def wait_posted(self, job_ids: list[str], timeout: float) -> None:
        await self.sb.wait_until(
            lambda: all(self.result_posts(j) for j in job_ids), timeout=timeout, what=f"results of {job_ids}"
        )

    async def check_done_once(self, record: JobRecord, attempts: int = 1) -> None:
        assert record.status == "done", record
        assert record.attempts == attempts, record
        assert len(self.result_posts(record.id)) == 1, record.id
        deadline = time.monotonic() + 10
        while record.result_message_id in (None, 0):  # the post is out; its id is written just after
            assert time.monotonic() < deadline, record
            await asyncio.sleep(0.1)
            record = await _get(self, record.id)
        ledger = [e for e in await self.quotas.ledger(record.guild_id, record.owner_id) if e.job_id == record.id]
        assert sorted(e.kind for e in ledger) == ["commit", "reserve"], ledger


def guilds_on_both_shards(sb: Sandbox) -> tuple[list[Guild], list[Channel]]:
    """One guild per shard: (guild_id >> 22) % 2 decides which shard gets its events."""
    found: dict[int, Guild] = {}
    while len(found) < 2:
        guild = sb.add_guild(f"Guild {len(sb.world.guilds)}")
        found.setdefault((guild.id >> 22) % 2, guild)
        time.sleep(0.002)  # the next snowflake gets another millisecond
    guilds = [found[0], found[1]]
    return guilds, [sb.add_channel(g, "studio") for g in guilds]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> AsyncIterator[Fleet]:
    root = tmp_path_factory.mktemp("shards")
    async with Sandbox() as sb:
        guilds, channels = guilds_on_both_shards(sb)
        shards = [
            Shard(
                f"shard{i}",
                i,
                write_config(root / f"shard{i}.toml", root, tiny_model_dir, pg_url, i),
                root / f"s{i}.log",
            )
            for i in (0, 1)
        ]
        db = Database(pg_url)
        await db.connect()
        try:
            # shard 0 first, so it is the dispatcher; shard 1 then finds the lock taken.
            await shards[0].start(sb, root)
            await shards[0].wait_log(TOOK_OVER, 90)
            await shards[1].start(sb, root)
            await sb.wait_until(lambda: len(sb.gateway.live_sessions()) == 2, timeout=90, what="two shards")
            await sb.wait_for_commands("generate", timeout=30)
            quotas = QuotaStore(db, window_seconds=24 * 3600, default_limit=LIMIT)
            yield Fleet(sb, shards, guilds, channels, db, JobStore(db), quotas)
        finally:
            for shard in shards:
                await shard.stop()
            await db.close()


async def test_both_shards_serve_their_guilds_and_one_engine_runs_everything_once(fleet: Fleet) -> None:
    sessions = {s.shard for s in fleet.sb.gateway.live_sessions()}
    assert sessions == {(0, 2), (1, 2)}
    assert TOOK_OVER not in fleet.shards[1].log_text()  # one dispatcher

    # A burst from both shards at once: two members generate once each per guild, and one member
    # per guild clicks six times with room for three jobs.
    casual = [fleet.member(i, name) for i in (0, 1) for name in ("ana", "ben")]
    greedy = [fleet.member(i, "greedy") for i in (0, 1)]
    calls = [fleet.generate(i // 2, user) for i, user in enumerate(casual)]
    calls += [fleet.generate(i, greedy[i]) for i in (0, 1) for _ in range(6)]
    started = time.monotonic()
    outcomes = await asyncio.gather(*calls)
    accepted = [o for o in outcomes if o.job_id is not None]
    refused = [o for o in outcomes if o.job_id is None]
    assert len(accepted) == 4 + 2 * 3, [o.text for o in outcomes]
    assert all("Not enough quota" in o.text for o in refused), [o.text for o in refused]
    job_ids = [o.job_id for o in accepted if o.job_id]
    assert len(set(job_ids)) == len(job_ids)
    await fleet.wait_posted(job_ids, timeout=120)
    burst_seconds = time.monotonic() - started
    for job_id in job_ids:
        await fleet.check_done_once(await _get(fleet, job_id))
    # Queue cards on both shards were brought to "Done" by the dispatcher.
    for o in accepted:
        await fleet.sb.wait_until(
            lambda o=o: (card := fleet.card(o)) is not None and card.content.startswith("Done"),
            timeout=10,
            what=f"the queue card of {o.job_id} to show Done",
        )
    for i in (0, 1):
        status = await fleet.quotas.status(fleet.guilds[i].id, greedy[i].id)
        assert status.used == pytest.approx(3 * 0.0042) and status.used <= LIMIT

    # Button clicks from both shards at the same time: the casual members reroll (accepted), the
    # greedy ones have no room left (refused).
    owner_of = {o.inter.user.id: o.job_id for o in accepted}
    clicks = []
    for user in casual + greedy:
        job_id = owner_of[user.id]
        assert job_id is not None
        clicks.append(fleet.sb.click(user, fleet.result_posts(job_id)[0], label="Reroll"))
    click_outcomes = await asyncio.gather(*(fleet.outcome(inter) for inter in await asyncio.gather(*clicks)))
    rerolls = [o.job_id for o in click_outcomes[:4] if o.job_id]
    assert len(rerolls) == 4, [o.text for o in click_outcomes]
    assert all("Not enough quota" in o.text for o in click_outcomes[4:]), [o.text for o in click_outcomes]
    await fleet.wait_posted(rerolls, timeout=120)
    for job_id in rerolls:
        await fleet.check_done_once(await _get(fleet, job_id))
    print(f"\nshards: {len(job_ids)} jobs from a 16-request burst on 2 shards posted in {burst_seconds:.1f} s")


async def test_pause_and_cancels_from_the_other_shard_reach_the_dispatcher(fleet: Fleet) -> None:
    """Shard 1's process is not the dispatcher: its /mod pause, /mod resume and /cancel still act on
    the queue the dispatcher runs, for a queued and for a running job."""
    guild, channel = fleet.guilds[1], fleet.channels[1]
    role = fleet.sb.add_role(guild, "Moderators", perms.MANAGE_GUILD)
    mod = fleet.sb.add_user("mod1")
    fleet.sb.add_member(guild, mod, roles=[role])
    member = fleet.member(1, "canceller")
    await fleet.quotas.set_user_limit(guild.id, member.id, 5.0)

    paused = await fleet.outcome(await fleet.sb.slash(mod, channel, "mod pause", {}))
    assert "paused" in paused.text.lower(), paused.text
    queued = await fleet.generate(1, member)
    assert queued.job_id is not None, queued.text
    await asyncio.sleep(2.0)  # the dispatcher would have started it by now
    assert (await _get(fleet, queued.job_id)).status == "queued"
    answer = await fleet.outcome(await fleet.sb.slash(member, channel, "cancel", {"job": queued.job_id}))
    assert "refunded" in answer.text, answer.text
    await fleet.sb.wait_until(
        lambda: (card := fleet.card(queued)) is not None and card.content.startswith("Cancelled"),
        timeout=10,
        what="the queued job's card to show Cancelled",
    )

    resumed = await fleet.outcome(await fleet.sb.slash(mod, channel, "mod resume", {}))
    assert "running again" in resumed.text, resumed.text
    running = await fleet.generate(1, member, aspect="big", steps=30, count=2)
    assert running.job_id is not None, running.text
    await _wait_status(fleet, running.job_id, "running", 30)
    answer = await fleet.outcome(await fleet.sb.slash(member, channel, "cancel", {"job": running.job_id}))
    assert "refunded" in answer.text, answer.text
    await _wait_status(fleet, running.job_id, "cancelled", 30)
    await fleet.sb.wait_until(
        lambda: (card := fleet.card(running)) is not None and card.content.startswith("Cancelled"),
        timeout=10,
        what="the running job's card to show Cancelled",
    )
    for job_id in (queued.job_id, running.job_id):
        ledger = [e for e in await fleet.quotas.ledger(guild.id, member.id) if e.job_id == job_id]
        assert sorted(e.kind for e in ledger) == ["refund", "reserve"], ledger
        assert not fleet.result_posts(job_id)
    assert (await fleet.quotas.status(guild.id, member.id)).used == 0


async def test_killing_the_dispatcher_hands_the_queue_to_the_other_process(fleet: Fleet) -> None:
    dispatcher, survivor = fleet.shards
    assert dispatcher.process is not None
    members = [fleet.member(1, f"late{n}") for n in range(3)]
    await fleet.quotas.set_user_limit(fleet.guilds[1].id, members[0].id, 5.0)  # as /mod quota set would
    # A long job first (2 images at 512², 30 steps), then two short ones queued behind it.
    slow = await fleet.generate(1, members[0], aspect="big", steps=30, count=2)
    slow_id = slow.job_id
    assert slow_id is not None, slow.text
    quick_ids = [o.job_id for o in [await fleet.generate(1, m) for m in members[1:]] if o.job_id]
    assert len(quick_ids) == 2
    await _wait_status(fleet, slow_id, "running", 60)
    await asyncio.sleep(0.5)  # into the engine
    dispatcher.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await dispatcher.process.wait()
    # What the dead dispatcher was running (the one long job, and maybe the next one it had
    # started while the long one's images were being encoded).
    running_at_kill = {r.id for r in await fleet.jobs.list_by_status(["running"])}
    assert slow_id in running_at_kill

    await survivor.wait_log(TOOK_OVER, 30)
    takeover_seconds = time.monotonic() - killed_at
    took = re.search(r"took the dispatcher role in ([0-9.]+) s: (\d+) queued, (\d+) requeued", survivor.log_text())
    assert took is not None and int(took[3]) >= len(running_at_kill), survivor.log_text()[-2000:]
    await fleet.wait_posted([slow_id, *quick_ids], timeout=120)
    finished_seconds = time.monotonic() - killed_at
    for job_id in [slow_id, *quick_ids]:  # an interrupted attempt counts: it ran again, once
        await fleet.check_done_once(await _get(fleet, job_id), attempts=2 if job_id in running_at_kill else 1)
    assert await fleet.jobs.count_by_status(["queued", "running"]) == 0
    # Every job of the whole session: none lost, none charged twice, the ledger explains it all.
    assert await fleet.jobs.count_by_status(["failed"]) == 0
    for record in await fleet.jobs.list_by_status(["done"]):
        assert len(fleet.result_posts(record.id)) == 1, record.id
    for guild in fleet.guilds:
        for user_id in {r.owner_id for r in await fleet.jobs.list_by_status(["done"]) if r.guild_id == guild.id}:
            ledger = await fleet.quotas.ledger(guild.id, user_id)
            done = [
                r for r in await fleet.jobs.list_by_status(["done"]) if r.owner_id == user_id and r.guild_id == guild.id
            ]
            assert sum(SIGN[e.kind] * e.units for e in ledger) == pytest.approx(sum(r.cost for r in done))
    print(
        f"\nshards: hand-over after SIGKILL in {takeover_seconds:.1f} s, queue finished {finished_seconds:.1f} s after"
    )


async def test_a_restarted_shard_joins_and_a_graceful_stop_hands_over_at_once(fleet: Fleet) -> None:
    """The killed shard comes back as a non-dispatcher; SIGTERM on the dispatcher releases the
    role at once (no waiting for the lock poll), and the other process carries on."""
    restarted, dispatcher = fleet.shards
    assert dispatcher.process is not None and dispatcher.process.returncode is None
    restarted.log.write_text("")
    await restarted.start(fleet.sb, restarted.config.parent)
    await restarted.wait_log("connected to Gateway", 60)
    await fleet.sb.wait_until(lambda: len(fleet.sb.gateway.live_sessions()) == 2, timeout=30, what="two shards")
    first = await fleet.generate(0, fleet.member(0, "back"))  # taken by the restarted shard
    assert first.job_id is not None, first.text
    await fleet.wait_posted([first.job_id], timeout=60)
    assert TOOK_OVER not in restarted.log_text()

    stopping = time.monotonic()
    assert await dispatcher.stop() == 0
    stopped_seconds = time.monotonic() - stopping
    await restarted.wait_log(TOOK_OVER, 10)
    handover_seconds = time.monotonic() - stopping
    second = await fleet.generate(0, fleet.member(0, "after"))
    assert second.job_id is not None, second.text
    await fleet.wait_posted([second.job_id], timeout=60)
    for job_id in (first.job_id, second.job_id):
        await fleet.check_done_once(await _get(fleet, job_id))
    print(f"\nshards: graceful stop {stopped_seconds:.1f} s, role taken {handover_seconds:.1f} s after SIGTERM")
    assert handover_seconds < stopped_seconds + LOCK_POLL_SECONDS
    assert await restarted.stop() == 0


async def _wait_status(fleet: Fleet, job_id: str, status: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await _get(fleet, job_id)).status != status:
        assert time.monotonic() < deadline, f"job {job_id} never became {status}"
        await asyncio.sleep(0.1)


async def _get(fleet: Fleet, job_id: str) -> JobRecord:
    record = await fleet.jobs.get(job_id)
    assert record is not None
    return record


async def test_one_process_can_run_every_shard(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`shard_count = 2` with no `shard_ids`: one process opens both shards (AutoShardedClient) and
    answers members of guilds on either; the plain single-connection bot stays the default."""
    settings = tiny_settings(tiny_model_dir, tmp_path, discord={"shard_count": 2}, safety={"enabled": False})
    assert isinstance(make_bot(tiny_settings(tiny_model_dir, tmp_path)), AtelierBot)
    async with Sandbox() as sb:
        guilds, channels = guilds_on_both_shards(sb)
        members = []
        for guild in guilds:
            members.append(sb.add_user(f"m{guild.id % 1000}"))
            sb.add_member(guild, members[-1])
        bot = make_bot(settings, guild_ready_timeout=0.2)
        assert isinstance(bot, ShardedAtelierBot)
        with sb.patch_discord():
            task = asyncio.create_task(bot.start(sb.token))
            try:
                await asyncio.wait_for(bot.wait_until_ready(), 60)
                assert {s.shard for s in sb.gateway.live_sessions()} == {(0, 2), (1, 2)}
                assert sorted(bot.shards) == [0, 1]
                await sb.wait_for_commands("quota")
                for member, channel in zip(members, channels, strict=True):
                    inter = await sb.slash(member, channel, "quota")
                    answer = await inter.wait_response(5)
                    assert "Limit" in (answer.content or ""), answer
            finally:
                await bot.shutdown(grace=0.0)
                await asyncio.wait_for(task, 20)
