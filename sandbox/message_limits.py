"""Discord's message limits, enforced with the same error codes and field paths as the real API.

The point of the sandbox is that a bot which passes its tests here does not hit these errors on
Discord: oversize content/embeds, too many rows or attachments, long custom_ids, big uploads.
"""

from __future__ import annotations

from typing import Any

from . import api_errors as errors
from .records import IS_COMPONENTS_V2

MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_ATTACHMENTS = 10
MAX_ROWS = 5
MAX_ROW_ITEMS = 5
MAX_CUSTOM_ID = 100
MAX_BUTTON_LABEL = 80
MAX_SELECT_OPTIONS = 25
MAX_V2_COMPONENTS = 40
MAX_EMBED_TOTAL = 6000
EMBED_LIMITS = {"title": 256, "description": 4096}
MAX_FIELDS = 25
MAX_FIELD_NAME = 256
MAX_FIELD_VALUE = 1024
MAX_FOOTER = 2048
MAX_AUTHOR_NAME = 256

BUTTON = 2
STRING_SELECT = 3
LINK_STYLE = 5
PREMIUM_STYLE = 6
SELECT_TYPES = (3, 5, 6, 7, 8)


def check_message(body: dict[str, Any], *, upload_count: int) -> None:
    """Validate the fields present in a create/edit body (absent fields are left alone)."""
    content = body.get("content")
    if content is not None:
        if not isinstance(content, str):
            raise errors.invalid_form("content", "BASE_TYPE_BAD_STRING", "Must be a string.")
        if len(content) > MAX_CONTENT:
            raise errors.too_long("content", MAX_CONTENT)
    embeds = body.get("embeds")
    if embeds is not None:
        check_embeds(embeds)
    components = body.get("components")
    if components is not None:
        if int(body.get("flags") or 0) & IS_COMPONENTS_V2:
            check_components_v2(components)
        else:
            check_components(components)
    attachments = body.get("attachments")
    count = max(len(attachments) if isinstance(attachments, list) else 0, upload_count)
    if count > MAX_ATTACHMENTS:
        raise errors.too_long("attachments", MAX_ATTACHMENTS)


def check_embeds(embeds: Any) -> None:
    if not isinstance(embeds, list):
        raise errors.invalid_form("embeds", "BASE_TYPE_BAD_ARRAY", "Must be an array.")
    if len(embeds) > MAX_EMBEDS:
        raise errors.too_long("embeds", MAX_EMBEDS)
    total = 0
    for i, embed in enumerate(embeds):
        for key, limit in EMBED_LIMITS.items():
            value = embed.get(key)
            if value is not None:
                if len(str(value)) > limit:
                    raise errors.too_long(f"embeds.{i}.{key}", limit)
                total += len(str(value))
        fields = embed.get("fields") or []
        if len(fields) > MAX_FIELDS:
            raise errors.too_long(f"embeds.{i}.fields", MAX_FIELDS)
        for j, fld in enumerate(fields):
            for key, limit in (("name", MAX_FIELD_NAME), ("value", MAX_FIELD_VALUE)):
                text = str(fld.get(key) or "")
                if not text:
                    raise errors.invalid_form(
                        f"embeds.{i}.fields.{j}.{key}", "BASE_TYPE_REQUIRED", "This field is required"
                    )
                if len(text) > limit:
                    raise errors.too_long(f"embeds.{i}.fields.{j}.{key}", limit)
                total += len(text)
        footer = (embed.get("footer") or {}).get("text") or ""
        if len(footer) > MAX_FOOTER:
            raise errors.too_long(f"embeds.{i}.footer.text", MAX_FOOTER)
        author = (embed.get("author") or {}).get("name") or ""
        if len(author) > MAX_AUTHOR_NAME:
            raise errors.too_long(f"embeds.{i}.author.name", MAX_AUTHOR_NAME)
        total += len(footer) + len(author)
        colour = embed.get("color")
        if colour is not None and not (isinstance(colour, int) and 0 <= colour <= 0xFFFFFF):
            raise errors.invalid_form(f"embeds.{i}.color", "NUMBER_TYPE_MAX", "int value should be <= 16777215.")
    if total > MAX_EMBED_TOTAL:
        raise errors.invalid_form("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")


