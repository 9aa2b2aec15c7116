"""Request parsing and response writing shared by the REST modules.

discord.py only decodes bodies whose Content-Type is exactly ``application/json`` (aiohttp's
``json_response`` adds ``; charset=utf-8``, which makes discord.py see a str and crash), so every
JSON answer goes through :func:`json_response`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from . import api_errors as errors
from .messages import Upload

FILE_FIELD = re.compile(r"^files?\[(\d+)\]$|^file(\d*)$")
TOKEN_IN_PATH = re.compile(r"(/(?:webhooks/\d+|interactions/\d+)/)([^/?]+)")


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    out = {"Content-Type": "application/json"}
    out.update(headers or {})
    return web.Response(status=status, body=json.dumps(data).encode(), headers=out)


def no_content() -> web.Response:
    return web.Response(status=204)


def error_response(exc: errors.ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(exc.body(), status=exc.status, headers=headers)


def redact(path: str) -> str:
    """Hide interaction/webhook tokens before a path reaches logs or the request record."""
    return TOKEN_IN_PATH.sub(r"\1***", path)


async def read_body(request: web.Request) -> tuple[dict[str, Any], list[Upload]]:
    """JSON body, or multipart ``payload_json`` + ``files[N]`` parts, as Discord accepts them."""
    if request.content_type.startswith("multipart/"):
        body: dict[str, Any] = {}
        uploads: list[Upload] = []
        reader = await request.multipart()
        next_index = 0
        async for part in reader:
            if part is None or not hasattr(part, "name"):
                continue
            name = part.name or ""
            if name == "payload_json":
                try:
                    body = json.loads(await part.text())
                except ValueError:
                    raise errors.invalid_json() from None
                continue
            match = FILE_FIELD.match(name)
            if match is None:
                continue
            index_text = match.group(1) or match.group(2)
            index = int(index_text) if index_text else next_index
            next_index = max(next_index, index + 1)
            data = await part.read(decode=False)
            content_type = part.headers.get("Content-Type")
            uploads.append(
                Upload(
                    index=index,
                    filename=part.filename or f"file{index}",
                    data=bytes(data),
                    content_type=content_type,
                )
            )
        if not isinstance(body, dict):
            raise errors.invalid_json()
        return body, uploads
    raw = await request.read()
    if not raw:
        return {}, []
    try:
        body = json.loads(raw)
    except ValueError:
        raise errors.invalid_json() from None
    if not isinstance(body, dict):
        raise errors.invalid_json()
    return body, []


async def read_json(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise errors.invalid_json() from None
