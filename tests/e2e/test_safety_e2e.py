"""The image safety check both ways through the bot, with the REAL nudenet detector: an explicit
result is withheld (action withhold) or spoilered (action spoiler) in a normal channel, posted as
is in an age-restricted channel, and nothing is withheld with `safety.enabled = false`.

How the tests get an image the real detector flags: the tiny model's outputs are always VAE-decoded
noise, which nudenet never flags (checked: text2img at several seeds, and /refine of the flagged
figure at strength 0.05 and 0.2, give no detection of any label at all), so no `explicit_labels`
makes the tiny model's own output explicit. The engine here is therefore the real local engine
(child process, tiny model) wrapped so that a /refine returns its input unchanged, like a perfect
low-strength refiner (see IdentityRefineEngine). Feeding the synthetic figure of
tests/bot/test_safety.py (nudenet: FEMALE_BREAST_EXPOSED ~0.85) through /refine then gives an
explicit result; everything after the engine (scheduler, storage, the safety check, delivery,
Discord) is the production path.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
from PIL import Image

from config.settings import Settings
from engine.api import EngineClient, EngineHealth, ImageOut, Result
from engine.client import LocalEngineClient
from engine.jobs import Job, Refine, Text2Img
from engine.jobs.events import Progress
from sandbox import Channel, Message
from studio.harness import Studio, job_id_of, open_studio, tiny_settings
from tests.bot.test_safety import encode, skin_figure
from tests.e2e.refusals import assert_queued

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.slow]

EXPLICIT_LABELS = ["FEMALE_BREAST_EXPOSED"]


class IdentityRefineEngine:
    """The real local engine, except that a Refine returns its input image unchanged. The engine
    process still runs a job for it (a small text2img under the same job id: real progress, real
    timings, real failure modes) but at 256² instead of the ~1 MP an image job works at, to keep
    these tests fast; only the pixels of the result are the input's."""

    def __init__(self, settings: Settings) -> None:
        self.inner = LocalEngineClient(settings)
        self.slots = self.inner.slots
        # A test may have a Refine's previews show the input too (`preview`: JPEG bytes).
        self.preview: bytes | None = None
        # Set by a test to keep a Refine's result back until it has seen what it needs.
        self.hold: asyncio.Event | None = None

    @property
    def pid(self) -> int | None:
        return self.inner.pid

    async def start(self) -> None:
        await self.inner.start()

    async def submit(self, job: Job) -> AsyncIterator[Progress | Result]:
        if not isinstance(job, Refine):
            async for item in self.inner.submit(job):
                yield item
            return
        stand_in = Text2Img(job_id=job.job_id, prompt=job.prompt or "refine", width=256, height=256, steps=2)
        async for item in self.inner.submit(stand_in):
            if isinstance(item, Result):
                if self.hold is not None:
                    await self.hold.wait()
                item = replace(item, images=[_as_input(job.image, item.images[0].seed)])
            elif item.preview is not None and self.preview is not None:
                item = replace(item, preview=self.preview)
            yield item

    async def cancel(self, job_id: str) -> bool:
        return await self.inner.cancel(job_id)

    async def close(self) -> None:
        await self.inner.close()

    def health(self) -> EngineHealth:
        return self.inner.health()


def _as_input(source_png: bytes, seed: int) -> ImageOut:
    with Image.open(io.BytesIO(source_png)) as source:
        width, height = source.size
    return ImageOut(data=source_png, format="png", seed=seed, width=width, height=height)


def _engine(settings: Settings) -> EngineClient:
    return IdentityRefineEngine(settings)  # type: ignore[return-value]


