"""/generate through the real bot, option by option: what the member sees on the result (images,
embed, buttons) and what the bot recorded (job row, quota ledger)."""

from __future__ import annotations

import re

import pytest

from engine.jobs import Text2Img
from engine.options import SAMPLER_LABELS as SAMPLER_NAMES
from engine.options import SAMPLERS
from studio.harness import Studio
from tests.e2e.member_kit import (
    EDITING_BUTTONS,
    assert_nothing_charged,
    assert_queued,
    assert_refused,
    fields,
    generate,
    image,
    job,
    labels,
    ledger,
    pixels,
    sizes,
    used,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]


async def test_every_option_shows_on_the_result_and_in_the_job(studio: Studio) -> None:
    member = studio.new_member("everything")
    options = {
        "prompt": "a lighthouse at dusk, oil painting",
        "negative": "blurry, text",
        "aspect": "4:5",
        "steps": 3,
        "cfg": 5.5,
        "seed": 123456,
        "sampler": "euler_a",
        "count": 2,
        "model": "tiny",
        "refiner": False,
    }
    job_id, result = await generate(studio, member, options)

    # What the member sees: two 256×320 images, every setting in the embed, the grid buttons.
    assert len(result.attachments) == 2
    assert sizes(studio.sb, result) == [(256, 320), (256, 320)]
    assert labels(result) == ["U1", "U2", "V1", "V2", "Reroll", "Delete"]
    embed = result.embeds[0]
    assert embed["description"] == options["prompt"]
    f = fields(result)
    assert f["Negative"] == "blurry, text"
    assert f["Seeds"] == "123456, 123457"
    assert f["Model"] == "tiny"
    assert f["Sampler"] == SAMPLER_NAMES["euler_a"]
    assert f["Steps"] == "3"
    assert f["CFG"] == "5.5"
    assert f["Size"] == "256×320"
    assert f["Job"] == job_id
    assert re.fullmatch(r"\d+(\.\d+)? s|\d+ min \d\d s", f["Time"]), f["Time"]
    assert f"<@{member.id}>" in result.content
    # The images carry the same settings (A1111-style PNG info) and their own seeds.
    info = image(studio.sb, result.attachments[1]).info["parameters"]
    assert "Negative prompt: blurry, text" in info and "Seed: 123457" in info and "Sampler: Euler a" in info

    # What the bot recorded: the job with these exact parameters, charged once and committed.
    record = await job(studio, job_id)
    assert record.status == "done" and record.kind == "text2img" and record.owner_id == member.id
    p = record.params
    assert (p["width"], p["height"], p["steps"], p["cfg"], p["seed"]) == (256, 320, 3, 5.5, 123456)
    assert (p["sampler"], p["count"], p["model"], p["refiner"]) == ("euler_a", 2, "tiny", False)
    assert record.seeds == [123456, 123457]
    cost = Text2Img(job_id="x", width=256, height=320, steps=3, count=2).cost()
    assert record.cost == pytest.approx(cost)
    assert await ledger(studio, member) == [("reserve", cost, job_id), ("commit", cost, job_id)]
    assert await used(studio, member) == pytest.approx(cost)


async def test_defaults_fill_every_option_left_out(studio: Studio) -> None:
    member = studio.new_member("defaults")
    job_id, result = await generate(studio, member, {"prompt": "a quiet harbour"})
    f = fields(result)
    assert "Negative" not in f
    assert f["Steps"] == "4"  # the studio's default_steps
    assert f["CFG"] == "7"
    assert f["Sampler"] == SAMPLER_NAMES["dpmpp_2m_karras"]
    assert f["Size"] == "256×256"  # the first aspect
    assert f["Model"] == "tiny"
    assert labels(result) == ["Reroll", "Upscale", "Variations", "Refine", "Delete", *EDITING_BUTTONS]
    record = await job(studio, job_id)
    assert record.params["refiner"] is True  # on by default when the model has one
    assert 0 <= record.params["seed"] < 2**32 and f["Seed"] == str(record.params["seed"])


