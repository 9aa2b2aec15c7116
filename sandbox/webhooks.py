"""Interaction callbacks and the interaction webhook (follow-ups, original response).

This is where Discord's interaction rules live: one initial response (40060 after that), within
the response window (10062 after it), token-authenticated webhooks that die after the token TTL
(50027), the deferred "thinking" message that the first follow-up replaces, and component
responses (types 6/7) whose "original" is the message holding the component.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from . import api_errors as errors
from .http_json import json_response, no_content, read_body
from .interactions import (
    APPLICATION_COMMAND,
    AUTOCOMPLETE,
    AUTOCOMPLETE_RESULT,
    CHANNEL_MESSAGE,
    DEFERRED_CHANNEL_MESSAGE,
    DEFERRED_UPDATE_MESSAGE,
    MESSAGE_COMPONENT,
    MODAL,
    MODAL_SUBMIT,
    PING,
    PONG,
    UPDATE_MESSAGE,
    CallbackRecord,
    InteractionRecord,
)
from .messages import Upload
from .payloads import message_payload
from .records import EPHEMERAL, Message

if TYPE_CHECKING:
    from .server import Sandbox

log = logging.getLogger(__name__)

CHAT_INPUT_COMMAND_MESSAGE = 20
ALLOWED_CALLBACKS = {
    PING: {PONG},
    APPLICATION_COMMAND: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, MODAL},
    MESSAGE_COMPONENT: {
        CHANNEL_MESSAGE,
        DEFERRED_CHANNEL_MESSAGE,
        DEFERRED_UPDATE_MESSAGE,
        UPDATE_MESSAGE,
        MODAL,
    },
    AUTOCOMPLETE: {AUTOCOMPLETE_RESULT},
    MODAL_SUBMIT: {CHANNEL_MESSAGE, DEFERRED_CHANNEL_MESSAGE, DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE},
}
TRUE_VALUES = ("1", "true", "True")


def command_path(data: dict[str, Any]) -> str:
    """Full invoked name ("mod quota set"), as Discord names it in the message's interaction data."""
    names = [data.get("name", "")]
    options = data.get("options") or []
    while options and options[0].get("type") in (1, 2):
        names.append(options[0]["name"])
        options = options[0].get("options") or []
    return " ".join(names)


