"""A member's own view: /quota, /queue, /cancel, /job and /model, through the real bot."""

from __future__ import annotations

import re
import time

import pytest

from bot import delivery
from bot.safety import SafetyVerdict
from studio.harness import Studio
from tests.e2e.member_kit import (
    assert_queued,
    assert_refused,
    fields,
    generate,
    job,
    labels,
    ledger,
    pixels,
    used,
    wait_status,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


def quota_numbers(text: str) -> dict[str, str]:
    """{'Limit': '40.00 units', 'Used': ..., 'Remaining': ..., 'Resets': ...} from /quota."""
    found = dict(re.findall(r"\*\*(Limit|Used|Remaining|Resets)\*\* ([^\n]+)", text))
    assert set(found) == {"Limit", "Used", "Remaining", "Resets"}, text
    return found


# ---------------------------------------------------------------------------------------- /quota
async def test_quota_before_and_after_a_job(studio: Studio) -> None:
    member = studio.new_member("counter")
    inter = await studio.command(member, "quota")
    assert inter.response is not None and inter.response.ephemeral
    before = quota_numbers(inter.response.content or "")
    limit = studio.bot.settings.quota.default_limit
    assert before == {
        "Limit": f"{limit:.2f} units",
        "Used": "0.00 units",
        "Remaining": f"{limit:.2f} units",
        "Resets": "nothing to reset",
    }

    started = time.time()
    job_id, _ = await generate(studio, member, {"prompt": "a compass", "aspect": "16:9", "steps": 30})
    cost = (await job(studio, job_id)).cost
    assert cost == pytest.approx(448 * 256 / 1024**2, abs=1e-4)  # 30 steps at 448×256: 0.11 units
    inter = await studio.command(member, "quota")
    after = quota_numbers(inter.response.content or "")
    assert after["Limit"] == f"{limit:.2f} units"
    assert after["Used"] == f"{cost:.2f} units"
    assert after["Remaining"] == f"{limit - cost:.2f} units"
    # Resets: a Discord relative timestamp one window after the charge.
    stamp = re.fullmatch(r"<t:(\d+):R>", after["Resets"])
    assert stamp is not None, after["Resets"]
    window = studio.bot.settings.quota.window_hours * 3600
    assert started + window - 5 <= int(stamp[1]) <= time.time() + window + 5
    assert await used(studio, member) == pytest.approx(cost)


async def test_quota_of_a_moderator_is_unlimited(studio: Studio) -> None:
    inter = await studio.command(studio.mod, "quota")
    shown = quota_numbers(inter.response.content or "")
    assert shown["Limit"] == "unlimited" and shown["Remaining"] == "unlimited"


# ---------------------------------------------------------------------------------------- /queue
async def test_queue_shows_only_my_jobs_with_positions_and_eta(studio: Studio) -> None:
    me, someone = studio.new_member("queuer"), studio.new_member("queue-neighbour")
    empty = await studio.command(me, "queue")
    assert_refused(empty, "no queued or running jobs")

    scheduler = studio.bot.wiring.scheduler
    scheduler.pause()
    try:
        cards = [await studio.command(me, "generate", {"prompt": f"mine {i}", "steps": 1}) for i in (1, 2)]
        mine = [assert_queued(card) for card in cards]
        # The queue card shows the position (also the first), the job id and the cost.
        for position, (card, job_id) in enumerate(zip(cards, mine, strict=True), start=1):
            content = card.response.content or ""  # type: ignore[union-attr]
            assert f"position {position}" in content and f"Job `{job_id}`" in content, content
            assert re.search(r"Cost \d+\.\d\d units", content), content
        theirs = assert_queued(await studio.command(someone, "generate", {"prompt": "theirs", "steps": 1}))
        inter = await studio.command(me, "queue")
        assert inter.response is not None and inter.response.ephemeral
        lines = (inter.response.content or "").splitlines()
        assert len(lines) == 2 and theirs not in inter.response.content
        for job_id, line in zip(mine, lines, strict=True):
            assert job_id in line and "Generate" in line
            assert f"position {scheduler.position(job_id)}" in line
            assert re.search(r"ETA ~\d+ (s|min)", line), line
    finally:
        scheduler.resume()
    for job_id in [*mine, theirs]:
        await studio.result_of(job_id)
    assert_refused(await studio.command(me, "queue"), "no queued or running jobs")


async def test_queue_cards_further_back_are_edited_less_often(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card is edited at most every EDIT_INTERVAL × position seconds: Discord's request budget
    is shared by every card of a long queue."""
    monkeypatch.setattr(delivery, "EDIT_INTERVAL", 0.4)
    members = [studio.new_member(f"far-{i}") for i in range(4)]
    scheduler = studio.bot.wiring.scheduler
    scheduler.pause()
    try:
        cards = [await studio.command(m, "generate", {"prompt": f"far {i}", "steps": 2}) for i, m in enumerate(members)]
        ids = [assert_queued(card) for card in cards]
        assert [scheduler.position(job_id) for job_id in ids] == [1, 2, 3, 4]
        assert_refused(await studio.command(members[0], "cancel", {"job": ids[0]}), "Cancelling")
        # Each card moved up one place; the one now 3rd may be edited 1.2 s after its last edit.
        moved = []
        for card, position in zip(cards[1:], (1, 2, 3), strict=True):
            message = await wait_status(studio, card, f"Queued · position {position}", timeout=20)
            assert message.edited_at is not None
            moved.append((message.edited_at - message.created_at).total_seconds())
            assert moved[-1] >= 0.4 * position - 0.1, (position, moved)
    finally:
        scheduler.resume()
    for job_id in ids[1:]:
        await studio.result_of(job_id)


# ---------------------------------------------------------------------------------------- /cancel
async def test_cancel_autocomplete_and_cancelling_a_queued_job(studio: Studio) -> None:
    me, other = studio.new_member("cancel-me"), studio.new_member("cancel-other")
    scheduler = studio.bot.wiring.scheduler
    scheduler.pause()
    try:
        cards = [await studio.command(me, "generate", {"prompt": f"draft {i}", "steps": 2}) for i in (1, 2)]
        mine = [assert_queued(card) for card in cards]
        theirs = assert_queued(await studio.command(other, "generate", {"prompt": "not yours", "steps": 2}))

        choices = await studio.sb.autocomplete(me, studio.channel, "cancel", {"job": ""}, focused="job")
        assert [c["value"] for c in choices] == mine
        assert all("draft" in c["name"] for c in choices)
        narrowed = await studio.sb.autocomplete(me, studio.channel, "cancel", {"job": mine[1][:5]}, focused="job")
        assert [c["value"] for c in narrowed] == [mine[1]]

        # Not someone else's job, and nothing happens to it.
        refused = await studio.command(me, "cancel", {"job": theirs})
        assert_refused(refused, "only cancel your own")
        assert (await job(studio, theirs)).status == "queued"
        assert_refused(await studio.command(me, "cancel", {"job": "ZZZZZZZZ"}), "There is no job")

        cost = (await job(studio, mine[0])).cost
        inter = await studio.command(me, "cancel", {"job": mine[0].lower()})  # ids are read loosely
        assert_refused(inter, f"Cancelling job `{mine[0]}`", "refunded")
        status = await wait_status(studio, cards[0], "Cancelled")
        assert mine[0] in status.content and status.components == []
        assert (await job(studio, mine[0])).status == "cancelled"
        assert [(k, j) for k, _, j in await ledger(studio, me) if j == mine[0]] == [
            ("reserve", mine[0]),
            ("refund", mine[0]),
        ]
        assert await used(studio, me) == pytest.approx(cost)  # only the other job still counts
        remaining = await studio.sb.autocomplete(me, studio.channel, "cancel", {"job": ""}, focused="job")
        assert [c["value"] for c in remaining] == [mine[1]]
    finally:
        scheduler.resume()
    await studio.result_of(mine[1])
    await studio.result_of(theirs)
    done = await studio.command(me, "cancel", {"job": mine[1]})
    assert_refused(done, "already ended")


async def test_cancel_a_running_job(studio: Studio) -> None:
    me = studio.new_member("impatient")
    # Long enough to be caught running: 4 images × 60 steps.
    card = await studio.command(me, "generate", {"prompt": "a slow one", "steps": 60, "count": 4, "aspect": "16:9"})
    job_id = assert_queued(card)
    await wait_status(studio, card, "Running")

    inter = await studio.command(me, "queue")
    assert job_id in (inter.response.content or "") and "running" in (inter.response.content or "")

    cost = (await job(studio, job_id)).cost
    inter = await studio.command(me, "cancel", {"job": job_id})
    assert_refused(inter, f"Cancelling job `{job_id}`")
    status = await wait_status(studio, card, "Cancelled", timeout=30)
    assert f"{cost:.2f} units refunded" in status.content
    assert status.attachments == []  # the last preview is gone too
    assert (await job(studio, job_id)).status == "cancelled"
    assert await ledger(studio, me) == [("reserve", cost, job_id), ("refund", cost, job_id)]
    assert await used(studio, me) == 0
    assert not [m for m in studio.sb.channel_messages(studio.channel) if m.attachments and job_id in str(m.embeds)]


# ---------------------------------------------------------------------------------------- /job
async def test_job_reposts_a_finished_result_with_working_buttons(studio: Studio) -> None:
    owner, clicker = studio.new_member("archivist"), studio.new_member("visitor")
    job_id, original = await generate(studio, owner, {"prompt": "an old map", "steps": 1, "count": 2})

    inter = await studio.command(clicker, "job", {"id": job_id})
    repost = await inter.wait_original(lambda m: bool(m.attachments) and not m.loading, timeout=10)
    assert not repost.ephemeral
    assert labels(repost) == labels(original) == ["U1", "U2", "V1", "V2", "Reroll", "Delete"]
    assert [pixels(studio.sb, a) for a in repost.attachments] == [pixels(studio.sb, a) for a in original.attachments]
    assert repost.embeds[0]["description"] == "an old map"
    assert fields(repost)["Job"] == job_id and fields(repost)["Seeds"] == fields(original)["Seeds"]

    # A button on the re-post works like one on the original: a job for the clicker.
    child_id = assert_queued(await studio.click(clicker, repost, "U2"))
    child = await job(studio, child_id)
    assert child.owner_id == clicker.id and child.params["parent"] == {"job": job_id, "index": 1, "action": "upscale"}
    await studio.result_of(child_id)

    assert_refused(await studio.command(clicker, "job", {"id": "ZZZZZZZZ"}), "There is no job")


async def test_job_repost_follows_the_safety_rule_of_the_channel_it_is_posted_in(studio: Studio) -> None:
    """A result made in an age-restricted channel and re-posted with /job in a normal channel is
    judged by the normal channel's rule. The tiny model only draws noise, which nudenet never
    flags, so here the classifier's verdict is replaced by "explicit" for the re-post."""
    member = studio.new_member("night-owl")
    job_id, original = await generate(studio, member, {"prompt": "after dark", "steps": 1}, channel=studio.nsfw)
    assert original.channel_id == studio.nsfw.id and len(original.attachments) == 1

    safety = studio.bot.wiring.safety
    explicit = SafetyVerdict(explicit=True, score=0.9, labels=["FEMALE_BREAST_EXPOSED"])

    async def flags_everything(image_bytes: bytes) -> SafetyVerdict:
        return explicit

    safety.check = flags_everything  # type: ignore[method-assign]
    try:
        inter = await studio.command(member, "job", {"id": job_id})  # in the normal channel
        repost = await inter.wait_original(lambda m: not m.loading and bool(m.embeds), timeout=10)
    finally:
        del safety.check  # back to the class's method
    assert repost.channel_id == studio.channel.id
    assert repost.attachments == [] and "withheld" in fields(repost).get("Note", "")


async def test_job_refuses_a_job_that_has_not_finished(studio: Studio) -> None:
    member = studio.new_member("early-bird")
    scheduler = studio.bot.wiring.scheduler
    scheduler.pause()
    try:
        job_id = assert_queued(await studio.command(member, "generate", {"prompt": "soon", "steps": 1}))
        assert_refused(await studio.command(member, "job", {"id": job_id}), "queued", "finished")
    finally:
        scheduler.resume()
    await studio.result_of(job_id)


# ---------------------------------------------------------------------------------------- /model
async def test_model_list_use_and_generate_with_it(studio: Studio) -> None:
    member = studio.new_member("picky")
    listing = await studio.command(member, "model list")
    assert listing.response is not None and listing.response.ephemeral
    lines = (listing.response.content or "").splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("• `tiny`") and "server default" in lines[0] and "your default" not in lines[0]
    assert lines[1].startswith("• `tiny-base`") and "default" not in lines[1].split(":", 1)[0]

    used_model = await studio.command(member, "model use", {"name": "tiny-base"})
    assert_refused(used_model, "tiny-base")
    listing = await studio.command(member, "model list")
    lines = (listing.response.content or "").splitlines()
    assert "your default" in lines[1] and "server default" in lines[0] and "your default" not in lines[0]

    job_id, result = await generate(studio, member, {"prompt": "a lamp", "steps": 1})
    assert fields(result)["Model"] == "tiny-base"
    assert (await job(studio, job_id)).params["model"] == "tiny-base"
    # Another member still gets the server default.
    _, theirs = await generate(studio, studio.new_member("not-picky"), {"prompt": "a lamp", "steps": 1})
    assert fields(theirs)["Model"] == "tiny"


async def test_model_info_and_unknown_names(studio: Studio) -> None:
    member = studio.new_member("curious")
    inter = await studio.command(member, "model info", {"name": "tiny"})
    assert inter.response is not None and inter.response.ephemeral
    embed = inter.response.embeds[0]
    assert embed["title"] == "tiny"
    info = {f["name"]: f["value"] for f in embed["fields"]}
    assert info == {"Base": "`base`", "Refiner": "`refiner`", "Default": "yes"}
    assert "random-weight" in embed.get("description", "")
    base = await studio.command(member, "model info", {"name": "tiny-base"})
    info = {f["name"]: f["value"] for f in base.response.embeds[0]["fields"]}
    assert info["Refiner"] == "none" and info["Default"] == "no"

    choices = await studio.sb.autocomplete(member, studio.channel, "model use", {"name": "ti"}, focused="name")
    assert [c["value"] for c in choices] == ["tiny", "tiny-base"]

    for command in ("model use", "model info"):
        refused = await studio.command(member, command, {"name": "sdxl-turbo"})
        assert_refused(refused, "no model `sdxl-turbo`", "`tiny`")
    assert await studio.bot.wiring.moderation.get_user_default_model(member.id) is None
