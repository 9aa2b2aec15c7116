"""The REST surface checked directly over HTTP: auth, exact JSON content type, Discord's limits
and error codes, attachment edits, command-definition validation. No bot needed, so these are fast.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import discord
import pytest
import pytest_asyncio

from sandbox import Sandbox

from .conftest import Lab, build_world


@pytest_asyncio.fixture
async def world() -> AsyncIterator[Lab]:
    async with Sandbox() as sb:
        yield build_world(sb)


@pytest_asyncio.fixture
async def http(world: Lab) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bot {world.sb.token}"}
    async with aiohttp.ClientSession(base_url=world.sb.url, headers=headers) as session:
        yield session


def api(path: str) -> str:
    return f"/api/v10{path}"


async def call(http: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with http.request(method, api(path), **kw) as r:
        if r.status == 204:
            return r.status, None
        assert r.headers["Content-Type"] == "application/json"  # exactly, or discord.py breaks
        return r.status, await r.json()


def multipart(payload: dict[str, Any], files: list[tuple[str, bytes]]) -> aiohttp.FormData:
    form = aiohttp.FormData(quote_fields=False)
    form.add_field("payload_json", json.dumps(payload))
    for i, (name, data) in enumerate(files):
        form.add_field(f"files[{i}]", data, filename=name, content_type="application/octet-stream")
    return form


async def test_auth_and_identity(world: Lab, http: aiohttp.ClientSession) -> None:
    sb = world.sb
    status, me = await call(http, "GET", "/users/@me")
    assert status == 200 and me["id"] == str(sb.bot_user.id) and me["bot"] is True
    async with (
        aiohttp.ClientSession(base_url=sb.url) as anon,
        anon.get(api("/users/@me"), headers={"Authorization": "Bot wrong"}) as r,
    ):
        assert r.status == 401 and (await r.json())["message"] == "401: Unauthorized"
    status, app = await call(http, "GET", "/oauth2/applications/@me")
    assert app["id"] == str(sb.application_id) and app["owner"]["id"] == str(sb.owner.id)
    status, gw = await call(http, "GET", "/gateway/bot")
    assert gw["url"] == sb.gateway_url and gw["shards"] == 1
    status, body = await call(http, "GET", "/nothing/here")
    assert status == 404 and body == {"message": "404: Not Found", "code": 0}


async def test_bad_token_is_a_login_failure(world: Lab) -> None:
    client = discord.Client(intents=discord.Intents.none())
    with world.sb.patch_discord(), pytest.raises(discord.LoginFailure):
        await client.login("not-the-token")
    await client.close()


async def test_message_limits(world: Lab, http: aiohttp.ClientSession) -> None:
    path = f"/channels/{world.studio.id}/messages"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"content": "x" * 2001}, "content"),
        ({"embeds": [{"title": str(i)} for i in range(11)]}, "embeds"),
        ({"embeds": [{"description": "d" * 4097}]}, "embeds"),
        (
            {
                "content": "x",
                "components": [
                    {"type": 1, "components": [{"type": 2, "style": 1, "label": "a", "custom_id": "c" * 101}]}
                ],
            },
            "components",
        ),
        (
            {
                "content": "x",
                "components": [
                    {"type": 1, "components": [{"type": 2, "style": 1, "label": str(i), "custom_id": str(i)}]}
                    for i in range(6)
                ],
            },
            "components",
        ),
        (
            {
                "content": "x",
                "components": [
                    {
                        "type": 1,
                        "components": [
                            {"type": 2, "style": 1, "label": "a", "custom_id": "same"},
                            {"type": 2, "style": 1, "label": "b", "custom_id": "same"},
                        ],
                    }
                ],
            },
            "components",
        ),
    ]
    for body, field in cases:
        status, err = await call(http, "POST", path, json=body)
        assert status == 400 and err["code"] == 50035 and field in err["errors"], (body, err)
    status, err = await call(http, "POST", path, json={"embeds": [{"description": "d" * 4097}]})
    assert err["errors"]["embeds"]["0"]["description"]["_errors"][0]["code"] == "BASE_TYPE_MAX_LENGTH"
    status, err = await call(http, "POST", path, json={"content": ""})
    assert status == 400 and err["code"] == 50006
    eleven = multipart({"content": "many"}, [(f"{i}.txt", b"x") for i in range(11)])
    status, err = await call(http, "POST", path, data=eleven)
    assert status == 400 and "attachments" in err["errors"]


async def test_upload_limit(world: Lab, http: aiohttp.ClientSession) -> None:
    world.sb.settings.upload_limit = 1000
    path = f"/channels/{world.studio.id}/messages"
    status, err = await call(http, "POST", path, data=multipart({}, [("big.bin", b"x" * 1001)]))
    assert status == 413 and err["code"] == 40005
    status, ok = await call(http, "POST", path, data=multipart({}, [("ok.bin", b"x" * 1000)]))
    assert status == 200 and ok["attachments"][0]["size"] == 1000


async def test_attachments_kept_removed_added_on_edit(world: Lab, http: aiohttp.ClientSession) -> None:
    path = f"/channels/{world.studio.id}/messages"
    status, msg = await call(http, "POST", path, data=multipart({"content": "v1"}, [("a.txt", b"A"), ("b.txt", b"B")]))
    assert status == 200 and [a["filename"] for a in msg["attachments"]] == ["a.txt", "b.txt"]
    assert msg["attachments"][0]["content_type"].startswith("text/plain")
    keep = msg["attachments"][1]
    edit = multipart({"attachments": [{"id": keep["id"]}, {"id": 0, "filename": "c.txt"}]}, [("c.txt", b"C")])
    status, edited = await call(http, "PATCH", f"{path}/{msg['id']}", data=edit)
    assert [a["filename"] for a in edited["attachments"]] == ["b.txt", "c.txt"]
    assert edited["attachments"][0]["id"] == keep["id"] and edited["content"] == "v1" and edited["edited_timestamp"]
    async with aiohttp.ClientSession() as anon, anon.get(edited["attachments"][1]["url"]) as r:
        assert await r.read() == b"C"
    status, cleared = await call(http, "PATCH", f"{path}/{msg['id']}", json={"attachments": []})
    assert cleared["attachments"] == []
    stored = world.sb.world.messages[int(msg["id"])]
    assert [len(h.attachments) for h in stored.history] == [2, 2]


async def test_read_reply_delete_and_unknown(world: Lab, http: aiohttp.ClientSession) -> None:
    path = f"/channels/{world.studio.id}/messages"
    _, first = await call(http, "POST", path, json={"content": "first"})
    _, reply = await call(
        http, "POST", path, json={"content": "second", "message_reference": {"message_id": first["id"]}}
    )
    assert reply["type"] == 19 and reply["referenced_message"]["id"] == first["id"]
    status, listed = await call(http, "GET", path, params={"limit": "10"})
    assert [m["content"] for m in listed] == ["second", "first"]  # newest first, like Discord
    status, _ = await call(http, "DELETE", f"{path}/{first['id']}")
    assert status == 204
    status, err = await call(http, "GET", f"{path}/{first['id']}")
    assert status == 404 and err["code"] == 10008
    status, err = await call(http, "POST", path, json={"content": "x", "message_reference": {"message_id": "1"}})
    assert status == 400 and err["code"] == 50035


async def test_channel_permissions(world: Lab, http: aiohttp.ClientSession) -> None:
    status, err = await call(http, "POST", f"/channels/{world.quiet.id}/messages", json={"content": "hi"})
    assert status == 403 and err["code"] == 50013
    status, chan = await call(http, "GET", f"/channels/{world.lounge.id}")
    assert chan["nsfw"] is True
    status, member = await call(http, "GET", f"/guilds/{world.guild.id}/members/{world.mod.id}")
    assert member["roles"] == [str(world.mod_role.id)]
    status, roles = await call(http, "GET", f"/guilds/{world.guild.id}/roles")
    assert {r["name"] for r in roles} >= {"@everyone", "Moderators"}
    status, dm = await call(http, "POST", "/users/@me/channels", json={"recipient_id": str(world.alice.id)})
    assert dm["type"] == 1 and dm["recipients"][0]["id"] == str(world.alice.id)


async def test_command_definitions_are_validated(world: Lab, http: aiohttp.ClientSession) -> None:
    path = f"/applications/{world.sb.application_id}/commands"
    too_many = [{"name": f"c{i}", "value": str(i)} for i in range(26)]
    bad = [
        [{"name": "Bad Name", "description": "x"}],
        [{"name": "ok", "description": ""}],
        [
            {
                "name": "ok",
                "description": "x",
                "options": [{"type": 3, "name": "o", "description": "x", "choices": too_many}],
            }
        ],
        [
            {
                "name": "ok",
                "description": "x",
                "options": [
                    {"type": 3, "name": "a", "description": "x"},
                    {"type": 3, "name": "b", "description": "x", "required": True},
                ],
            }
        ],
        [{"name": "dup", "description": "x"}, {"name": "dup", "description": "y"}],
    ]
    for payload in bad:
        status, err = await call(http, "PUT", path, json=payload)
        assert status == 400 and err["code"] == 50035, payload
    good = [{"name": "hello", "description": "x"}]
    _, first = await call(http, "PUT", path, json=good)
    _, second = await call(http, "PUT", path, json=good)
    assert first[0]["id"] == second[0]["id"]  # re-syncing keeps command ids, as on Discord
