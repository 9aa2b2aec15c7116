"""An attachment that an embed shows as its thumbnail (a ControlNet result's control map) is drawn
in the embed and not again among the message's attachments, as Discord does."""

from __future__ import annotations

from pathlib import Path

from sandbox import Sandbox, write_transcript
from sandbox.messages import Upload

from .botkit import png_bytes
from .conftest import build_world


async def test_a_thumbnail_attachment_is_shown_once_in_its_embed(tmp_path: Path) -> None:
    async with Sandbox() as sb:
        w = build_world(sb)
        body = {"embeds": [{"description": "a result", "thumbnail": {"url": "attachment://map.png"}}]}
        uploads = [
            Upload(0, "image.png", png_bytes(16, 16), "image/png"),
            Upload(1, "map.png", png_bytes(8, 8), "image/png"),
        ]
        msg = sb.messages.create(w.studio, sb.bot_user, body, uploads)
        image, shown = msg.attachments
        assert msg.embeds[0]["thumbnail"]["url"] == shown.url and msg.embeds[0]["thumbnail"]["width"] == 8
        page = write_transcript(sb, None, tmp_path).read_text(encoding="utf-8")
        assert page.count(f"{shown.id}-map.png") == 1 and f"<img class=thumb src='{shown.id}-map.png'" in page
        assert f"<img src='{image.id}-image.png'" in page
        assert (tmp_path / f"{shown.id}-map.png").exists()  # saved with the other images all the same
