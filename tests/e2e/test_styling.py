"""LoRAs, embeddings, styles and draft mode through the real bot and the sandbox: each option and
what the member sees (embed fields, PNG parameters, autocomplete), what the job carries, the
refusals (ephemeral, naming what exists, nothing charged), and /model list and /model info."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from engine.jobs import Text2Img
from engine.styles import embedding_hash, lora_hash
from engine.tiny_addons import EMBEDDING, LORA_KOHYA, tiny_draft, tiny_styling
from studio.harness import Studio, open_studio, tiny_settings
from tests.e2e.member_kit import (
    assert_nothing_charged,
    assert_queued,
    assert_refused,
    fields,
    generate,
    image,
    job,
    ledger,
    pixels,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

FAST = {"steps": 2, "refiner": False, "seed": 5}
EXTRA = ("extra-a", "extra-b")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    models = {
        "tiny": {
            "base": str(tiny_model_dir / "base"),
            "refiner": str(tiny_model_dir / "refiner"),
            "default": True,
            **tiny_draft(tiny_model_dir),
        },
        "tiny-base": {"base": str(tiny_model_dir / "base")},
    }
    styling = tiny_styling(tiny_model_dir)
    # Two more LoRAs (the same files under other names), so a fourth can be asked for.
    styling["loras"] |= {name: {"file": str(tiny_model_dir / LORA_KOHYA)} for name in EXTRA}
    settings = tiny_settings(tiny_model_dir, studio_dir, models=models, **styling)
    async with open_studio(settings) as running:
        yield running


def info(studio: Studio, result: Any, index: int = 0) -> str:
    return str(image(studio.sb, result.attachments[index]).info["parameters"])


async def test_lora_option_reaches_the_image_the_embed_and_the_png(studio: Studio, tiny_model_dir: Path) -> None:
    member = studio.new_member("lora-user")
    plain_id, plain = await generate(studio, member, {"prompt": "a harbour", **FAST})
    zero_id, zero = await generate(studio, member, {"prompt": "a harbour", "lora": "tiny-style:0", **FAST})
    job_id, result = await generate(studio, member, {"prompt": "a harbour", "lora": "tiny-style", **FAST})

    # Weight 0 is exactly no LoRA (its trigger words are not added either); weight 0.8 is not.
    assert pixels(studio.sb, zero.attachments[0]) == pixels(studio.sb, plain.attachments[0])
    assert pixels(studio.sb, result.attachments[0]) != pixels(studio.sb, plain.attachments[0])

    f = fields(result)
    assert f["LoRAs"] == "tiny-style 0.8"  # its configured default weight
    assert result.embeds[0]["description"] == "a harbour"  # the member's words, verbatim
    record = await job(studio, job_id)
    assert record.params["loras"] == [["tiny-style", 0.8]]
    assert record.params["prompt"] == "a harbour, tiny style"  # the trigger words ran
    assert record.params["typed"] == "a harbour"
    text = info(studio, result)
    assert text.startswith("a harbour, tiny style <lora:tiny-style:0.8>\n")
    assert f'Lora hashes: "tiny-style: {lora_hash(str(tiny_model_dir / LORA_KOHYA))}"' in text
    assert "LoRAs" not in fields(plain) and "<lora:" not in info(studio, plain)
    assert (await job(studio, zero_id)).params["prompt"] == "a harbour"
    cost = Text2Img(job_id="x", width=256, height=256, steps=2).cost()
    assert (await job(studio, plain_id)).cost == pytest.approx(cost) == record.cost  # LoRAs cost nothing extra


async def test_two_loras_in_both_key_formats(studio: Studio) -> None:
    member = studio.new_member("two-loras")
    job_id, result = await generate(
        studio, member, {"prompt": "a kite", "lora": "tiny-style:0.5, tiny-style-diffusers:1.5", **FAST}
    )
    assert fields(result)["LoRAs"] == "tiny-style 0.5, tiny-style-diffusers 1.5"
    assert (await job(studio, job_id)).params["loras"] == [["tiny-style", 0.5], ["tiny-style-diffusers", 1.5]]
    assert "<lora:tiny-style:0.5> <lora:tiny-style-diffusers:1.5>" in info(studio, result)


async def test_lora_autocomplete_offers_what_fits_the_model(studio: Studio) -> None:
    member = studio.new_member("lora-typist")

    async def typed(text: str, **options: Any) -> list[dict[str, Any]]:
        values = {"prompt": "x", "lora": text, **options}
        return await studio.sb.autocomplete(member, studio.channel, "generate", values, focused="lora")

    everything = await typed("")
    assert [c["value"] for c in everything] == ["tiny-style", "tiny-style-diffusers", *EXTRA]
    assert "weight 0.8" in everything[0]["name"] and "tiny style" in everything[0]["name"]
    on_base = await typed("", model="tiny-base")
    assert [c["value"] for c in on_base] == ["tiny-style", *EXTRA]  # tiny-style-diffusers is for tiny only
    second = await typed("tiny-style:0.5, DIFF")
    assert [c["value"] for c in second] == ["tiny-style:0.5, tiny-style-diffusers"]
    weight = await typed("tiny-style:1.2")
    assert weight[0]["value"] == "tiny-style:1.2"
    refine = await studio.sb.autocomplete(member, studio.channel, "variations", {"lora": "sty"}, focused="lora")
    assert [c["value"] for c in refine] == ["tiny-style", "tiny-style-diffusers"]  # "sty" is in both names


@pytest.mark.parametrize(
    ("options", "needles"),
    [
        ({"lora": "sepia"}, ["`sepia`", "`tiny-style`", "`tiny-style-diffusers`"]),
        ({"lora": "tiny-style:2.5"}, ["between 0 and 2", "tiny-style"]),
        ({"lora": "tiny-style:lots"}, ["name:weight"]),
        ({"lora": "tiny-style, tiny-style"}, ["twice"]),
        ({"lora": "tiny-style, tiny-style-diffusers, extra-a, extra-b"}, ["At most 3 LoRAs"]),
        ({"lora": "tiny-style-diffusers, extra-a, extra-b", "style": "tiny-poster"}, ["At most 3", "style"]),
        ({"lora": "tiny-style-diffusers", "model": "tiny-base"}, ["does not fit", "`tiny-style`"]),
        ({"prompt": "a cat <sparkles>"}, ["`<sparkles>`", "`<tiny-token>`"]),
        ({"negative": "<lora:tiny-style:1>"}, ["`lora` option"]),
        ({"draft": True, "model": "tiny-base"}, ["no draft mode", "`tiny`"]),
        ({"draft": True, "sampler": "euler"}, ["leave `sampler` out"]),
        ({"style": "tiny-poster", "prompt": "y" * 1490}, ["characters", "the limit is 1500"]),
    ],
)
async def test_refusals_say_what_exists_and_cost_nothing(
    studio: Studio, options: dict[str, Any], needles: list[str]
) -> None:
    member = studio.new_member("refused")
    inter = await studio.command(member, "generate", {"prompt": "a cat", **options})
    assert_refused(inter, *needles)
    await assert_nothing_charged(studio, member)


async def test_embedding_in_the_prompt(studio: Studio, tiny_model_dir: Path) -> None:
    member = studio.new_member("embedder")
    _, plain = await generate(studio, member, {"prompt": "a lamp", **FAST})
    job_id, result = await generate(studio, member, {"prompt": "a lamp, (<tiny-token>)1.1", **FAST})
    assert pixels(studio.sb, result.attachments[0]) != pixels(studio.sb, plain.attachments[0])
    assert fields(result)["Embeddings"] == "<tiny-token>"
    assert f'TI hashes: "tiny-token: {embedding_hash(str(tiny_model_dir / EMBEDDING))}"' in info(studio, result)
    assert (await job(studio, job_id)).params["prompt"] == "a lamp, (<tiny-token>)1.1"


async def test_style_preset_and_the_members_options_winning(studio: Studio) -> None:
    member = studio.new_member("stylist")
    job_id, result = await generate(studio, member, {"prompt": "a fox", "style": "tiny-poster", "refiner": False})
    p = (await job(studio, job_id)).params
    assert p["prompt"] == "poster of a fox, bold shapes, tiny style" and p["negative"] == "blurry"
    assert p["loras"] == [["tiny-style", 0.5]] and p["steps"] == 3 and p["style"] == "tiny-poster"
    f = fields(result)
    assert f["Style"] == "tiny-poster" and f["LoRAs"] == "tiny-style 0.5" and f["Steps"] == "3"
    assert result.embeds[0]["description"] == "a fox"
    assert "Style: tiny-poster" in info(studio, result)

    mine = {"prompt": "a fox", "style": "tiny-poster", "steps": 2, "negative": "text", "lora": "tiny-style:1.1"}
    own_id, own = await generate(studio, member, {**mine, "refiner": False})
    p = (await job(studio, own_id)).params
    assert p["steps"] == 2 and p["negative"] == "text, blurry" and p["loras"] == [["tiny-style", 1.1]]
    assert fields(own)["Steps"] == "2"


async def test_draft_runs_the_adapter_at_draft_steps_and_reroll_keeps_it(studio: Studio) -> None:
    member = studio.new_member("drafter")
    inter = await studio.command(member, "generate", {"prompt": "a bridge", "seed": 9, "draft": True})
    job_id = assert_queued(inter)
    assert "Cost 0.01 units" in (inter.response.content or "")  # 256² × 4 steps
    result = await studio.result_of(job_id)
    f = fields(result)
    assert f["Draft"] == "yes" and f["Steps"] == "4" and f["Sampler"] == "Euler trailing" and f["CFG"] == "1"
    record = await job(studio, job_id)
    p = record.params
    assert p["draft"] is True and p["steps"] == 4 and p["refiner"] is False and p["sampler"] == "euler_trailing"
    assert record.cost == pytest.approx(Text2Img(job_id="x", width=256, height=256, steps=4).cost())
    assert "Draft: tiny-draft" in info(studio, result) and "Sampler: Euler trailing" in info(studio, result)
    # The same seed without draft mode: another image (the adapter and its scheduler ran).
    _, full = await generate(studio, member, {"prompt": "a bridge", "seed": 9, "steps": 4, "refiner": False})
    assert pixels(studio.sb, full.attachments[0]) != pixels(studio.sb, result.attachments[0])

    again = await studio.click(studio.new_member("draft-reroller"), result, "Reroll")
    again_id = assert_queued(again)
    await studio.result_of(again_id)
    q = (await job(studio, again_id)).params
    assert q["draft"] is True and q["steps"] == 4 and q["sampler"] == "euler_trailing"
    assert q["seed"] != p["seed"]


def picture() -> bytes:
    rng = np.random.default_rng(3)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


async def test_refine_and_variations_take_loras_and_buttons_keep_them(studio: Studio) -> None:
    member = studio.new_member("img-lora")
    attach = [("in.png", picture(), "image/png")]
    inter = await studio.command(member, "refine", {"prompt": "moss", "lora": "tiny-style:0.6"}, attachments=attach)
    refined = await studio.result_of(assert_queued(inter))
    assert fields(refined)["LoRAs"] == "tiny-style 0.6"
    assert refined.embeds[0]["description"] == "moss"
    inter = await studio.command(member, "variations", {"lora": "tiny-style-diffusers", "count": 1}, attachments=attach)
    varied_id = assert_queued(inter)
    varied = await studio.result_of(varied_id)
    assert (await job(studio, varied_id)).params["loras"] == [["tiny-style-diffusers", 1.0]]
    assert "<lora:tiny-style-diffusers:1>" in info(studio, varied)
    # A button's job goes on with its parent's LoRAs.
    clicked = await studio.click(member, refined, "Variations")
    child_id = assert_queued(clicked)
    child = await studio.result_of(child_id)
    assert (await job(studio, child_id)).params["loras"] == [["tiny-style", 0.6]]
    assert fields(child)["LoRAs"] == "tiny-style 0.6"
    refused = await studio.command(member, "refine", {"lora": "nope"}, attachments=attach)
    assert_refused(refused, "`nope`", "`tiny-style`")
    assert len([entry for entry in await ledger(studio, member) if entry[0] == "reserve"]) == 3


async def test_model_list_and_info_show_loras_embeddings_and_styles(studio: Studio) -> None:
    member = studio.new_member("browser")
    listing = await studio.command(member, "model list")
    assert listing.response is not None and listing.response.ephemeral
    text = listing.response.content or ""
    assert "**LoRAs**" in text and "• `tiny-style` (weight 0.8, adds “tiny style”)" in text
    assert "• `tiny-style-diffusers` (weight 1, for `tiny`)" in text
    assert "**Embeddings**" in text and "• `<tiny-token>`: random embedding" in text
    assert "**Styles**" in text and "• `tiny-poster`: a poster look" in text

    async def described(name: str) -> dict[str, Any]:
        inter = await studio.command(member, "model info", {"name": name})
        assert inter.response is not None and inter.response.ephemeral
        return inter.response.embeds[0]

    lora = await described("tiny-style")
    assert lora["title"] == "LoRA tiny-style"
    lora_fields = {f["name"]: f["value"] for f in lora["fields"]}
    assert lora_fields["Trigger words"] == "tiny style" and lora_fields["Use"] == "`lora: tiny-style:0.8`"
    assert (await described("<tiny-token>"))["title"] == "Embedding <tiny-token>"
    style = await described("tiny-poster")
    assert {f["name"]: f["value"] for f in style["fields"]}["Prompt"] == "poster of {prompt}, bold shapes"
    model = {f["name"]: f["value"] for f in (await described("tiny"))["fields"]}
    assert model["Draft"] == "4 steps · Euler trailing · cfg 1" and "`tiny-style`" in model["LoRAs"]
    choices = await studio.sb.autocomplete(member, studio.channel, "model info", {"name": "tiny"}, focused="name")
    expected = {"tiny", "tiny-base", "tiny-style", "tiny-style-diffusers", "<tiny-token>", "tiny-poster"}
    assert {c["value"] for c in choices} == expected


async def test_editing_commands_take_loras(studio: Studio) -> None:
    member = studio.new_member("edit-lora")
    attach = [("in.png", picture(), "image/png")]
    for command in ("edit", "zoom", "pan"):
        choices = await studio.sb.autocomplete(member, studio.channel, command, {"lora": "diff"}, focused="lora")
        assert [c["value"] for c in choices] == ["tiny-style-diffusers"], command
    inter = await studio.command(member, "zoom", {"lora": "tiny-style-diffusers:0.7"}, attachments=attach)
    zoom_id = assert_queued(inter)
    zoomed = await studio.result_of(zoom_id)
    assert fields(zoomed)["LoRAs"] == "tiny-style-diffusers 0.7"
    assert (await job(studio, zoom_id)).params["loras"] == [["tiny-style-diffusers", 0.7]]
    refused = await studio.command(member, "pan", {"direction": "left", "lora": "tiny-style:9"}, attachments=attach)
    assert_refused(refused, "between 0 and 2")
    refused = await studio.command(member, "edit", {"prompt": "a door <nope>", "region": "center"}, attachments=attach)
    assert_refused(refused, "`<nope>`", "`<tiny-token>`")
    assert [entry[0] for entry in await ledger(studio, member)] == ["reserve", "commit"]  # the zoom only
