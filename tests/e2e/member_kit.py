"""Small readers shared by the member e2e tests (generate, buttons, images, account, restart):
what a member sees on a result (buttons, embed fields, decoded images) and what the bot recorded
(the job row, the member's ledger)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

from PIL import Image

from db.jobs import JobRecord
from sandbox import Channel, InteractionRecord, Message, Sandbox, StoredFile, User
from studio.harness import Studio, job_id_of

TOTAL_STATUSES = ("queued", "running", "done", "failed", "cancelled")
# A one-image result's buttons after the contract's five (issue 14).
EDITING_BUTTONS = ["Vary Region", "Zoom Out", "Pan Left", "Pan Right", "Pan Up", "Pan Down"]


def labels(message: Message) -> list[str]:
    """Button labels in display order (rows flattened)."""
    return [b.get("label") or "" for b in message.buttons]


def custom_ids(message: Message) -> dict[str, str]:
    return {b.get("label") or "": b.get("custom_id") or "" for b in message.buttons}


def fields(message: Message) -> dict[str, str]:
    """The result embed's fields by name."""
    assert message.embeds, f"no embed on {message.content!r}"
    return {f["name"]: f["value"] for f in message.embeds[0].get("fields", [])}


def image(sb: Sandbox, attachment: StoredFile) -> Image.Image:
    img = Image.open(io.BytesIO(sb.file_bytes(attachment)))
    img.load()
    return img


def pixels(sb: Sandbox, attachment: StoredFile) -> bytes:
    """The decoded pixels (the files themselves differ: each carries its job id in its PNG info)."""
    return image(sb, attachment).convert("RGB").tobytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def sizes(sb: Sandbox, message: Message) -> list[tuple[int, int]]:
    return [image(sb, a).size for a in message.attachments]


def assert_refused(inter: InteractionRecord, *needles: str) -> str:
    """An ephemeral answer (a refusal) that mentions every needle; returns its text."""
    assert inter.response is not None, "no response"
    text = inter.response.content or ""
    assert inter.response.ephemeral, f"not ephemeral: {text!r}"
    assert not text.startswith("Queued"), text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


def assert_queued(inter: InteractionRecord) -> str:
    """A public queue card (contract: starts with Queued); returns the job id."""
    assert inter.response is not None, "no response"
    assert not inter.response.ephemeral, inter.response.content
    assert (inter.response.content or "").startswith("Queued"), inter.response.content
    assert inter.response_latency is not None and inter.response_latency < 3.0
    return job_id_of(inter)


async def generate(
    studio: Studio,
    member: User,
    options: dict[str, Any],
    *,
    channel: Channel | None = None,
    timeout: float = 120.0,
) -> tuple[str, Message]:
    """/generate and wait for the result: (job id, result message)."""
    inter = await studio.command(member, "generate", options, channel=channel)
    job_id = assert_queued(inter)
    return job_id, await studio.result_of(job_id, timeout=timeout)


async def job(studio: Studio, job_id: str) -> JobRecord:
    record = await studio.bot.wiring.jobs.get(job_id)
    assert record is not None, f"job {job_id} is not in the database"
    return record


async def ledger(studio: Studio, member: User, guild_id: int | None = -1) -> list[tuple[str, float, str | None]]:
    """The member's ledger entries (kind, units, job) in the studio's guild (None: DMs)."""
    gid = studio.guild.id if guild_id == -1 else guild_id
    entries = await studio.bot.wiring.quotas.ledger(gid, member.id)
    return [(e.kind, round(e.units, 6), e.job_id) for e in entries]


async def used(studio: Studio, member: User, guild_id: int | None = -1) -> float:
    gid = studio.guild.id if guild_id == -1 else guild_id
    return (await studio.bot.wiring.quotas.status(gid, member.id)).used


async def all_jobs(studio: Studio, member: User, guild_id: int | None = -1) -> list[JobRecord]:
    gid = studio.guild.id if guild_id == -1 else guild_id
    return await studio.bot.wiring.jobs.list_for_user(gid, member.id, TOTAL_STATUSES)


async def assert_nothing_charged(studio: Studio, member: User, guild_id: int | None = -1) -> None:
    assert await ledger(studio, member, guild_id) == []
    assert await all_jobs(studio, member, guild_id) == []


def status_message(studio: Studio, inter: InteractionRecord) -> Message:
    """The queue card message (later the job's progress message)."""
    message = inter.original
    assert message is not None, "the queue card is gone"
    return message


async def wait_status(studio: Studio, inter: InteractionRecord, prefix: str, timeout: float = 60.0) -> Message:
    return await inter.wait_original(lambda m: m.content.startswith(prefix), timeout=timeout)


def results_for(studio: Studio, job_id: str, channels: list[Channel] | None = None) -> list[Message]:
    """Every live message carrying the job's result buttons (there should be one per post)."""
    chans = channels or [studio.channel, studio.nsfw]
    found = []
    for channel in chans:
        for message in studio.sb.channel_messages(channel):
            ids = [c.get("custom_id") or "" for c in message.buttons]
            if any(f":{job_id}" in i and not i.startswith("atelier:cancel:") for i in ids):
                found.append(message)
    return found
