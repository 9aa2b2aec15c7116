"""The one invariant every reliability scenario ends with, read from the real database and the
sandbox's record of what Discord would show:

* every accepted job ended: ``done`` with exactly one result post (the message carrying its
  buttons, posted with the bot token, the one the job row points to), or ``failed`` / ``cancelled``
  with its status message saying so (``Failed:`` … ``refunded`` / ``Cancelled`` …) and a refund;
* the ledger balances per job: one reserve of the job's cost, and reserved = committed + refunded
  (a done job committed in full and never refunded, an ended-unfinished job refunded in full and
  never committed);
* quota used matches: for every member, the units still counted are the costs of their done jobs;
* no duplicate result posts, and no result post for a job that is not done or not in the database.

It reads the database through its own ``Database`` so it works for a bot in another process too.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy import select

from db.models import Job, LedgerEntry
from db.session import Database
from sandbox import Message, Sandbox

ACTIVE = ("queued", "running")
RESULT_BUTTON = re.compile(r"^atelier:delete:([0-9A-Za-z_-]+)$")
SLACK = 1e-6


@dataclass
class Audit:
    """What the check saw (for reports and scenario-specific assertions)."""

    jobs: dict[str, Job]
    ledger: dict[str, list[LedgerEntry]]
    result_posts: dict[str, list[Message]]
    statuses: Counter[str] = field(default_factory=Counter)

    def of_status(self, status: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.status == status]


def result_posts(sb: Sandbox) -> dict[str, list[Message]]:
    """Every result message the bot posted in a channel (deleted ones too), by job id. Answers to
    interactions (``/job`` re-posts) are not result posts."""
    posts: dict[str, list[Message]] = defaultdict(list)
    for message in list(sb.world.messages.values()):
        if message.author.id != sb.bot_user.id or message.webhook_id is not None or message.interaction_id:
            continue
        for component in message.iter_components():
            match = RESULT_BUTTON.match(component.get("custom_id") or "")
            if match:
                posts[match[1]].append(message)
                break
    return posts


async def read_state(db: Database, guild_id: int | None = None) -> tuple[dict[str, Job], dict[str, list[LedgerEntry]]]:
    async with db.session(write=False) as s:
        stmt = select(Job)
        if guild_id is not None:
            stmt = stmt.where(Job.guild_id == guild_id)
        jobs = {j.id: j for j in (await s.execute(stmt)).scalars()}
        entries = (await s.execute(select(LedgerEntry).order_by(LedgerEntry.id))).scalars().all()
    ledger: dict[str, list[LedgerEntry]] = defaultdict(list)
    for entry in entries:
        if guild_id is None or entry.guild_id == guild_id:
            ledger[entry.job_id or ""].append(entry)
    return jobs, ledger


async def wait_settled(sb: Sandbox, db: Database, *, timeout: float = 120.0, guild_id: int | None = None) -> None:
    """Until no job is queued or running and every done job's result post is recorded (the post
    follows ``mark_done``). Polls the database: the bot may live in another process."""
    deadline = time.monotonic() + timeout
    while True:
        jobs, _ = await read_state(db, guild_id)
        pending = [j.id for j in jobs.values() if j.status in ACTIVE]
        unposted = [j.id for j in jobs.values() if j.status == "done" and j.result_message_id is None]
        if not pending and not unposted:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not settled after {timeout:.0f} s: active {pending[:10]}, unposted {unposted[:10]}")
        await asyncio.sleep(0.25)


def _status_text(sb: Sandbox, job: Job) -> str:
    """The job's status message as a member sees it now (the queue card, edited)."""
    message = sb.world.messages.get(job.status_message_id or 0)
    if message is not None and not message.deleted:
        return message.content
    # A deferred request has its card elsewhere: any live bot message naming the job.
    for candidate in sb.world.messages.values():
        if not candidate.deleted and f"`{job.id}`" in candidate.content and not candidate.content.startswith("Queued"):
            return candidate.content
    return ""


