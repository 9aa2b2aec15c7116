"""Hostile input, generated: hypothesis builds interaction payloads for every registered command and
every option (wrong types, out-of-range numbers, unicode and control characters, 6000-character
strings, missing required options, attachments that are not images, malformed images, images
declaring huge dimensions) and custom_ids that were never issued or were tampered with. Each goes
through the real bot as a raw payload (no client-side checks), and each must be answered within
3 s with an ephemeral message (or, for input that happens to be valid, a public queue card),
with no unexpected error logged and nothing charged to the sender.

Permission checks: a member without moderator rights reaches no moderator action by any path:
every `/mod` command with any arguments, the Delete and Cancel buttons of someone else's job,
and forged custom_ids. The moderation state (limits, bans, blocklist, pause, server default
model) and other members' jobs and messages stay as they were.
"""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import select

from bot.tree import mistyped_option
from db.models import Ban, BlocklistPattern, GuildSettings, LedgerEntry, QuotaRoleLimit, QuotaUserOverride
from sandbox import InteractionRecord, Message, User
from sandbox.command_registry import ATTACHMENT, BOOLEAN, CHANNEL, INTEGER, MENTIONABLE, NUMBER, ROLE, STRING, USER
from studio.harness import Studio, job_id_of, open_studio
from tests.e2e.refusals import assert_fast
from tests.reliability.conftest import LogCapture, reliability_settings
from tests.reliability.invariants import assert_invariants

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.slow,
    # hypothesis would print the whole studio (a 40 kB repr) with each falsifying example
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning"),
]

FUZZ = settings(
    max_examples=100,  # enough that every member command is drawn (issue 14 added four)
    deadline=None,
    derandomize=True,  # the same examples in every CI run: a failure here is a finding, not noise
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DEFERRED = 5
UNEXPECTED = ("Something went wrong",)
_names = itertools.count()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path, all_logs: LogCapture) -> AsyncIterator[Studio]:
    settings_ = reliability_settings(
        tiny_model_dir,
        studio_dir,
        generation={"max_attachment_bytes": 300_000, "max_attachment_pixels": 2048 * 2048},
        moderation={"blocklist": [r"forbidden\w*"]},
    )
    async with open_studio(settings_) as running:
        yield running


