"""Uploaded files: stored in memory, described like Discord attachments, served over HTTP.

Attachment ``url``/``proxy_url`` point back at the sandbox so ``Attachment.read()`` in the bot
downloads the exact bytes a test uploaded (or the bot posted) with no network access.
"""

from __future__ import annotations

import io
import logging
import mimetypes
from collections.abc import Callable
from urllib.parse import quote

from aiohttp import web

from .records import StoredFile
from .snowflakes import SnowflakeFactory
from .world import World

log = logging.getLogger(__name__)

OCTET = "application/octet-stream"


def image_info(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, mime) when ``data`` is an image Pillow can identify, else None."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # pragma: no cover - Pillow is a project dependency
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            mime = Image.MIME.get(img.format or "", None) or OCTET
            return img.width, img.height, mime
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        # A decompression bomb (a tiny file declaring billions of pixels) is stored like any
        # file; the bot must catch it by its content.
        return None


class FileStore:
    """Creates :class:`StoredFile` records and serves them under ``/cdn`` and ``/media``."""

    def __init__(self, world: World, snowflakes: SnowflakeFactory, base_url: Callable[[], str]) -> None:
        self._world = world
        self._snowflakes = snowflakes
        self._base_url = base_url

    def store(
        self,
        filename: str,
        data: bytes,
        content_type: str | None,
        *,
        scope: int,
        description: str | None = None,
        ephemeral: bool = False,
    ) -> StoredFile:
        """Keep ``data`` and return its attachment record; content type/size sniffed like Discord."""
        file_id = self._snowflakes.next()
        info = image_info(data)
        width = height = None
        if info is not None:
            width, height, content_type = info
        elif not content_type or content_type == OCTET:
            content_type = mimetypes.guess_type(filename)[0] or content_type
        folder = "ephemeral-attachments" if ephemeral else "attachments"
        path = f"{folder}/{scope}/{file_id}/{quote(filename)}"
        base = self._base_url()
        stored = StoredFile(
            id=file_id,
            filename=filename,
            content_type=content_type,
            data=data,
            url=f"{base}/cdn/{path}",
            proxy_url=f"{base}/media/{path}",
            width=width,
            height=height,
            description=description,
            ephemeral=ephemeral,
        )
        self._world.files[file_id] = stored
        return stored

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/cdn/{folder}/{scope}/{file_id}/{filename}", self._serve),
            web.get("/media/{folder}/{scope}/{file_id}/{filename}", self._serve),
        ]

    async def _serve(self, request: web.Request) -> web.Response:
        try:
            stored = self._world.files[int(request.match_info["file_id"])]
        except (KeyError, ValueError):
            return web.Response(status=404, text="This content is no longer available.")
        if stored.filename != request.match_info["filename"]:
            return web.Response(status=404, text="This content is no longer available.")
        return web.Response(body=stored.data, headers={"Content-Type": stored.content_type or OCTET})