async def assert_invariants(
    sb: Sandbox,
    db: Database,
    *,
    accepted: Iterable[str] = (),
    guild_id: int | None = None,
    settle_timeout: float = 120.0,
) -> Audit:
    """Wait for the queue to drain, then check the invariants above for every job in the database
    (of `guild_id`, if given); `accepted` are job ids members were shown on a queue card."""
    await wait_settled(sb, db, timeout=settle_timeout, guild_id=guild_id)
    jobs, ledger = await read_state(db, guild_id)
    posts = result_posts(sb)
    problems: list[str] = []

    missing = set(accepted) - set(jobs)
    if missing:
        problems.append(f"accepted jobs missing from the database: {sorted(missing)[:10]}")

    for job in jobs.values():
        kinds = Counter(e.kind for e in ledger.get(job.id, []))
        units = defaultdict(float)
        for e in ledger.get(job.id, []):
            units[e.kind] += e.units
        mine = posts.get(job.id, [])
        where = f"job {job.id} ({job.kind}, {job.status}, attempts {job.attempts})"
        if kinds["reserve"] != 1 or abs(units["reserve"] - job.cost) > SLACK:
            problems.append(f"{where}: reserved {kinds['reserve']}× {units['reserve']} for cost {job.cost}")
        if abs(units["reserve"] - units["commit"] - units["refund"]) > SLACK:
            balance = f"reserved {units['reserve']} ≠ committed {units['commit']} + refunded {units['refund']}"
            problems.append(f"{where}: {balance}")
        if job.status == "done":
            if kinds["commit"] != 1 or kinds["refund"]:
                problems.append(f"{where}: ledger {dict(kinds)} for a done job")
            if len(mine) != 1:
                problems.append(f"{where}: {len(mine)} result posts")
            elif mine[0].id != job.result_message_id:
                problems.append(f"{where}: posted {mine[0].id}, the row says {job.result_message_id}")
        elif job.status in ("failed", "cancelled"):
            if kinds["refund"] != 1 or kinds["commit"]:
                problems.append(f"{where}: ledger {dict(kinds)} for a job that did not finish")
            if mine:
                problems.append(f"{where}: has {len(mine)} result posts")
            text = _status_text(sb, job)
            if job.status == "failed" and not (text.startswith("Failed:") and "refunded" in text):
                problems.append(f"{where}: status message reads {text[:120]!r}")
            if job.status == "cancelled" and not text.startswith("Cancelled"):
                problems.append(f"{where}: status message reads {text[:120]!r}")
        else:
            problems.append(f"{where}: not finished")

    for job_id, messages in posts.items():
        if job_id not in jobs and (guild_id is None or any(m.guild_id == guild_id for m in messages)):
            problems.append(f"result post for unknown job {job_id}")

    # Quota used matches: per member, units still counted = the costs of their done jobs.
    per_user_jobs: dict[tuple[int, int], float] = defaultdict(float)
    for job in jobs.values():
        if job.status == "done":
            per_user_jobs[(job.guild_id or 0, job.owner_id)] += job.cost
    per_user_ledger: dict[tuple[int, int], float] = defaultdict(float)
    for entries in ledger.values():
        for e in entries:
            sign = {"reserve": 1.0, "refund": -1.0, "reset": -1.0, "grant": -1.0}.get(e.kind, 0.0)
            per_user_ledger[(e.guild_id, e.user_id)] += sign * e.units
    for key in set(per_user_jobs) | set(per_user_ledger):
        if abs(per_user_jobs[key] - per_user_ledger[key]) > 1e-4:
            counted, spent = per_user_ledger[key], per_user_jobs[key]
            problems.append(f"member {key}: ledger counts {counted:.4f} units, done jobs cost {spent:.4f}")
    orphans = [e for e in ledger.get("", []) if e.kind in ("reserve", "refund", "commit")]
    if orphans:
        problems.append(f"{len(orphans)} job ledger entries without a job id")

    assert not problems, f"{len(problems)} invariant violations:\n" + "\n".join(problems[:40])
    return Audit(jobs, dict(ledger), dict(posts), Counter(j.status for j in jobs.values()))
