"""`atelier demo`: a scripted session, fully offline.

Starts the built-in Discord-compatible sandbox on 127.0.0.1, the real bot against it and the tiny
random-weight SDXL, then plays what a community does on a first evening: generate, reroll,
upscale, a 4-image grid with a variation, refine an uploaded image, a picture following a sketch's
outlines (ControlNet, its edge map shown beside it), edits of the first picture (Vary Region on
a region picked from the picker, Zoom Out, Pan Right), a picture with a LoRA and a draft, a
moderator lowering a quota, and the over-quota refusal that follows. Every posted image and an HTML
transcript of the channel go to the output folder.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from config.settings import Settings
from engine.tiny import build_tiny_sdxl
from engine.tiny_addons import CONTROLNET, build_tiny_addons, tiny_draft, tiny_styling
from sandbox import Message, write_transcript
from studio.harness import Studio, job_id_of, open_studio, tiny_settings

log = logging.getLogger(__name__)

TINY_MODEL_DIR = Path("data/tiny-sdxl")
MENTION = re.compile(r"<@!?(\d+)>")


@dataclass
class Step:
    what: str
    outcome: str
    seconds: float


async def run_demo(settings: Settings, *, out_dir: str | Path = "demo-out") -> int:
    out = Path(out_dir)
    await asyncio.to_thread(prepare, out)
    with tempfile.TemporaryDirectory(prefix="atelier-demo-") as data:
        demo_settings = tiny_settings(
            TINY_MODEL_DIR,
            Path(data),
            generation={
                "default_steps": 8,
                "upscale_steps": 6,
                "aspects": {"1:1": "512x512", "4:5": "448x576", "16:9": "640x384"},
            },
            engine={"device": "cpu", "preview_every": 2, "preview_size": 96},
            quota={"default_limit": 20.0},
            logging={"level": settings.logging.level},
            controlnets={"edges": {"model": str(TINY_MODEL_DIR / CONTROLNET)}},
            # The tiny model's LoRAs, embedding and style, and its draft LoRA (engine.tiny_addons).
            models={
                "tiny": {
                    "base": str(TINY_MODEL_DIR / "base"),
                    "refiner": str(TINY_MODEL_DIR / "refiner"),
                    "default": True,
                    "description": "random-weight SDXL for the demo (noise by design)",
                    **tiny_draft(TINY_MODEL_DIR),
                },
            },
            **tiny_styling(TINY_MODEL_DIR),
        )
        started = time.monotonic()
        async with open_studio(demo_settings) as studio:
            steps = await play(studio)
            written = write_transcript(studio.sb, [studio.channel.id], out)
        total = time.monotonic() - started
    print_summary(steps, out, written, total)
    return 0 if all(not s.outcome.startswith("UNEXPECTED") for s in steps) else 1


def prepare(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if not (TINY_MODEL_DIR / "base" / "model_index.json").exists():
        print(f"building the tiny model in {TINY_MODEL_DIR} …")
        build_tiny_sdxl(TINY_MODEL_DIR)
    if not (TINY_MODEL_DIR / CONTROLNET / "config.json").exists():
        print(f"writing the tiny model's add-ons (ControlNet, …) in {TINY_MODEL_DIR} …")
        build_tiny_addons(TINY_MODEL_DIR)


async def play(studio: Studio) -> list[Step]:
    steps: list[Step] = []

    async def timed(what: str, coro: object) -> str:
        t0 = time.monotonic()
        outcome = await coro  # type: ignore[misc]
        steps.append(Step(what, outcome, time.monotonic() - t0))
        print(f"  {what:<52} {outcome}  ({time.monotonic() - t0:.1f} s)")
        return outcome

    alice, bob, mod = studio.alice, studio.bob, studio.mod
    print("playing the scripted session:")

    async def finished(job_id: str) -> Message:
        """The result, once its queue card also reads Done (the card is edited after the post)."""
        result = await studio.result_of(job_id)
        await studio.status_text(job_id, "Done")
        return result

    async def generate() -> str:
        inter = await studio.command(
            alice, "generate", {"prompt": "a lighthouse on a cliff at dusk, oil painting", "seed": 1234}
        )
        result = await finished(job_id_of(inter))
        state["first"] = result
        return f"posted {len(result.attachments)} image(s), job {job_id_of(inter)}"

    async def click(user: object, message_key: str, label: str, save_as: str | None = None) -> str:
        inter = await studio.click(user, state[message_key], label)  # type: ignore[arg-type]
        job = job_id_of(inter)
        result = await finished(job)
        if save_as:
            state[save_as] = result
        return f"posted {len(result.attachments)} image(s), job {job}"

    async def grid() -> str:
        inter = await studio.command(bob, "generate", {"prompt": "four tiny robots having tea", "count": 4})
        result = await finished(job_id_of(inter))
        state["grid"] = result
        return f"posted {len(result.attachments)} image(s), job {job_id_of(inter)}"

    async def refine() -> str:
        image = studio.sb.file_bytes(state["first"].attachments[0])
        inter = await studio.command(
            alice,
            "refine",
            {"prompt": "sharper details", "strength": 0.4},
            attachments=[("sketch.png", image, "image/png")],
        )
        result = await finished(job_id_of(inter))
        return f"posted {len(result.attachments)} image(s), job {job_id_of(inter)}"

    async def follow_sketch() -> str:
        inter = await studio.command(
            alice,
            "generate",
            {"prompt": "a cottage with a red door, watercolor", "control_strength": 1.0},
            attachments=[("sketch.png", sketch(), "image/png")],
        )
        job = job_id_of(inter)
        result = await finished(job)
        return f"posted {len(result.attachments)} image(s), job {job}: the picture and its edge map"

    async def vary_region() -> str:
        picker = await studio.click(bob, state["first"], "Vary Region")  # type: ignore[arg-type]
        message = picker.original
        if message is None:
            return "UNEXPECTED: no region picker"
        select = next(c for c in message.iter_components() if c.get("type") == 3)
        inter = await studio.sb.click(bob, message, select["custom_id"], values=["center"])
        await inter.wait_response(5)
        job = job_id_of(inter)
        result = await finished(job)
        return f"posted {len(result.attachments)} image(s), job {job}: the centre redone"

    async def with_lora() -> str:
        options = {"prompt": "a lighthouse on a cliff at dusk", "lora": "tiny-style:0.8", "seed": 1234}
        inter = await studio.command(alice, "generate", options)
        job = job_id_of(inter)
        result = await finished(job)
        shown = {f["name"]: f["value"] for f in result.embeds[0].get("fields", [])}
        return f"posted {len(result.attachments)} image(s), job {job}: LoRAs {shown.get('LoRAs', 'UNEXPECTED: none')}"

    async def draft() -> str:
        inter = await studio.command(alice, "generate", {"prompt": "a lighthouse, quick sketch", "draft": True})
        job = job_id_of(inter)
        result = await finished(job)
        shown = {f["name"]: f["value"] for f in result.embeds[0].get("fields", [])}
        return f"posted {len(result.attachments)} image(s), job {job}: a draft in {shown.get('Steps', '?')} steps"

    async def lower_quota() -> str:
        inter = await studio.command(mod, "mod quota set", {"user": bob, "limit": 0.5})
        assert inter.response is not None
        return f"moderator sees: {readable(studio, inter.response.content)}"

    async def over_quota() -> str:
        inter = await studio.command(bob, "generate", {"prompt": "one more robot", "count": 4})
        assert inter.response is not None
        text = inter.response.content or ""
        if text.startswith("Queued"):
            return "UNEXPECTED: the over-quota job was accepted"
        return f"refused (ephemeral): {first_sentence(text)}"

    state: dict[str, object] = {}
    await timed("alice /generate", generate())
    await timed("alice clicks Reroll", click(alice, "first", "Reroll"))
    await timed("alice clicks Upscale", click(alice, "first", "Upscale"))
    await timed("bob /generate count:4", grid())
    await timed("bob clicks V2", click(bob, "grid", "V2"))
    await timed("alice clicks Variations", click(alice, "first", "Variations"))
    await timed("alice /refine with an uploaded image", refine())
    await timed("alice /generate following a sketch (control)", follow_sketch())
    await timed("bob clicks Vary Region, picks the centre", vary_region())
    await timed("alice clicks Zoom Out", click(alice, "first", "Zoom Out"))
    await timed("alice clicks Pan Right", click(alice, "first", "Pan Right"))
    await timed("alice /generate with a LoRA", with_lora())
    await timed("alice /generate draft:true", draft())
    await timed("mia (moderator) /mod quota set bob 0.5", lower_quota())
    await timed("bob /generate count:4 again", over_quota())
    return steps


def sketch() -> bytes:
    """A member's line drawing of a cottage: what the ControlNet step follows (its edges)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (512, 512), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((136, 240, 376, 420), outline="black", width=6)  # walls
    draw.polygon([(116, 250), (256, 120), (396, 250)], outline="black", width=6)  # roof
    draw.rectangle((230, 320, 282, 420), outline="black", width=6)  # door
    draw.ellipse((400, 60, 470, 130), outline="black", width=6)  # the sun
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def readable(studio: Studio, text: str) -> str:
    """Message text for a terminal: user mentions as @name."""

    def name(match: re.Match[str]) -> str:
        user = studio.sb.world.users.get(int(match[1]))
        return f"@{user.display_name}" if user else match[0]

    return MENTION.sub(name, text)


def first_sentence(text: str) -> str:
    line = text.splitlines()[0] if text else ""
    end = line.find(". ")
    return line if end < 0 else line[: end + 1]


def print_summary(steps: list[Step], out: Path, written: object, total: float) -> None:
    images = sorted(p for p in out.rglob("*") if p.suffix.lower() in (".png", ".webp", ".jpg"))
    print()
    print(f"demo finished in {total:.1f} s: {len(steps)} steps, {len(images)} image files")
    print(f"transcript: {out / 'index.html'}")