def _check_interactive(item: dict[str, Any], path: str, seen: set[str]) -> None:
    kind = item.get("type")
    custom_id = item.get("custom_id")
    if kind == BUTTON:
        style = item.get("style")
        if style not in (1, 2, 3, 4, 5, 6):
            raise errors.invalid_form(f"{path}.style", "BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3, 4, 5, 6}.")
        if style == LINK_STYLE:
            if not item.get("url"):
                raise errors.invalid_form(f"{path}.url", "BASE_TYPE_REQUIRED", "This field is required")
            if custom_id is not None:
                raise errors.invalid_form(
                    f"{path}.custom_id", "BUTTON_COMPONENT_CUSTOM_ID_DISALLOWED", "A custom id is not allowed"
                )
        elif style != PREMIUM_STYLE and not custom_id:
            raise errors.invalid_form(f"{path}.custom_id", "BASE_TYPE_REQUIRED", "This field is required")
        label = item.get("label")
        if label is not None and len(label) > MAX_BUTTON_LABEL:
            raise errors.too_long(f"{path}.label", MAX_BUTTON_LABEL)
        if not label and not item.get("emoji") and style != PREMIUM_STYLE:
            raise errors.invalid_form(f"{path}", "BUTTON_COMPONENT_INVALID", "A button must have a label or an emoji")
    elif kind in SELECT_TYPES:
        if not custom_id:
            raise errors.invalid_form(f"{path}.custom_id", "BASE_TYPE_REQUIRED", "This field is required")
        if kind == STRING_SELECT and len(item.get("options") or []) > MAX_SELECT_OPTIONS:
            raise errors.too_long(f"{path}.options", MAX_SELECT_OPTIONS)
    if custom_id is not None:
        if len(str(custom_id)) > MAX_CUSTOM_ID:
            raise errors.too_long(f"{path}.custom_id", MAX_CUSTOM_ID)
        if custom_id in seen:
            raise errors.invalid_form(
                f"{path}.custom_id",
                "COMPONENT_CUSTOM_ID_DUPLICATED",
                "Component custom id cannot be duplicated",
            )
        seen.add(str(custom_id))


def check_components(rows: Any) -> None:
    """Classic layout: at most 5 action rows of at most 5 buttons or one select each."""
    if not isinstance(rows, list):
        raise errors.invalid_form("components", "BASE_TYPE_BAD_ARRAY", "Must be an array.")
    if len(rows) > MAX_ROWS:
        raise errors.too_long("components", MAX_ROWS)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row.get("type") != 1:
            raise errors.invalid_form(
                f"components.{i}.type", "UNION_TYPE_CHOICES", 'Value of field "type" must be one of (1,).'
            )
        items = row.get("components") or []
        if not items:
            raise errors.invalid_form(
                f"components.{i}.components", "BASE_TYPE_MIN_LENGTH", "Must be 1 or more in length."
            )
        if len(items) > MAX_ROW_ITEMS:
            raise errors.too_long(f"components.{i}.components", MAX_ROW_ITEMS)
        if any(it.get("type") in SELECT_TYPES for it in items) and len(items) > 1:
            raise errors.invalid_form(
                f"components.{i}.components",
                "COMPONENT_LAYOUT_WIDTH_EXCEEDED",
                "The specified component exceeds the maximum width",
            )
        for j, item in enumerate(items):
            _check_interactive(item, f"components.{i}.components.{j}", seen)


def check_components_v2(components: Any) -> None:
    """Components v2 (flag 1<<15): at most 40 components in total, same custom_id rules."""
    seen: set[str] = set()
    count = 0

    def walk(items: list[dict[str, Any]], path: str) -> None:
        nonlocal count
        for i, item in enumerate(items):
            count += 1
            here = f"{path}.{i}"
            if item.get("type") == BUTTON or item.get("type") in SELECT_TYPES:
                _check_interactive(item, here, seen)
            if isinstance(item.get("components"), list):
                walk(item["components"], f"{here}.components")
            for key in ("accessory", "component"):
                if isinstance(item.get(key), dict):
                    walk([item[key]], f"{here}.{key}")

    walk(components, "components")
    if count > MAX_V2_COMPONENTS:
        raise errors.too_long("components", MAX_V2_COMPONENTS)
