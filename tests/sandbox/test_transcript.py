"""The HTML transcript: embeds with colour bar and fields, images written next to the page,
buttons drawn with their style and emoji, markdown, replies and ephemeral markers."""

from __future__ import annotations

from pathlib import Path

from sandbox import Sandbox, write_transcript
from sandbox.messages import Upload

from .botkit import png_bytes
from .conftest import build_world


async def test_transcript_renders_embeds_images_buttons(tmp_path: Path) -> None:
    async with Sandbox() as sb:
        w = build_world(sb)
        image = png_bytes(12, 8)
        body = {
            "content": f"**Done** in <#{w.studio.id}> for <@{w.alice.id}> `seed 42`",
            "embeds": [
                {
                    "title": "a <cat>",
                    "description": "prompt: *fluffy*",
                    "color": 0x5865F2,
                    "fields": [{"name": "Seed", "value": "42", "inline": True}],
                    "image": {"url": "attachment://result.png"},
                    "footer": {"text": "Job abc123"},
                }
            ],
            "components": [
                {
                    "type": 1,
                    "components": [
                        {"type": 2, "style": 1, "label": "Reroll", "custom_id": "r", "emoji": {"name": "🎲"}},
                        {"type": 2, "style": 4, "label": "Delete", "custom_id": "d", "disabled": True},
                    ],
                }
            ],
        }
        msg = sb.messages.create(w.studio, sb.bot_user, body, [Upload(0, "result.png", image, "image/png")])
        assert msg.embeds[0]["image"]["url"] == msg.attachments[0].url  # attachment:// resolved like Discord
        assert msg.embeds[0]["image"]["width"] == 12
        sb.messages.create(w.studio, w.alice, {"content": "nice", "message_reference": {"message_id": msg.id}}, [])
        sb.messages.create(
            w.studio, sb.bot_user, {"content": "secret", "flags": 64}, [], allow_ephemeral=True, visible_to=w.bob.id
        )
        index = write_transcript(sb, None, tmp_path)
        page = index.read_text(encoding="utf-8")
        saved = tmp_path / f"{msg.attachments[0].id}-result.png"
        assert saved.read_bytes() == image
        assert f"<img class=eimg src='{saved.name}'" in page
        assert "background:#5865f2" in page and "<div class=fname>Seed</div>" in page
        assert "<b>Done</b>" in page and "<code>seed 42</code>" in page and "@Alice" in page and "#studio" in page
        assert "a &lt;cat&gt;" in page and "<i>fluffy</i>" in page
        assert "class='btn primary'><span>🎲</span>Reroll" in page and "class='btn danger disabled'" in page
        assert "↪ <b>@Atelier</b>" in page
        assert "Only you can see this (bob)" in page
