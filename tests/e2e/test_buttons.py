"""The buttons on results and queue cards, clicked by the owner and by other members: each click
starts a job for the clicker, charged to the clicker, on the right image."""

from __future__ import annotations

import pytest

from engine import validate
from studio.harness import Studio
from tests.e2e.member_kit import (
    EDITING_BUTTONS,
    assert_queued,
    assert_refused,
    fields,
    generate,
    job,
    labels,
    ledger,
    sizes,
    used,
    wait_status,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

SETTINGS = {
    "prompt": "a paper boat on a pond",
    "negative": "people",
    "aspect": "4:5",
    "steps": 2,
    "cfg": 6.0,
    "sampler": "euler",
    "seed": 77,
    "refiner": False,
}


def prepared(studio: Studio, data: bytes, *, upscale: bool) -> tuple[bytes, tuple[int, int]]:
    """What the bot makes of a parent image for a derived job (see engine.validate)."""
    gen = studio.bot.settings.generation
    return validate.prepare_input_image(
        data,
        max_bytes=gen.max_attachment_bytes,
        max_pixels=gen.max_attachment_pixels,
        upscale_factor=2 if upscale else None,
        upscale_max_side=gen.upscale_max_side,
    )


async def test_reroll_keeps_every_setting_but_the_seed(studio: Studio) -> None:
    owner = studio.new_member("reroller")
    parent_id, parent = await generate(studio, owner, SETTINGS)
    click = await studio.click(owner, parent, "Reroll")
    child_id = assert_queued(click)
    assert child_id != parent_id
    child = await studio.result_of(child_id)

    before, after = fields(parent), fields(child)
    assert after.pop("Seed") != before.pop("Seed")
    for name in ("Job", "Time"):
        before.pop(name), after.pop(name)
    assert after == before  # negative, model, sampler, steps, cfg, size: all the same
    assert child.embeds[0]["description"] == SETTINGS["prompt"]
    assert sizes(studio.sb, child) == [(256, 320)]

    parent_rec, child_rec = await job(studio, parent_id), await job(studio, child_id)
    assert child_rec.owner_id == owner.id and child_rec.kind == "text2img"
    assert child_rec.params["parent"] == {"job": parent_id, "action": "reroll"}
    same = {k: v for k, v in child_rec.params.items() if k not in ("seed", "parent")}
    assert same == {k: v for k, v in parent_rec.params.items() if k != "seed"}
    assert child_rec.params["seed"] != parent_rec.params["seed"]
    kinds = [(k, j) for k, _, j in await ledger(studio, owner)]
    assert kinds == [("reserve", parent_id), ("commit", parent_id), ("reserve", child_id), ("commit", child_id)]


async def test_a_click_by_another_member_is_their_job_on_their_quota(studio: Studio) -> None:
    owner, other = studio.new_member("painter"), studio.new_member("admirer")
    _, parent = await generate(studio, owner, {"prompt": "a snail", "steps": 1})
    owner_ledger = await ledger(studio, owner)

    reroll = await studio.click(other, parent, "Reroll")
    reroll_id = assert_queued(reroll)
    upscale = await studio.click(other, parent, "Upscale")
    upscale_id = assert_queued(upscale)
    for child_id in (reroll_id, upscale_id):
        result = await studio.result_of(child_id)
        assert f"<@{other.id}>" in result.content  # the result is the clicker's
        record = await job(studio, child_id)
        assert record.owner_id == other.id and record.status == "done"

    assert await ledger(studio, owner) == owner_ledger  # the owner pays nothing for it
    charged = {j for k, _, j in await ledger(studio, other) if k == "commit"}
    assert charged == {reroll_id, upscale_id}
    costs = [(await job(studio, j)).cost for j in (reroll_id, upscale_id)]
    assert await used(studio, other) == pytest.approx(sum(costs))


async def test_upscale_doubles_the_size(studio: Studio) -> None:
    owner = studio.new_member("upscaler")
    parent_id, parent = await generate(studio, owner, {**SETTINGS, "aspect": "16:9"})
    child_id = assert_queued(await studio.click(owner, parent, "Upscale"))
    child = await studio.result_of(child_id)
    assert sizes(studio.sb, child) == [(896, 512)]
    f = fields(child)
    assert f["Size"] == "896×512" and f["Seed"] == "77" and f["Strength"] == "0.3"
    assert child.embeds[0]["author"]["name"].startswith("Upscale")
    assert labels(child) == ["Reroll", "Upscale", "Variations", "Refine", "Delete", *EDITING_BUTTONS]
    record = await job(studio, child_id)
    assert record.kind == "upscale" and record.params["parent"] == {"job": parent_id, "index": 0, "action": "upscale"}
    assert record.params["input_size"] == [448, 256]


async def test_variations_button_makes_four_images_sized_as_the_engine_fits_them(studio: Studio) -> None:
    owner = studio.new_member("varier")
    parent_id, parent = await generate(studio, owner, {"prompt": "a cactus", "steps": 1})
    child_id = assert_queued(await studio.click(owner, parent, "Variations"))
    child = await studio.result_of(child_id)
    fitted = validate.fit_size(256, 256)
    assert sizes(studio.sb, child) == [fitted] * 4
    assert labels(child) == ["U1", "U2", "U3", "U4", "V1", "V2", "V3", "V4", "Reroll", "Delete"]
    assert fields(child)["Size"] == f"{fitted[0]}×{fitted[1]}"
    record = await job(studio, child_id)
    assert record.kind == "variations" and record.params["count"] == 4
    assert record.params["parent"] == {"job": parent_id, "index": 0, "action": "variations"}
    assert len(set(record.seeds)) == 4


async def test_refine_button_refines_the_image(studio: Studio) -> None:
    owner = studio.new_member("refiner")
    parent_id, parent = await generate(studio, owner, {"prompt": "a teapot", "steps": 1, "aspect": "16:9"})
    child_id = assert_queued(await studio.click(owner, parent, "Refine"))
    child = await studio.result_of(child_id)
    fitted = validate.fit_size(448, 256)
    assert sizes(studio.sb, child) == [fitted]
    f = fields(child)
    assert f["Strength"] == "0.3" and f["Size"] == f"{fitted[0]}×{fitted[1]}"
    assert child.embeds[0]["description"] == "a teapot"
    record = await job(studio, child_id)
    assert record.kind == "refine" and record.params["parent"]["job"] == parent_id


async def test_grid_buttons_each_use_their_own_image(studio: Studio) -> None:
    owner = studio.new_member("gridder")
    parent_id, parent = await generate(studio, owner, {"prompt": "four pears", "steps": 1, "count": 4, "seed": 500})
    parent_bytes = [studio.sb.file_bytes(a) for a in parent.attachments]
    # Three clickers so the per-member queue cap (3) never refuses a click.
    clickers = [studio.new_member(f"grid-clicker-{i}") for i in range(3)]
    buttons = [f"U{i}" for i in range(1, 5)] + [f"V{i}" for i in range(1, 5)]
    scheduler = studio.bot.wiring.scheduler
    started = {}
    scheduler.pause()  # all eight stay queued: the V jobs are checked, then cancelled (1 MP each is slow)
    try:
        for n, label in enumerate(buttons):
            started[label] = assert_queued(await studio.click(clickers[n // 3], parent, label))

        outputs = studio.bot.wiring.outputs
        for label, child_id in started.items():
            index = int(label[1]) - 1
            upscale = label[0] == "U"
            record = await job(studio, child_id)
            action = "upscale" if upscale else "variations"
            assert record.params["parent"] == {"job": parent_id, "index": index, "action": action}
            # The job works on image `index` of the grid, exactly as the bot prepares it.
            png, size = prepared(studio, parent_bytes[index], upscale=upscale)
            assert outputs.input_path(child_id).read_bytes() == png, label
            assert record.params["input_size"] == list(size)
            if upscale:
                assert record.params["seed"] == 500 + index  # the seed of that image
            else:
                assert await scheduler.cancel(child_id)
    finally:
        scheduler.resume()

    for label, child_id in started.items():
        if label[0] == "U":
            result = await studio.result_of(child_id)
            assert sizes(studio.sb, result) == [(512, 512)]
            assert (await job(studio, child_id)).status == "done"
        else:
            assert (await job(studio, child_id)).status == "cancelled"


async def test_delete_by_owner_other_member_and_moderator(studio: Studio) -> None:
    owner, other = studio.new_member("deleter"), studio.new_member("bystander")
    _, first = await generate(studio, owner, {"prompt": "a draft", "steps": 1, "count": 2})
    _, second = await generate(studio, owner, {"prompt": "another draft", "steps": 1})

    refused = await studio.click(other, first, "Delete")
    assert_refused(refused, "Only the person who asked")
    assert not first.deleted and first in studio.sb.channel_messages(studio.channel)

    # Acknowledged silently; the message goes and an ephemeral note says so.
    mine = await studio.click(owner, first, "Delete")
    await studio.sb.wait_until(lambda: first.deleted, timeout=5)
    (note,) = await mine.wait_followups(1)
    assert "Deleted" in note.content and note.ephemeral

    moderated = await studio.click(studio.mod, second, "Delete")
    await studio.sb.wait_until(lambda: second.deleted, timeout=5)
    (note,) = await moderated.wait_followups(1)
    assert "Deleted" in note.content and note.ephemeral


async def test_cancel_on_the_queue_card_refunds_the_owner(studio: Studio) -> None:
    owner, other = studio.new_member("canceller"), studio.new_member("meddler")
    scheduler = studio.bot.wiring.scheduler
    scheduler.pause()  # keep the job queued while we click
    try:
        inter = await studio.command(owner, "generate", {"prompt": "never mind", "steps": 2})
        job_id = assert_queued(inter)
        card = inter.original
        assert card is not None and labels(card) == ["Cancel"]
        cost = (await job(studio, job_id)).cost

        refused = await studio.click(other, card, "Cancel")
        assert_refused(refused, "only cancel your own")
        assert (await job(studio, job_id)).status == "queued"

        click = await studio.click(owner, card, "Cancel")
        assert_refused(click, job_id, "refunded")
        status = await wait_status(studio, inter, "Cancelled")
        assert job_id in status.content and "refunded" in status.content
        assert status.components == []
    finally:
        scheduler.resume()
    record = await job(studio, job_id)
    assert record.status == "cancelled"
    assert await ledger(studio, owner) == [("reserve", cost, job_id), ("refund", cost, job_id)]
    assert await used(studio, owner) == 0
    assert await ledger(studio, other) == []
