"""A bot restart in the middle of work: one bot is stopped (as SIGTERM would, with no grace) while
jobs are queued and running, and a new bot starts over the same database, output folder and
Discord server. Every job finishes exactly once, results left unposted are posted, and buttons
on messages of the first bot work in the second."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from db.moderation import EVERYWHERE
from sandbox import Sandbox
from studio.harness import Studio, build_world, open_bot, tiny_settings
from tests.e2e.member_kit import assert_queued, generate, results_for, wait_status

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


async def test_jobs_survive_a_restart_and_old_buttons_keep_working(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_model_dir, tmp_path)
    sb = await Sandbox().start()
    world: dict[str, Any] = build_world(sb)
    alice, bob = world["alice"], world["bob"]
    carol = sb.add_user("carol")
    sb.add_member(world["guild"], carol)
    cards = {}
    try:
        # ------------------------------------------------------------ the first bot
        async with open_bot(sb, settings) as first:
            await sb.wait_for_commands("generate", "mod")
            studio = Studio(sb=sb, bot=first, **world)
            posted_id, posted = await generate(studio, alice, {"prompt": "before the restart", "steps": 1})

            # A job that ends "done" but whose result the bot never gets to post.
            delivery = first.wiring.delivery
            real_post, reached = delivery.post_result, asyncio.Event()

            async def never_posts(record: Any, result: Any, *, status_message_id: int | None) -> Any:
                if record.params.get("prompt") == "done but never posted":
                    reached.set()
                    await asyncio.Event().wait()  # until the bot stops
                return await real_post(record, result, status_message_id=status_message_id)

            delivery.post_result = never_posts  # type: ignore[method-assign]
            unposted = await studio.command(bob, "generate", {"prompt": "done but never posted", "steps": 1})
            unposted_id = assert_queued(unposted)
            await asyncio.wait_for(reached.wait(), 60)

            # Then a long job (running when the bot stops) and three queued behind it.
            for name, member, options in [
                ("running", alice, {"prompt": "interrupted", "steps": 60, "count": 2, "aspect": "16:9"}),
                ("queued-1", alice, {"prompt": "waiting one", "steps": 2}),
                ("queued-2", bob, {"prompt": "waiting two", "steps": 2, "count": 2}),
                ("queued-3", carol, {"prompt": "waiting three", "steps": 2}),
            ]:
                cards[name] = await studio.command(member, "generate", options)
            ids = {name: assert_queued(card) for name, card in cards.items()}
            await wait_status(studio, cards["running"], "Running")
            # Paused by a moderator as it stops: the pause is stored and outlives the restart.
            await first.wiring.set_paused(EVERYWHERE, True)  # the operator's pause
        # Leaving the block shut the first bot down with no grace: the running job was requeued.
        assert not results_for(studio, ids["running"])

        # ------------------------------------------------------------ the second bot
        async with open_bot(sb, settings) as second:
            studio = Studio(sb=sb, bot=second, **world)
            jobs = second.wiring.jobs

            # The unposted result is posted, replying to its status message; the others run.
            late = await studio.result_of(unposted_id, timeout=60)
            assert late.reference is not None and int(late.reference["message_id"]) == unposted.original.id
            assert f"<@{bob.id}>" in late.content and len(late.attachments) == 1
            await wait_status(studio, unposted, "Done")

            # The second bot starts paused; the Cancel button on a card of the first bot works.
            assert second.wiring.scheduler.paused
            assert {v.job_id for v in second.wiring.scheduler.snapshot()} == set(ids.values())
            cancel = await studio.click(carol, cards["queued-3"].original, "Cancel")
            assert "Cancelling" in (cancel.response.content or "") and cancel.response.ephemeral
            await wait_status(studio, cards["queued-3"], "Cancelled")
            cancelled_id = ids.pop("queued-3")
            every = {"posted": posted_id, "unposted": unposted_id, **ids}
            await second.wiring.set_paused(EVERYWHERE, False)

            for name in ids:
                await studio.result_of(ids[name], timeout=120)
                await wait_status(studio, cards[name], "Done")

            # A button on a message the first bot posted works in the second.
            reroll = await studio.click(carol, posted, "Reroll")
            reroll_id = assert_queued(reroll)
            await studio.result_of(reroll_id)
            assert (await jobs.get(reroll_id)).owner_id == carol.id  # type: ignore[union-attr]
            every["reroll"] = reroll_id

            async def posted_and_recorded() -> bool:
                # The result message's id is stored right after the post the test just saw.
                found = [await jobs.get(job_id) for job_id in every.values()]
                return all(r is not None and r.result_message_id is not None for r in found)

            for _ in range(200):
                if await posted_and_recorded():
                    break
                await asyncio.sleep(0.05)
            records = {name: await jobs.get(job_id) for name, job_id in every.items()}
            for name, record in records.items():
                assert record is not None and record.status == "done", name
                assert record.result_message_id is not None, name
            assert records["running"].attempts == 2  # type: ignore[union-attr]
            assert all(r.attempts == 1 for n, r in records.items() if n != "running")  # type: ignore[union-attr]

            # Ledger balanced: each job charged once and committed once, nothing refunded.
            entries = []
            for member in (alice, bob, carol):
                entries += await second.wiring.quotas.ledger(world["guild"].id, member.id)
            for name, job_id in every.items():
                kinds = sorted(e.kind for e in entries if e.job_id == job_id)
                assert kinds == ["commit", "reserve"], (name, kinds)
            cancelled = sorted(e.kind for e in entries if e.job_id == cancelled_id)
            assert cancelled == ["refund", "reserve"]
            assert (await jobs.get(cancelled_id)).status == "cancelled"  # type: ignore[union-attr]
            assert {e.kind for e in entries} == {"reserve", "commit", "refund"}

        # Everything settled and both bots are gone: exactly one result message per job.
        for name, job_id in every.items():
            assert len(results_for(studio, job_id)) == 1, name
        assert results_for(studio, cancelled_id) == []
    finally:
        await sb.stop()
