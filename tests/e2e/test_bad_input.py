"""Every class of bad input in the contract's guarantees, through the real bot: each gets a clear
ephemeral message within 3 s saying what to change, nothing is charged (the ledger is unchanged)
and no job is created. Values a Discord client would refuse are sent as raw payloads
(`sb.raw_slash`), so these tests check the bot's OWN validation; custom_ids that were never issued
or were tampered with are clicked with `sb.raw_click`."""

from __future__ import annotations

import io
import logging
import random
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from sandbox import InteractionRecord, InvocationError, User
from studio.harness import Studio, job_id_of, open_studio, tiny_settings
from tests.e2e.refusals import account, assert_fast, assert_nothing_charged, assert_queued, assert_refused

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

MAX_ATTACHMENT_BYTES = 200_000
GLOBAL_CAP = 5
ONE_JOB = 0.012  # one 256² × 4-step image costs 0.0083 units


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(
        tiny_model_dir,
        studio_dir,
        queue={"per_user_cap": 3, "global_cap": GLOBAL_CAP},
        generation={"max_attachment_bytes": MAX_ATTACHMENT_BYTES},
        moderation={"blocklist": [r"forbidden\w*"]},
    )
    async with open_studio(settings) as running:
        yield running


# ------------------------------------------------------------------------------------ helpers


def png(size: tuple[int, int] = (64, 64), *, noise: bool = False) -> bytes:
    if noise:
        rng = random.Random(1)
        image = Image.frombytes("RGB", size, bytes(rng.getrandbits(8) for _ in range(size[0] * size[1] * 3)))
    else:
        image = Image.new("RGB", size, (90, 140, 200))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A few hundred bytes declaring `width`×`height`: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 256)) + chunk(b"IEND", b"")
    )


async def raw(studio: Studio, user: User, command: str, options: dict[str, Any]) -> InteractionRecord:
    inter = await studio.sb.raw_slash(user, studio.channel, command, options)
    await inter.wait_response()
    return inter


async def refused_without_charge(studio: Studio, user: User, send: Any, *needles: str) -> str:
    """Run `send()` (an awaitable factory giving an answered interaction) and check the refusal."""
    before = await account(studio, user)
    inter = await send()
    text = assert_refused(inter, *needles)
    await assert_nothing_charged(studio, user, before)
    return text


# --------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("prompt", ["   ", "\n\t \u202e"])
async def test_whitespace_prompt_is_refused(studio: Studio, prompt: str) -> None:
    member = studio.new_member("blank")
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "generate", {"prompt": prompt}),
        "prompt is empty",
        "describe what you want",
    )


async def test_empty_prompt_sent_anyway_is_refused(studio: Studio) -> None:
    member = studio.new_member("empty")
    with pytest.raises(InvocationError):  # the Discord client does not send it
        await studio.sb.slash(member, studio.channel, "generate", {"prompt": ""})
    await refused_without_charge(
        studio, member, lambda: raw(studio, member, "generate", {"prompt": ""}), "prompt is empty"
    )


async def test_over_long_prompt_and_negative_are_refused(studio: Studio) -> None:
    member = studio.new_member("verbose")
    with pytest.raises(InvocationError):
        await studio.sb.slash(member, studio.channel, "generate", {"prompt": "x" * 1501})
    await refused_without_charge(
        studio,
        member,
        lambda: raw(studio, member, "generate", {"prompt": "a" * 1501}),
        "1501 characters",
        "limit is 1500",
        "Shorten it by 1 character",
    )
    await refused_without_charge(
        studio,
        member,
        lambda: raw(studio, member, "generate", {"prompt": "a cat", "negative": "b" * 1600}),
        "negative is 1600 characters",
        "Shorten it by 100 characters",
    )


# --------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("option", "value", "needles"),
    [
        ("steps", 0, ("steps must be between 1 and 60", "you gave 0")),
        ("steps", 61, ("steps must be between 1 and 60", "you gave 61")),
        ("cfg", 0.5, ("cfg must be between 1 and 20", "you gave 0.5")),
        ("cfg", 20.5, ("cfg must be between 1 and 20",)),
        ("seed", -1, ("seed must be between 0 and 4294967295",)),
        ("seed", 2**32, ("seed must be between 0 and 4294967295",)),
        ("count", 0, ("count must be between 1 and 4",)),
        ("count", 5, ("count must be between 1 and 4", "you gave 5")),
        ("aspect", "3:2", ("Unknown aspect", "1:1, 4:5, 16:9")),
        ("sampler", "plms", ("Unknown sampler", "dpmpp_2m_karras")),
    ],
)
async def test_out_of_range_generate_options_are_refused(
    studio: Studio, option: str, value: Any, needles: tuple[str, ...]
) -> None:
    member = studio.new_member(f"bad-{option}")
    options = {"prompt": "a cat", option: value}
    with pytest.raises(InvocationError):  # the Discord client would not send it
        await studio.sb.slash(member, studio.channel, "generate", options)
    await refused_without_charge(studio, member, lambda: raw(studio, member, "generate", options), *needles)


