"""Text and embeds members see: queue cards, progress, results, refusals.

Pure functions of plain values, so every wording is testable without Discord. Discord's limits
(content 2000 chars, embed description 4096, field value 1024) are enforced here, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import discord

from engine.jobs import label_of
from engine.options import DRAFT_SAMPLER_LABELS, SAMPLER_LABELS
from engine.styles import embedding_refs

CONTENT_LIMIT = 2000
DESCRIPTION_LIMIT = 4096
FIELD_LIMIT = 1024
BAR_WIDTH = 16
ACCENT = discord.Colour(0x7C5CFF)
FAILED = discord.Colour(0xE5484D)

PHASE_NAMES = {
    "load": "loading model",
    "base": "base",
    "refiner": "refiner",
    "upscale": "upscaling",
    "decode": "decoding",
    "encode": "encoding",
}


def cut(text: str, limit: int) -> str:
    """Cut only at the end, marking the cut, so what is shown is always verbatim up to there."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def units(value: float) -> str:
    return f"{value:.2f}"


def duration(seconds: float) -> str:
    seconds = max(0, math.ceil(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    total = max(total, 1)
    filled = min(width, round(width * done / total))
    return "▰" * filled + "▱" * (width - filled)


@dataclass(frozen=True)
class QueueCard:
    job_id: str
    kind: str
    position: int
    eta_seconds: float | None
    cost: float
    remaining: float | None  # None: unlimited
    show_remaining: bool = True  # status edits after the first card do not re-read the quota


def queue_card(card: QueueCard) -> str:
    """The public answer to an accepted command or click. Starts with `Queued` (contract)."""
    # Contract: the card shows the position, also when it is the first.
    where = "position 1 (next in line)" if card.position <= 1 else f"position {card.position}"
    eta = f" · ETA ~{duration(card.eta_seconds)}" if card.eta_seconds is not None else ""
    left = ""
    if card.show_remaining:
        left = " · unlimited" if card.remaining is None else f" · {units(card.remaining)} units left"
    return f"Queued · {where}{eta}\n{label_of(card.kind)} · Job `{card.job_id}` · Cost {units(card.cost)} units{left}"


def progress_text(job_id: str, kind: str, step: int, total: int, phase: str, elapsed: float) -> str:
    pct = 0 if total <= 0 else round(100 * step / total)
    return (
        f"Running · {label_of(kind)} · Job `{job_id}`\n"
        f"`{bar(step, total)}` {pct}% · step {step}/{total} · {PHASE_NAMES.get(phase, phase)}"
        f" · {duration(elapsed)}"
    )


def starting_text(job_id: str, kind: str) -> str:
    return f"Running · {label_of(kind)} · Job `{job_id}`\n`{bar(0, 1)}` starting…"


def done_text(job_id: str, result_url: str | None) -> str:
    where = f": {result_url}" if result_url else ""
    return f"Done · Job `{job_id}`{where}"


def failed_text(job_id: str, reason: str, refunded: float) -> str:
    """Contract: a job that fails for good shows `Failed:` and the reason; its cost is refunded."""
    return cut(f"Failed: {reason}\nJob `{job_id}` · {units(refunded)} units refunded", CONTENT_LIMIT)


def cancelled_text(job_id: str, refunded: float, by_moderator: bool = False) -> str:
    who = " by a moderator" if by_moderator else ""
    return f"Cancelled{who} · Job `{job_id}` · {units(refunded)} units refunded"


def result_embed(
    *,
    job_id: str,
    kind: str,
    prompt: str,
    negative: str,
    seeds: Sequence[int],
    model: str,
    sampler: str,
    steps: int,
    cfg: float,
    size: tuple[int, int],
    seconds: float,
    requested_by: str | None,
    strength: float | None = None,
    details: Mapping[str, str] | None = None,
    notice: str = "",
    thumbnail: str | None = None,
) -> discord.Embed:
    """The result card: the prompt verbatim (cut only at its end) and every setting needed to redo
    it; `details`: what the job's kind adds (an edit's region, a zoom's factor, a pan's direction)."""
    description = prompt if prompt else "*(no prompt)*"
    embed = discord.Embed(description=cut(description, DESCRIPTION_LIMIT), colour=ACCENT)
    embed.set_author(name=f"{label_of(kind)} · Job {job_id}")
    if negative:
        embed.add_field(name="Negative", value=cut(negative, FIELD_LIMIT), inline=False)
    seed_text = ", ".join(str(seed) for seed in seeds)
    embed.add_field(name="Seeds" if len(seeds) > 1 else "Seed", value=cut(seed_text, FIELD_LIMIT))
    embed.add_field(name="Model", value=cut(model, FIELD_LIMIT))
    embed.add_field(name="Sampler", value=SAMPLER_LABELS.get(sampler) or DRAFT_SAMPLER_LABELS.get(sampler, sampler))
    embed.add_field(name="Steps", value=str(steps))
    embed.add_field(name="CFG", value=f"{cfg:g}")
    embed.add_field(name="Size", value=f"{size[0]}×{size[1]}")
    if strength is not None:
        embed.add_field(name="Strength", value=f"{strength:g}")
    for name, value in (details or {}).items():
        embed.add_field(name=name, value=cut(value, FIELD_LIMIT))
    embed.add_field(name="Job", value=job_id)
    embed.add_field(name="Time", value=duration(seconds) if seconds >= 1 else f"{seconds:.2f} s")
    if notice:
        embed.add_field(name="Note", value=cut(notice, FIELD_LIMIT), inline=False)
    if requested_by:  # a name: Discord shows footers as plain text, a mention would stay `<@id>`
        embed.set_footer(text=f"requested by {requested_by}")
    if thumbnail:  # an attachment of the same message (a ControlNet job's control map)
        embed.set_thumbnail(url=f"attachment://{thumbnail}")
    return embed


def styling_fields(
    *, loras: Sequence[tuple[str, float]], prompt: str, negative: str, style: str, draft: bool
) -> dict[str, str]:
    """A result's LoRAs with their weights, the embeddings its prompts use, its style and draft
    mode, as embed fields (only those it has), so it can be redone from its card."""
    fields = {}
    if loras:
        fields["LoRAs"] = ", ".join(f"{name} {weight:g}" for name, weight in loras)
    used = embedding_refs(prompt, negative)
    if used:
        fields["Embeddings"] = ", ".join(f"<{name}>" for name in used)
    if style:
        fields["Style"] = style
    if draft:
        fields["Draft"] = "yes"
    return fields


@dataclass(frozen=True)
class QuotaView:
    limit: float | None
    used: float
    remaining: float | None
    resets_at: datetime | None


def quota_text(view: QuotaView) -> str:
    """`/quota`: the labels Limit, Used, Remaining (units) and Resets (contract)."""
    limit = "unlimited" if view.limit is None else f"{units(view.limit)} units"
    remaining = "unlimited" if view.remaining is None else f"{units(view.remaining)} units"
    resets = discord.utils.format_dt(view.resets_at, "R") if view.resets_at else "nothing to reset"
    return f"**Limit** {limit}\n**Used** {units(view.used)} units\n**Remaining** {remaining}\n**Resets** {resets}"
