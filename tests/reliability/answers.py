"""What a member ends up reading after a command or click, as the sandbox recorded it: the first
response, or, when the bot deferred (a burst, a slow database), the deferred message filled in.
An accepted request's job id is on its public queue card, which a deferred answer links to."""

from __future__ import annotations

import re

from sandbox import InteractionRecord
from studio.harness import JOB_IN_TEXT

DEFERRED = 5  # interaction callback type: deferred channel message ("thinking…")
LINK_TO_MESSAGE = re.compile(r"/(\d+)$")


async def settle_answer(inter: InteractionRecord, window: float = 3.5, timeout: float = 60.0) -> None:
    """Wait for the first response and, if it was a deferral, for the message that replaces it."""
    first = await inter.wait_response(window)
    if first.type == DEFERRED:
        await inter.wait_original(lambda m: bool(m.content) or bool(m.embeds), timeout=timeout)


def final_text(inter: InteractionRecord) -> str:
    if inter.response is None:
        return ""
    if inter.response.type == DEFERRED:
        return inter.original.content if inter.original is not None else ""
    return inter.response.content or ""


def job_of(inter: InteractionRecord) -> str | None:
    """The job id of an accepted request (None for a refusal or anything else)."""
    text = final_text(inter)
    if inter.response is not None and inter.response.type == DEFERRED:
        linked = LINK_TO_MESSAGE.search(text.strip())
        card = inter.world.messages.get(int(linked[1])) if linked else None
        text = card.content if card is not None else ""
    match = JOB_IN_TEXT.search(text)
    return match[1] if match and text.startswith("Queued") else None