async def test_each_aspect_gives_its_configured_size(studio: Studio) -> None:
    member = studio.new_member("aspects")
    aspects = studio.bot.settings.generation.aspect_sizes()
    assert len(aspects) == 3  # per-user cap is 3: all queue at once
    inters = {
        name: await studio.command(member, "generate", {"prompt": f"aspect {name}", "aspect": name, "steps": 1})
        for name in aspects
    }
    for name, inter in inters.items():
        result = await studio.result_of(assert_queued(inter))
        width, height = aspects[name]
        assert [(a.width, a.height) for a in result.attachments] == [(width, height)]
        assert sizes(studio.sb, result) == [(width, height)]
        assert fields(result)["Size"] == f"{width}×{height}"


async def test_same_seed_gives_the_same_image_and_batch_image_i_is_seed_plus_i(studio: Studio) -> None:
    member = studio.new_member("seeds")
    common = {"prompt": "a red fox in snow", "steps": 2, "refiner": False}
    _, first = await generate(studio, member, {**common, "seed": 41, "count": 2})
    _, again = await generate(studio, member, {**common, "seed": 41, "count": 2})
    _, alone = await generate(studio, member, {**common, "seed": 42})
    a = [pixels(studio.sb, x) for x in first.attachments]
    b = [pixels(studio.sb, x) for x in again.attachments]
    assert a == b  # same seed: the very same pixels
    assert a[0] != a[1]  # the two images of a batch differ
    assert pixels(studio.sb, alone.attachments[0]) == a[1]  # image 2 of seed 41 is seed 42 alone


async def test_all_six_samplers(studio: Studio) -> None:
    members = [studio.new_member("sampler-a"), studio.new_member("sampler-b")]
    assert len(SAMPLERS) == 6
    inters = {}
    for i, sampler in enumerate(SAMPLERS):
        inters[sampler] = await studio.command(
            members[i % 2], "generate", {"prompt": "a tin robot", "seed": 5, "steps": 2, "sampler": sampler}
        )
    images = {}
    for sampler, inter in inters.items():
        job_id = assert_queued(inter)
        result = await studio.result_of(job_id)
        assert fields(result)["Sampler"] == SAMPLER_NAMES[sampler]
        assert (await job(studio, job_id)).params["sampler"] == sampler
        images[sampler] = pixels(studio.sb, result.attachments[0])
    # The sampler really reaches the pipeline: same seed and steps, six different images.
    assert len(set(images.values())) == 6


@pytest.mark.parametrize("count", [1, 2, 3, 4])
async def test_count_gives_that_many_images_and_the_contract_buttons(studio: Studio, count: int) -> None:
    member = studio.new_member(f"count-{count}")
    job_id, result = await generate(studio, member, {"prompt": "pebbles", "steps": 1, "count": count})
    assert len(result.attachments) == count
    assert len({a.filename for a in result.attachments}) == count
    if count == 1:
        assert labels(result) == ["Reroll", "Upscale", "Variations", "Refine", "Delete", *EDITING_BUTTONS]
    else:
        ups = [f"U{i}" for i in range(1, count + 1)]
        vs = [f"V{i}" for i in range(1, count + 1)]
        assert labels(result) == [*ups, *vs, "Reroll", "Delete"]
        seeds = [int(s) for s in fields(result)["Seeds"].split(", ")]
        assert seeds == [seeds[0] + i for i in range(count)]
    # Buttons carry their emoji in the emoji field, never in the label.
    for button in result.buttons:
        assert re.fullmatch(r"[A-Za-z0-9]+( [A-Za-z0-9]+)*", button["label"]), button  # "Pan Left"
    assert (await job(studio, job_id)).params["count"] == count


async def test_model_autocomplete_lists_the_configured_models(studio: Studio) -> None:
    member = studio.new_member("typist")
    everything = await studio.sb.autocomplete(
        member, studio.channel, "generate", {"prompt": "x", "model": ""}, focused="model"
    )
    assert [c["value"] for c in everything] == list(studio.bot.settings.models)
    assert [c["value"] for c in everything] == ["tiny", "tiny-base"]
    narrowed = await studio.sb.autocomplete(
        member, studio.channel, "generate", {"prompt": "x", "model": "BAS"}, focused="model"
    )
    assert [c["value"] for c in narrowed] == ["tiny-base"]