SAFETY = {
    "withhold": {"enabled": True, "action": "withhold", "explicit_labels": EXPLICIT_LABELS},
    "disabled": {"enabled": False},
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(request: pytest.FixtureRequest, tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    """A studio for one `[safety]` configuration (tests pick it with `on(...)`); pytest groups the
    tests by configuration and runs one studio at a time (discord.py's endpoints are global)."""
    mode = request.param
    settings = tiny_settings(tiny_model_dir, studio_dir / mode, safety=SAFETY[mode])
    async with open_studio(settings, engine_factory=_engine) as running:
        yield running


def on(*modes: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("studio", modes, indirect=True)


@pytest.fixture(scope="module")
def figure_png() -> bytes:
    return encode(skin_figure(512))


async def refine(studio: Studio, image: bytes, channel: Channel) -> tuple[str, Message]:
    """/refine at strength 0.05 (the engine here returns the input itself); returns the result."""
    member = studio.new_member("refiner")
    inter = await studio.command(
        member, "refine", {"strength": 0.05}, channel=channel, attachments=[("mine.png", image, "image/png")]
    )
    assert_queued(inter)
    job_id = job_id_of(inter)
    return job_id, await studio.result_of(job_id, timeout=120)


def note(message: Message) -> str:
    fields = {f["name"]: f["value"] for f in message.embeds[0].get("fields", [])}
    return fields.get("Note", "")


async def assert_posted_image_is_explicit(studio: Studio, message: Message) -> None:
    """What was posted is what the real detector flags (so the channel rule, not luck, posted it)."""
    verdict = await studio.bot.wiring.safety.check(studio.sb.file_bytes(message.attachments[0]))
    assert verdict.explicit and verdict.labels == EXPLICIT_LABELS, verdict


@on("withhold")
async def test_withhold_keeps_an_explicit_image_out_of_a_normal_channel(studio: Studio, figure_png: bytes) -> None:
    withhold = studio
    job_id, result = await refine(withhold, figure_png, withhold.channel)
    assert result.attachments == []
    assert "1 image(s) withheld" in note(result) and "not age-restricted" in note(result)
    status = await withhold.status_text(job_id, "Done")
    assert str(result.id) in status.content and not status.attachments
    record = await withhold.bot.wiring.jobs.get(job_id)
    assert record is not None and record.status == "done"


@contextlib.contextmanager
def action(studio: Studio, value: str) -> Iterator[None]:
    """Run with `safety.action = value`: the bot reads the action for every image it posts, so this
    is what an operator's `[safety] action` gives (a studio per action would cost a start-up each)."""
    safety = studio.bot.settings.safety
    before = safety.action
    safety.action = value  # type: ignore[assignment]
    try:
        yield
    finally:
        safety.action = before


@on("withhold")
async def test_spoiler_hides_an_explicit_image_in_a_normal_channel(studio: Studio, figure_png: bytes) -> None:
    with action(studio, "spoiler"):
        job_id, result = await refine(studio, figure_png, studio.channel)
    assert [a.filename for a in result.attachments] == [f"SPOILER_{job_id}-1.png"]
    assert "hidden behind a spoiler" in note(result)
    await assert_posted_image_is_explicit(studio, result)


@on("withhold")
@pytest.mark.parametrize("mode", ["withhold", "spoiler"])
async def test_an_age_restricted_channel_gets_the_explicit_image_as_is(
    studio: Studio, mode: str, figure_png: bytes
) -> None:
    with action(studio, mode):
        job_id, result = await refine(studio, figure_png, studio.nsfw)
    assert [a.filename for a in result.attachments] == [f"{job_id}-1.png"]
    assert note(result) == ""
    await assert_posted_image_is_explicit(studio, result)


@on("disabled")
async def test_with_safety_disabled_nothing_is_withheld(studio: Studio, figure_png: bytes) -> None:
    disabled = studio
    job_id, result = await refine(disabled, figure_png, disabled.channel)
    assert [a.filename for a in result.attachments] == [f"{job_id}-1.png"]
    assert note(result) == ""
    assert not disabled.bot.wiring.safety.loaded  # the classifier is not even loaded


@on("withhold")
async def test_clean_images_in_a_normal_channel_are_posted(studio: Studio) -> None:
    withhold = studio
    member = withhold.new_member("painter")
    inter = await withhold.command(member, "generate", {"prompt": "a nude figure", "count": 2})
    job_id = job_id_of(inter)
    result = await withhold.result_of(job_id)
    assert [a.filename for a in result.attachments] == [f"{job_id}-1.png", f"{job_id}-2.png"]
    assert note(result) == ""


@on("withhold")
@pytest.mark.parametrize("where", ["channel", "nsfw"])
async def test_explicit_previews_are_shown_only_in_age_restricted_channels(
    studio: Studio, where: str, figure_png: bytes
) -> None:
    engine: IdentityRefineEngine = studio.bot.wiring.engine.inner  # type: ignore[attr-defined]
    engine.preview, engine.hold = encode(skin_figure(128), "JPEG"), asyncio.Event()
    try:
        member = studio.new_member("previewer")
        inter = await studio.command(
            member,
            "refine",
            {"strength": 0.05},
            channel=getattr(studio, where),
            attachments=[("in.png", figure_png, "image/png")],
        )
        job_id = job_id_of(inter)
        # The result is held back until a progress edit (at most one per 2 s) has been made.
        await studio.sb.wait_for_message(
            lambda m: m.content.startswith("Running") and "step " in m.content and f"`{job_id}`" in m.content,
            timeout=30,
        )
    finally:
        engine.hold.set()
        engine.preview, engine.hold = None, None
    status = await studio.status_text(job_id, "Done")
    running = [v for v in status.history if v.content.startswith("Running") and "step " in v.content]
    shown = [v for v in running if v.attachments]
    if where == "nsfw":
        assert shown, "no preview in the age-restricted channel"
    else:
        assert running and not shown, "an explicit preview was shown in a normal channel"
