"""Checks shared by the moderation, bad-input, fault and safety e2e tests: how a refusal looks
(ephemeral, fast, saying what to change) and proof that nothing was charged and no job was made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from db.jobs import JobRecord
from db.quotas import LedgerRecord
from sandbox import InteractionRecord, User
from studio.harness import Studio

RESPONSE_WINDOW = 3.0
ALL_STATUSES = ("queued", "running", "done", "failed", "cancelled")


def assert_fast(inter: InteractionRecord) -> None:
    """Answered within Discord's 3 s, and not refused as late by the sandbox."""
    assert inter.response is not None, f"no response to interaction {inter.id}"
    assert inter.response_latency is not None and inter.response_latency < RESPONSE_WINDOW, inter.response_latency
    assert not inter.late, inter.rejected


def assert_refused(inter: InteractionRecord, *needles: str) -> str:
    """An ephemeral answer within 3 s that contains every needle (case-insensitive); returns it."""
    assert_fast(inter)
    assert inter.response is not None
    text = inter.response.content or ""
    assert inter.response.ephemeral, f"refusal is public: {text!r}"
    assert not text.startswith("Queued"), text
    for needle in needles:
        assert needle.lower() in text.lower(), f"{needle!r} not in {text!r}"
    return text


def assert_queued(inter: InteractionRecord) -> str:
    assert_fast(inter)
    assert inter.response is not None
    text = inter.response.content or ""
    assert not inter.response.ephemeral and text.startswith("Queued"), text
    return text


@dataclass(frozen=True)
class Account:
    """What a member has in the database: ledger entries and jobs (any status)."""

    ledger: tuple[LedgerRecord, ...]
    jobs: tuple[JobRecord, ...]

    @property
    def job_ids(self) -> set[str]:
        return {job.id for job in self.jobs}


async def account(studio: Studio, user: User, guild_id: int | None = None) -> Account:
    services = studio.bot.wiring
    guild = studio.guild.id if guild_id is None else guild_id
    ledger = await services.quotas.ledger(guild, user.id)
    jobs = await services.jobs.list_for_user(guild, user.id, statuses=ALL_STATUSES)
    return Account(tuple(ledger), tuple(jobs))


async def assert_nothing_charged(studio: Studio, user: User, before: Account) -> None:
    after = await account(studio, user)
    assert after.ledger == before.ledger, "the ledger changed"
    assert after.job_ids == before.job_ids, f"jobs were created: {after.job_ids - before.job_ids}"


def kinds(ledger: Any) -> list[str]:
    return [entry.kind for entry in ledger]