async def test_model_option_picks_the_model_and_the_refiner_follows_it(studio: Studio) -> None:
    member = studio.new_member("modeller")
    base_id, base_result = await generate(studio, member, {"prompt": "a kettle", "model": "tiny-base", "steps": 2})
    assert fields(base_result)["Model"] == "tiny-base"
    assert (await job(studio, base_id)).params["refiner"] is False  # no refiner: off by default
    assert "Refiner" not in image(studio.sb, base_result.attachments[0]).info["parameters"]

    on_id, on_result = await generate(studio, member, {"prompt": "a kettle", "refiner": True, "steps": 2, "seed": 9})
    off_id, off_result = await generate(studio, member, {"prompt": "a kettle", "refiner": False, "steps": 2, "seed": 9})
    assert (await job(studio, on_id)).params["refiner"] is True
    assert (await job(studio, off_id)).params["refiner"] is False
    assert "Refiner: " in image(studio.sb, on_result.attachments[0]).info["parameters"]
    assert "Refiner: " not in image(studio.sb, off_result.attachments[0]).info["parameters"]
    # The refiner takes the last steps: the same seed gives a different image without it.
    assert pixels(studio.sb, on_result.attachments[0]) != pixels(studio.sb, off_result.attachments[0])


async def test_refiner_on_a_model_without_one_is_refused_and_nothing_is_charged(studio: Studio) -> None:
    member = studio.new_member("no-refiner")
    inter = await studio.command(member, "generate", {"prompt": "a kettle", "model": "tiny-base", "refiner": True})
    text = assert_refused(inter, "tiny-base", "refiner")
    assert "False" in text or "leave" in text  # says what to change
    assert inter.response_latency is not None and inter.response_latency < 3.0
    await assert_nothing_charged(studio, member)


async def test_unknown_model_is_refused_and_nothing_is_charged(studio: Studio) -> None:
    member = studio.new_member("typo")
    inter = await studio.command(member, "generate", {"prompt": "a kettle", "model": "sdxl-turbo"})
    assert_refused(inter, "sdxl-turbo", "`tiny`", "`tiny-base`")
    await assert_nothing_charged(studio, member)


async def test_a_1500_character_prompt_is_shown_verbatim_and_a_long_negative_cut_at_its_end(
    studio: Studio,
) -> None:
    member = studio.new_member("verbose")
    words = [f"word{i}" for i in range(400)]
    prompt = " ".join(words)[:1500].rstrip()
    prompt = prompt + "x" * (1500 - len(prompt))
    negative = ("no " + " ".join(reversed(words)))[:1500]
    assert len(prompt) == 1500 and len(negative) == 1500
    job_id, result = await generate(studio, member, {"prompt": prompt, "negative": negative, "steps": 1})
    embed = result.embeds[0]
    assert embed["description"] == prompt  # fits an embed description (4096): whole and verbatim
    shown = fields(result)["Negative"]
    assert len(shown) <= 1024 and shown.endswith("…")
    assert negative.startswith(shown[:-1])  # cut only at its end
    assert (await job(studio, job_id)).params["prompt"] == prompt


async def test_generate_in_a_dm_posts_the_result_in_the_dm(studio: Studio, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(studio.bot.settings.discord, "allow_dms", True)  # DMs are off unless the operator says
    member = studio.new_member("hermit")
    dm = studio.sb.dm_channel(member)
    job_id, result = await generate(studio, member, {"prompt": "a lantern", "steps": 1}, channel=dm)
    assert result.channel_id == dm.id and result.guild_id is None
    assert len(result.attachments) == 1
    record = await job(studio, job_id)
    assert record.guild_id is None and record.channel_id == dm.id and record.status == "done"
    # Charged on the DM ledger, not on any server's.
    assert [k for k, _, _ in await ledger(studio, member, guild_id=None)] == ["reserve", "commit"]
    assert await ledger(studio, member) == []
    status = await studio.sb.wait_until(
        lambda: next(
            (m for m in studio.sb.channel_messages(dm) if m.content.startswith("Done") and job_id in m.content), None
        ),
        timeout=30,
    )
    assert status.components == []

    # Buttons work in the DM too: a reroll is posted there as well.
    again_id = assert_queued(await studio.click(member, result, "Reroll"))
    again = await studio.result_of(again_id)
    assert again.channel_id == dm.id and (await job(studio, again_id)).guild_id is None