@pytest.mark.parametrize(
    ("command", "options", "needles"),
    [
        ("refine", {"strength": 0.01}, ("strength must be between 0.05 and 1", "you gave 0.01")),
        ("refine", {"strength": 1.5}, ("strength must be between 0.05 and 1",)),
        ("variations", {"strength": 0.0}, ("strength must be between 0.05 and 1",)),
        ("variations", {"count": 5}, ("count must be between 1 and 4",)),
    ],
)
async def test_out_of_range_image_options_are_refused(
    studio: Studio, command: str, options: dict[str, Any], needles: tuple[str, ...]
) -> None:
    member = studio.new_member(f"bad-{command}")
    payload = {"image": ("in.png", png(), "image/png"), **options}
    await refused_without_charge(studio, member, lambda: raw(studio, member, command, payload), *needles)


# ---------------------------------------------------------------------------------------- models


async def test_unknown_model_is_refused(studio: Studio) -> None:
    member = studio.new_member("model-typo")
    text = await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "generate", {"prompt": "a cat", "model": "sdxl-turbo"}),
        "no model `sdxl-turbo`",
        "/model list",
    )
    assert "`tiny`" in text and "`tiny-base`" in text
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "refine", {"model": "nope"}, attachments=[("in.png", png(), "image/png")]),
        "no model `nope`",
    )


async def test_refiner_on_a_model_without_one_is_refused(studio: Studio) -> None:
    member = studio.new_member("no-refiner")
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "generate", {"prompt": "a cat", "model": "tiny-base", "refiner": True}),
        "has no refiner",
    )


# ----------------------------------------------------------------------------------- attachments


@pytest.mark.parametrize("command", ["refine", "variations"])
async def test_a_text_file_named_png_is_refused(studio: Studio, command: str) -> None:
    member = studio.new_member(f"text-{command}")
    fake = ("cat.png", b"I am a text file, not a picture.\n" * 4, "image/png")
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, command, {}, attachments=[fake]),
        "not an image",
        "PNG, JPEG or WebP",
    )


async def test_an_empty_attachment_is_refused(studio: Studio) -> None:
    member = studio.new_member("empty-file")
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "refine", {}, attachments=[("empty.png", b"", "image/png")]),
        "empty",
    )


async def test_an_attachment_too_large_in_bytes_is_refused(studio: Studio) -> None:
    member = studio.new_member("big-file")
    data = png((320, 320), noise=True)
    assert len(data) > MAX_ATTACHMENT_BYTES
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "refine", {}, attachments=[("big.png", data, "image/png")]),
        "the limit is 195 KB",
        "smaller image",
    )


async def test_an_attachment_too_large_in_pixels_is_refused(studio: Studio) -> None:
    member = studio.new_member("many-pixels")
    declared = png_header_only(8000, 8000)  # Discord reports the size: refused before download
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "variations", {}, attachments=[("wide.png", declared, "image/png")]),
        "8000×8000",
        "megapixels",
    )


async def test_a_decompression_bomb_is_refused(studio: Studio) -> None:
    member = studio.new_member("bomb")
    bomb = png_header_only(100_000, 100_000)
    assert len(bomb) < 200
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "refine", {}, attachments=[("bomb.png", bomb, "image/png")]),
        "too many pixels",
    )


# --------------------------------------------------------------------------- who may not generate


async def test_a_blocked_word_is_refused(studio: Studio) -> None:
    member = studio.new_member("blocked")
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "generate", {"prompt": "the Forbidden City at dusk"}),
        "blocked term",
        "Forbidden",
        "remove it",
    )
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "refine", {"prompt": "FORBIDDEN"}, attachments=[("in.png", png(), "image/png")]),
        "blocked term",
    )


async def test_a_banned_member_is_refused(studio: Studio) -> None:
    member = studio.new_member("banned")
    assert_fast(await studio.command(studio.mod, "mod ban", {"user": member, "reason": "posting spam"}))
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "generate", {"prompt": "a cat"}),
        "banned",
        "posting spam",
    )
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "variations", {}, attachments=[("in.png", png(), "image/png")]),
        "banned",
    )


async def test_an_over_quota_member_is_told_the_cost_what_is_left_and_when(studio: Studio) -> None:
    member = studio.new_member("thrifty")
    assert_fast(await studio.command(studio.mod, "mod quota set", {"user": member, "limit": ONE_JOB}))
    assert_queued(await studio.command(member, "generate", {"prompt": "a cat"}))
    text = await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "generate", {"prompt": "another cat"}),
        "Not enough quota",
        "costs 0.01 units",
        "you have 0.00 of 0.01 left",
        "Enough room frees up <t:",
        "fewer steps",
    )
    assert ":R>" in text  # a relative timestamp Discord renders in the member's own time