# ------------------------------------------------------------------------------ strategies


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 80, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`×`height` (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


VALID_PNG = png()
ATTACHMENTS = st.one_of(
    st.just(("fine.png", VALID_PNG, "image/png")),
    st.builds(lambda b: ("noise.png", b, "image/png"), st.binary(max_size=2048)),
    st.just(("notes.png", b"just some text, not an image\n" * 10, "image/png")),
    st.just(("notes.txt", b"plain text", "text/plain")),
    st.just(("empty.png", b"", "image/png")),
    st.builds(lambda n: ("cut.png", VALID_PNG[:n], "image/png"), st.integers(8, len(VALID_PNG) - 1)),
    st.builds(
        lambda w, h: ("bomb.png", png_declaring(w, h), "image/png"),
        st.integers(1, 2**31 - 1),
        st.integers(1, 2**31 - 1),
    ),
    st.just(("wrong-type.gif", VALID_PNG, "image/gif")),
    st.just(("big.png", png(1024, 1024) + b"\x00" * 400_000, "image/png")),
    st.just(
        ("script.svg", b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>", "image/svg+xml")
    ),
)
NASTY_TEXT = st.one_of(
    st.text(max_size=60),
    st.text(st.characters(categories=["Cc", "Cf", "Zs", "Zl", "Zp", "Co"]), max_size=40),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "\u202eevil",
            "@everyone",
            "<@&1>",
            "x" * 6000,
            "é" * 1501,
            "forbidden fruit",
            "tiny",
            "1:1",
            "euler_a",
            "ZZZZZZZZ",
            "'; DROP TABLE jobs; --",
            "../../etc/passwd",
            "${jndi:ldap://x}",
        ]
    ),
)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # JSON carries neither
BIG_INTS = st.integers(-(2**70), 2**70)
WRONG_TYPES = st.one_of(st.booleans(), st.lists(st.integers(), max_size=2), st.none())


def primitive(kind: int) -> st.SearchStrategy[Any]:
    """Values for an option of type `kind`: mostly of the right JSON type, sometimes not."""
    right = {
        STRING: NASTY_TEXT,
        INTEGER: st.one_of(BIG_INTS, st.sampled_from([0, -1, 1, 5, 61, 2**32, 2**53 + 1])),
        NUMBER: st.one_of(FLOATS, BIG_INTS, st.sampled_from([0.0, -0.0, 0.04, 1.01, 20.5, 1e308])),
        BOOLEAN: st.booleans(),
    }[kind]
    wrong = st.one_of(NASTY_TEXT, FLOATS, BIG_INTS, WRONG_TYPES)
    return st.one_of(right, right, right, wrong)


def leaves(studio: Studio, *, moderator: bool) -> list[tuple[str, list[dict[str, Any]]]]:
    """(path, options) of every registered command ("mod quota set", ...): the privileged ones
    (/mod for a server's moderators, /operator for the bot's owner) or the others."""
    from sandbox.command_registry import walk_path

    out = []
    for command in studio.sb.registered_commands():
        if (command.name in ("mod", "operator")) != moderator:
            continue
        for path in command.qualified_paths:
            options, _ = walk_path(command, path.split()[1:])
            out.append((path, options))
    return sorted(out, key=lambda leaf: leaf[0])


@st.composite
def payloads(draw: st.DrawFn, studio: Studio, sender: User, moderator: bool) -> tuple[str, dict[str, Any]]:
    path, options = draw(st.sampled_from(leaves(studio, moderator=moderator)))
    values: dict[str, Any] = {}
    for option in options:
        # Required options are usually there, optional ones half the time; both may be missing.
        if not draw(st.booleans()) and (not option.get("required") or draw(st.integers(0, 9)) == 0):
            continue
        kind = option["type"]
        if kind == ATTACHMENT:
            values[option["name"]] = draw(ATTACHMENTS)
        elif kind in (USER, MENTIONABLE):
            values[option["name"]] = draw(st.sampled_from([sender, studio.alice, studio.mod, studio.sb.bot_user]))
        elif kind == ROLE:
            values[option["name"]] = draw(st.sampled_from([studio.mod_role, studio.guild.everyone]))
        elif kind == CHANNEL:
            values[option["name"]] = draw(st.sampled_from([studio.channel, studio.nsfw]))
        else:
            values[option["name"]] = draw(primitive(kind))
    return path, values


# ------------------------------------------------------------------------------- checks


async def answer_of(inter: InteractionRecord) -> tuple[str, bool]:
    """(text, ephemeral) of what the member ends up reading: the first response, or the deferred
    message once filled in."""
    first = await inter.wait_response(3.5)
    assert_fast(inter)
    if first.type == DEFERRED:
        message = await inter.wait_original(lambda m: bool(m.content) or bool(m.embeds), timeout=30)
        return message.content or str(message.embeds), message.ephemeral
    text = first.content or " ".join(str(e.get("title") or e.get("description") or "") for e in first.embeds)
    return text, first.ephemeral


async def moderation_state(studio: Studio) -> list[Any]:
    """Everything a moderator action can change, as plain tuples."""
    tables = (GuildSettings, QuotaUserOverride, QuotaRoleLimit, Ban, BlocklistPattern)
    state: list[Any] = []
    async with studio.bot.wiring.db.session(write=False) as s:
        for table in tables:
            rows = (await s.execute(select(table))).scalars().all()
            columns = [c.name for c in table.__table__.columns if c.name not in ("updated_at", "created_at")]
            state.append(sorted(repr(tuple(getattr(r, c) for c in columns)) for r in rows))
        grants = select(LedgerEntry).where(LedgerEntry.kind.in_(("grant", "reset")))
        state.append(sorted(repr((e.user_id, e.kind, e.units)) for e in (await s.execute(grants)).scalars()))
    state.append(studio.bot.wiring.scheduler.paused)
    state.append(studio.bot.wiring.scheduler.server_paused(studio.guild.id))
    return state


async def charged(studio: Studio, member: User) -> tuple[list[Any], list[Any]]:
    services = studio.bot.wiring
    ledger = await services.quotas.ledger(studio.guild.id, member.id)
    jobs = await services.jobs.list_for_user(
        studio.guild.id, member.id, ("queued", "running", "done", "failed", "cancelled")
    )
    return ledger, jobs


def new_errors(logs: LogCapture, start: int) -> list[str]:
    return [line for line in logs.lines[start:] if line.startswith(("ERROR", "CRITICAL"))]


async def check_answer(studio: Studio, logs: LogCapture, member: User, inter: InteractionRecord, start: int) -> str:
    """Answered in time, clearly, with no unexpected error; a refusal charged nothing, and an
    accepted job (valid input after all) is cancelled again so the module's invariant holds."""
    text, ephemeral = await answer_of(inter)
    assert text.strip(), f"an empty answer to {inter.data}"
    assert not any(u in text for u in UNEXPECTED), f"{text!r} for {inter.data}"
    assert not new_errors(logs, start), new_errors(logs, start)
    if not ephemeral:
        assert text.startswith("Queued"), f"a public answer that is not a queue card: {text!r}"
        await studio.bot.wiring.actions.cancel_all_for(studio.guild.id, member.id)
        return text
    ledger, jobs = await charged(studio, member)
    assert ledger == [] and jobs == [], f"{text!r} charged {ledger} / created {jobs} for {inter.data}"
    return text


# -------------------------------------------------------------------------------- tests
# pytest-asyncio runs an async @given test's examples in the module's event loop, on the studio.

SEEN: dict[str, set[str]] = {"member": set(), "mod": set()}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def state_before(studio: Studio) -> list[Any]:
    return await moderation_state(studio)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def victim(studio: Studio) -> tuple[User, str, Message, InteractionRecord]:
    """Someone else's finished job and its result message, and a long job of theirs still queued
    (its card has a Cancel button), for the buttons and forged clicks."""
    owner = studio.new_member("victim")
    job_id = job_id_of(await studio.command(owner, "generate", {"prompt": "a guarded vault"}))
    result = await studio.result_of(job_id)
    studio.bot.wiring.scheduler.pause()  # keeps the second job queued until the last test
    card = await studio.command(owner, "generate", {"prompt": "a second vault"})
    return owner, job_id, result, card


async def send_drawn_payload(
    studio: Studio, all_logs: LogCapture, data: st.DataObject, name: str, *, moderator: bool
) -> tuple[str, dict[str, Any], InteractionRecord, str]:
    """A fresh member sends one drawn payload of a member (or moderator) command; its answer is
    checked (`check_answer`) and returned with the path and the option values."""
    member = studio.new_member(f"{name}-{next(_names)}")
    path, values = data.draw(payloads(studio, member, moderator=moderator), label="payload")
    SEEN["mod" if moderator else "member"].add(path)
    start = len(all_logs.lines)
    inter = await studio.sb.raw_slash(member, studio.channel, path, values)
    return path, values, inter, await check_answer(studio, all_logs, member, inter, start)


@FUZZ
@given(data=st.data())
async def test_hostile_payloads_for_every_member_command_and_option(
    studio: Studio, all_logs: LogCapture, data: st.DataObject
) -> None:
    await send_drawn_payload(studio, all_logs, data, "fuzz", moderator=False)


async def test_the_member_fuzz_reached_every_command_and_left_the_books_balanced(studio: Studio) -> None:
    assert {path for path, _ in leaves(studio, moderator=False)} - SEEN["member"] <= {"model list", "quota", "queue"}
    await assert_invariants(studio.sb, studio.bot.wiring.db, guild_id=studio.guild.id)


@FUZZ
@given(data=st.data())
async def test_no_moderator_action_is_reachable_by_a_member_with_any_arguments(
    studio: Studio, all_logs: LogCapture, state_before: list[Any], data: st.DataObject
) -> None:
    path, values, inter, text = await send_drawn_payload(studio, all_logs, data, "not-a-mod", moderator=True)
    if mistyped_option(inter.data.get("options") or []) is None:  # else refused for the type, first
        lowered = text.lower()
        assert "moderator" in lowered or "manage server" in lowered or "operator" in lowered, (path, values, text)


CUSTOM_ID_ACTIONS = st.sampled_from(["reroll", "upscale", "variations", "refine", "delete", "cancel", "mod", "ban", ""])
CUSTOM_ID_SUFFIXES = st.sampled_from(["", ":0", ":1", ":3", ":4", ":99", ":-1", ":x", ":0:0"])


@FUZZ
@given(data=st.data())
async def test_forged_custom_ids_are_answered_and_charge_nothing(
    studio: Studio,
    all_logs: LogCapture,
    state_before: list[Any],
    victim: tuple[User, str, Message, InteractionRecord],
    data: st.DataObject,
) -> None:
    _, done_job, result, card = victim
    queued_job = job_id_of(card)
    jobs = st.one_of(st.sampled_from([done_job, queued_job, done_job.lower(), "ZZZZZZZZ", "0000"]), NASTY_TEXT)
    custom_id = data.draw(
        st.one_of(
            st.builds(lambda a, j, s: f"atelier:{a}:{j}{s}", CUSTOM_ID_ACTIONS, jobs, CUSTOM_ID_SUFFIXES),
            st.text(max_size=120),
            st.just("atelier:" + "A" * 6000),
        ),
        label="custom_id",
    )
    clicker = studio.new_member(f"clicker-{next(_names)}")
    start = len(all_logs.lines)
    inter = await studio.sb.raw_click(clicker, data.draw(st.sampled_from([result, card.original])), custom_id)
    await check_answer(studio, all_logs, clicker, inter, start)


async def test_nobody_else_reached_the_victims_work_or_any_moderator_action(
    studio: Studio, state_before: list[Any], victim: tuple[User, str, Message, InteractionRecord]
) -> None:
    _, _, result, card = victim
    assert len(SEEN["mod"]) >= 12, SEEN["mod"]
    stranger = studio.new_member("stranger")
    assert "Only the person" in (await answer_of(await studio.click(stranger, result, "Delete")))[0]
    assert "only cancel your own" in (await answer_of(await studio.click(stranger, card.original, "Cancel")))[0]
    assert not result.deleted and card.original is not None
    queued = await studio.bot.wiring.jobs.get(job_id_of(card))
    assert queued is not None and queued.status == "queued"
    studio.bot.wiring.scheduler.resume()
    assert await moderation_state(studio) == state_before
    await assert_invariants(studio.sb, studio.bot.wiring.db, guild_id=studio.guild.id)


async def test_the_token_is_in_no_log_or_answer_after_all_that(studio: Studio, all_logs: LogCapture) -> None:
    token = studio.sb.token
    assert all_logs.lines and not [line[:200] for line in all_logs.lines if token in line]
    answers = [i.response.content or "" for i in studio.sb.interactions() if i.response is not None]
    answers += [m.content for m in studio.sb.world.messages.values()]
    assert answers and not [a[:200] for a in answers if token in a]