class WebhookApi:
    def __init__(self, sandbox: Sandbox) -> None:
        self.sb = sandbox
        self.world = sandbox.world

    def routes(self) -> list[tuple[str, str, Any]]:
        hook = "/webhooks/{app_id}/{token}"
        return [
            ("POST", "/interactions/{interaction_id}/{token}/callback", self.callback),
            ("GET", hook, self.get_webhook),
            ("POST", hook, self.followup),
            ("GET", hook + "/messages/{message_id}", self.get_webhook_message),
            ("PATCH", hook + "/messages/{message_id}", self.edit_webhook_message),
            ("DELETE", hook + "/messages/{message_id}", self.delete_webhook_message),
        ]

    # -- initial response -----------------------------------------------------------------
    async def callback(self, request: web.Request) -> web.Response:
        now = asyncio.get_running_loop().time()
        try:
            inter = self.world.interactions[int(request.match_info["interaction_id"])]
        except (KeyError, ValueError):
            raise errors.unknown_interaction() from None
        if inter.token != request.match_info["token"]:
            raise errors.unknown_interaction()
        body, uploads = await read_body(request)
        if inter.response is not None:
            self._reject(inter, "already_acknowledged")
            raise errors.already_acknowledged()
        if now - inter.dispatched_at > self.sb.settings.response_window:
            self._reject(inter, "unknown_interaction")
            log.info(
                "interaction %s answered after %.2fs: Unknown interaction",
                inter.id,
                now - inter.dispatched_at,
            )
            raise errors.unknown_interaction()
        rtype = body.get("type")
        data = body.get("data") or {}
        allowed = ALLOWED_CALLBACKS.get(inter.type, set())
        if rtype not in allowed:
            raise errors.invalid_form(
                "type", "BASE_TYPE_CHOICES", f"Value must be one of {sorted(allowed)} for this interaction."
            )
        source = self.world.messages.get(inter.source_message_id or 0)
        before = {a.id for a in source.attachments} if source is not None else set()
        message = self._perform(inter, rtype, data, uploads)
        new_files = [a for a in message.attachments if a.id not in before] if message is not None else []
        inter.response = CallbackRecord(type=rtype, data=data, files=new_files, at=now, message=message)
        self.world.changed()
        log.debug("interaction %s acknowledged with type %s after %.3fs", inter.id, rtype, now - inter.dispatched_at)
        if request.query.get("with_response") not in TRUE_VALUES:
            return no_content()
        return json_response(self._callback_body(inter, rtype, message))

    def _perform(
        self, inter: InteractionRecord, rtype: int, data: dict[str, Any], uploads: list[Upload]
    ) -> Message | None:
        channel = self.world.channel(inter.channel_id)
        if rtype == CHANNEL_MESSAGE:
            msg = self._create(inter, channel, data, uploads)
            inter.original_message_id = msg.id
            return msg
        if rtype == DEFERRED_CHANNEL_MESSAGE:
            msg = self._create(inter, channel, {"flags": int(data.get("flags") or 0)}, [], loading=True)
            inter.original_message_id = msg.id
            return msg
        if rtype in (DEFERRED_UPDATE_MESSAGE, UPDATE_MESSAGE):
            source = self.world.messages.get(inter.source_message_id or 0)
            if source is None or source.deleted:
                raise errors.unknown_message()
            if rtype == UPDATE_MESSAGE:
                self.sb.messages.edit(source, data, uploads)
            inter.original_message_id = source.id
            return source if rtype == UPDATE_MESSAGE else None
        if rtype == AUTOCOMPLETE_RESULT:
            choices = data.get("choices") or []
            if len(choices) > 25:
                raise errors.too_long("data.choices", 25)
            for i, choice in enumerate(choices):
                if not 1 <= len(str(choice.get("name", ""))) <= 100:
                    raise errors.invalid_form(
                        f"data.choices.{i}.name",
                        "BASE_TYPE_BAD_LENGTH",
                        "Must be between 1 and 100 in length.",
                    )
            return None
        if rtype == MODAL:
            if len(str(data.get("custom_id", ""))) > 100:
                raise errors.too_long("data.custom_id", 100)
            if len(str(data.get("title", ""))) > 45:
                raise errors.too_long("data.title", 45)
            if not 1 <= len(data.get("components") or []) <= 5:
                raise errors.too_long("data.components", 5)
            return None
        return None

    def _create(
        self,
        inter: InteractionRecord,
        channel: Any,
        data: dict[str, Any],
        uploads: list[Upload],
        *,
        loading: bool = False,
        followup: bool = False,
    ) -> Message:
        meta: dict[str, Any] = {
            "id": str(inter.id),
            "type": inter.type,
            "user": inter.user.to_payload(),
            "authorizing_integration_owners": inter.payload.get("authorizing_integration_owners", {}),
        }
        if inter.type == APPLICATION_COMMAND:
            meta["name"] = command_path(inter.data)
            meta["command_type"] = inter.data.get("type", 1)
        if inter.source_message_id is not None:
            meta["interacted_message_id"] = str(inter.source_message_id)
        if followup and inter.original_message_id is not None:
            meta["original_response_message_id"] = str(inter.original_message_id)
        return self.sb.messages.create(
            channel,
            self.sb.bot_user,
            data,
            uploads,
            allow_ephemeral=True,
            visible_to=inter.user.id,
            loading=loading,
            msg_type=CHAT_INPUT_COMMAND_MESSAGE if inter.type == APPLICATION_COMMAND else 0,
            webhook_id=self.sb.application_id,
            interaction_meta=meta,
            interaction_id=inter.id,
        )

    def _callback_body(self, inter: InteractionRecord, rtype: int, message: Message | None) -> dict[str, Any]:
        info: dict[str, Any] = {"id": str(inter.id), "type": inter.type}
        body: dict[str, Any] = {"interaction": info}
        if message is not None:
            info.update(
                response_message_id=str(message.id),
                response_message_loading=message.loading,
                response_message_ephemeral=bool(message.flags & EPHEMERAL),
            )
            body["resource"] = {"type": rtype, "message": message_payload(self.world, message)}
        return body

    def _reject(self, inter: InteractionRecord, reason: str) -> None:
        inter.rejected.append(reason)
        self.world.changed()

    # -- webhook (token) routes -------------------------------------------------------------
    def _interaction(self, request: web.Request) -> InteractionRecord:
        try:
            app_id = int(request.match_info["app_id"])
        except ValueError:
            raise errors.unknown_webhook() from None
        if app_id != self.sb.application_id:
            raise errors.unknown_webhook()
        inter = self.world.interactions_by_token.get(request.match_info["token"])
        if inter is None or asyncio.get_running_loop().time() >= inter.token_expires_at:
            raise errors.invalid_webhook_token()
        return inter

    def _owned_message(self, inter: InteractionRecord, message_id: str) -> Message:
        if message_id == "@original":
            if inter.original_message_id is None:
                raise errors.unknown_message()
            target = inter.original_message_id
        else:
            try:
                target = int(message_id)
            except ValueError:
                raise errors.unknown_message() from None
            if target != inter.original_message_id and target not in inter.followup_ids:
                raise errors.unknown_message()
        msg = self.world.messages.get(target)
        if msg is None or msg.deleted:
            raise errors.unknown_message()
        return msg

    async def get_webhook(self, request: web.Request) -> web.Response:
        self._interaction(request)
        return json_response(
            {
                "id": str(self.sb.application_id),
                "type": 3,
                "name": self.sb.bot_user.username,
                "avatar": None,
                "channel_id": None,
                "guild_id": None,
                "application_id": str(self.sb.application_id),
            }
        )

    async def followup(self, request: web.Request) -> web.Response:
        inter = self._interaction(request)
        body, uploads = await read_body(request)
        if inter.response is None or inter.response.type in (AUTOCOMPLETE_RESULT, MODAL):
            raise errors.unknown_webhook()
        original = inter.original
        if inter.response.type == DEFERRED_CHANNEL_MESSAGE and original is not None and original.loading:
            # Discord: the first follow-up after a "thinking" defer replaces the loading message.
            body = {k: v for k, v in body.items() if k != "flags"}
            msg = self.sb.messages.edit(original, body, uploads)
        else:
            msg = self._create(inter, self.world.channel(inter.channel_id), body, uploads, followup=True)
            inter.followup_ids.append(msg.id)
            self.world.changed()
        if request.query.get("wait") not in TRUE_VALUES:
            return no_content()
        return json_response(message_payload(self.world, msg))

    async def get_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._interaction(request)
        msg = self._owned_message(inter, request.match_info["message_id"])
        return json_response(message_payload(self.world, msg))

    async def edit_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._interaction(request)
        msg = self._owned_message(inter, request.match_info["message_id"])
        body, uploads = await read_body(request)
        self.sb.messages.edit(msg, body, uploads)
        return json_response(message_payload(self.world, msg))

    async def delete_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._interaction(request)
        msg = self._owned_message(inter, request.match_info["message_id"])
        self.sb.messages.delete(msg)
        return no_content()