async def test_a_job_larger_than_the_whole_allowance_says_so(studio: Studio) -> None:
    member = studio.new_member("ambitious")
    assert_fast(await studio.command(studio.mod, "mod quota set", {"user": member, "limit": ONE_JOB}))
    await refused_without_charge(
        studio,
        member,
        lambda: studio.command(member, "generate", {"prompt": "four cats", "count": 4}),
        "costs 0.03 units",
        "larger than your whole allowance",
    )


async def test_a_full_queue_refuses_per_member_and_globally(studio: Studio) -> None:
    services = studio.bot.wiring
    await studio.sb.wait_until(lambda: not services.scheduler.snapshot(), timeout=60, what="an idle queue")
    first, second, third = (studio.new_member(n) for n in ("eager", "keen", "late"))
    assert_fast(await studio.command(studio.mod, "mod pause"))
    queued: list[tuple[User, str]] = []
    try:
        for _ in range(3):
            inter = await studio.command(first, "generate", {"prompt": "one of many"})
            assert_queued(inter)
            queued.append((first, job_id_of(inter)))
        await refused_without_charge(
            studio,
            first,
            lambda: studio.command(first, "generate", {"prompt": "one too many"}),
            "You already have 3 jobs waiting",
            "/cancel",
        )
        for _ in range(GLOBAL_CAP - 3):
            inter = await studio.command(second, "generate", {"prompt": "filling up"})
            assert_queued(inter)
            queued.append((second, job_id_of(inter)))
        await refused_without_charge(
            studio,
            third,
            lambda: studio.command(third, "generate", {"prompt": "no room"}),
            f"The queue is full ({GLOBAL_CAP} jobs)",
            "try again in a few minutes",
        )
        await refused_without_charge(
            studio,
            third,
            lambda: studio.command(third, "refine", {}, attachments=[("in.png", png(), "image/png")]),
            "The queue is full",
        )
    finally:
        for owner, job_id in queued:
            cancel = await studio.command(owner, "cancel", {"job": job_id})
            assert_fast(cancel)
        assert_fast(await studio.command(studio.mod, "mod resume"))
    assert not services.scheduler.snapshot()


# ------------------------------------------------------------------------ custom_ids and job ids


async def test_forged_and_stale_custom_ids_never_charge_or_crash(
    studio: Studio, caplog: pytest.LogCaptureFixture
) -> None:
    owner, stranger = studio.new_member("owner"), studio.new_member("stranger")
    job_id = job_id_of(await studio.command(owner, "generate", {"prompt": "a quiet harbour"}))
    result = await studio.result_of(job_id)
    before = await account(studio, stranger)
    caplog.set_level(logging.WARNING)

    answered = {
        "atelier:upscale:ZZZZZZZZ:0": "no longer exists",
        "atelier:reroll:ZZZZZZZZ": "no longer exists",
        "atelier:variations:ZZZZZZZZ:2": "no longer exists",
        f"atelier:upscale:{job_id}:3": "has no image 4",
        f"atelier:refine:{job_id}:1": "has no image 2",
        f"atelier:delete:{job_id}": "Only the person who asked for this image or a moderator",
        f"atelier:cancel:{job_id}": "You can only cancel your own jobs",
        "atelier:cancel:ZZZZZZZZ": "There is no job",
    }
    for custom_id, needle in answered.items():
        inter = await studio.sb.raw_click(stranger, result, custom_id)
        await inter.wait_response()
        assert_refused(inter, needle)
    assert not result.deleted

    ignored = ["atelier:explode:" + job_id, "atelier:upscale:abc", "atelier:upscale:" + "A" * 90, "nonsense"]
    clicks = [await studio.sb.raw_click(stranger, result, custom_id) for custom_id in ignored]
    # An interaction sent after them is answered, so the bot has seen them all.
    await refused_without_charge(
        studio, stranger, lambda: studio.command(stranger, "job", {"id": "ZZZZZZZZ"}), "There is no job"
    )
    for inter in clicks:
        assert inter.response is None or inter.response.ephemeral
    await assert_nothing_charged(studio, stranger, before)
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]


async def test_cancel_and_job_with_ids_that_are_not_yours_or_do_not_exist(studio: Studio) -> None:
    owner, other = studio.new_member("keeper"), studio.new_member("meddler")
    job_id = job_id_of(await studio.command(owner, "generate", {"prompt": "a cat", "steps": 8}))
    before = await account(studio, other)
    for text in (job_id, job_id.lower()):
        assert_refused(await studio.command(other, "cancel", {"job": text}), "only cancel your own jobs")
    for text in ("ZZZZZZZZ", "'; DROP TABLE jobs; --", "x" * 300):
        assert_refused(await studio.command(other, "cancel", {"job": text}), "There is no job")
        assert_refused(await studio.command(other, "job", {"id": text}), "There is no job")
    await assert_nothing_charged(studio, other, before)
    await studio.result_of(job_id)
