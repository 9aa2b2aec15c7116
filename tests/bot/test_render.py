"""bot.render: what members read, within Discord's limits."""

from __future__ import annotations

from datetime import UTC, datetime

from bot.render import (
    CONTENT_LIMIT,
    DESCRIPTION_LIMIT,
    QueueCard,
    QuotaView,
    cut,
    duration,
    failed_text,
    queue_card,
    quota_text,
    result_embed,
)


def test_queue_card_says_queued_position_job_and_cost() -> None:
    text = queue_card(QueueCard("ABCD1234", "variations", 1, 42.0, 1.5, remaining=3.25))
    assert text.startswith("Queued · position 1 (next in line) · ETA ~42 s")
    assert "Variations · Job `ABCD1234` · Cost 1.50 units · 3.25 units left" in text
    later = queue_card(QueueCard("ABCD1234", "text2img", 7, None, 1.0, remaining=None, show_remaining=False))
    assert "position 7" in later and "Generate" in later and "left" not in later


def test_texts_are_cut_only_at_their_end() -> None:
    assert cut("abc", 3) == "abc" and cut("abcd", 3) == "ab…"
    assert len(failed_text("ABCD1234", "x" * 5000, 1.0)) == CONTENT_LIMIT
    embed = result_embed(
        job_id="ABCD1234",
        kind="refine",
        prompt="p" * 5000,
        negative="",
        seeds=[1, 2],
        model="tiny",
        sampler="euler_a",
        steps=4,
        cfg=7.0,
        size=(256, 256),
        seconds=0.5,
        requested_by="alice",
        strength=0.3,
    )
    assert embed.description is not None and len(embed.description) == DESCRIPTION_LIMIT
    fields = {field.name: field.value for field in embed.fields}
    assert fields["Sampler"] == "Euler a" and fields["Seeds"] == "1, 2" and fields["Strength"] == "0.3"
    assert embed.author.name == "Refine · Job ABCD1234"


def test_durations_and_quota() -> None:
    assert [duration(s) for s in (0.2, 59, 61, 3661)] == ["1 s", "59 s", "1 min 01 s", "1 h 01 min"]
    text = quota_text(QuotaView(10.0, 2.5, 7.5, datetime(2030, 1, 1, tzinfo=UTC)))
    for label in ("**Limit** 10.00 units", "**Used** 2.50", "**Remaining** 7.50", "**Resets**"):
        assert label in text
    assert "unlimited" in quota_text(QuotaView(None, 0.0, None, None))
