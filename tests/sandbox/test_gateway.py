"""Gateway behaviour with plain discord.py clients: heartbeats, intents, member chunking,
session invalidation (re-IDENTIFY) and op 7 reconnect requests (RESUME)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import discord
import pytest

from sandbox import Sandbox

from .conftest import build_world


class QuickClient(discord.Client):
    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py sleeps 5 s before every non-initial IDENTIFY (Discord's identify rate
        limit); skip that here so re-identification tests stay fast."""


@contextlib.asynccontextmanager
async def connected(sb: Sandbox, intents: discord.Intents) -> AsyncIterator[discord.Client]:
    client = QuickClient(intents=intents, guild_ready_timeout=0.05)
    with sb.patch_discord():
        task = asyncio.create_task(client.start(sb.token))
        try:
            await sb.wait_ready()
            await asyncio.wait_for(client.wait_until_ready(), 5)
            yield client
        finally:
            await client.close()
            await asyncio.wait_for(task, 5)


async def test_heartbeats_chunking_and_message_content(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sandbox")
    async with Sandbox(heartbeat_interval=0.05) as sb:
        w = build_world(sb)
        async with connected(sb, discord.Intents.all()) as client:
            guild = client.get_guild(w.guild.id)
            assert guild is not None and guild.chunked and guild.member_count == 5
            assert guild.get_member(w.mod.id).guild_permissions.manage_guild
            await sb.wait_until(lambda: sb.gateway.heartbeat_count >= 3, 5, "heartbeats")
            assert client.latency < 1.0  # heartbeat ACKs arrive
            seen = asyncio.get_running_loop().create_future()
            client.event(on_message := _capture(seen))
            assert on_message
            await sb.send_as_user(w.alice, w.studio, "visible with the intent")
            assert (await asyncio.wait_for(seen, 3)).content == "visible with the intent"
    assert "gateway: bot identified" in caplog.text and sb.token not in caplog.text


def _capture(future: asyncio.Future[discord.Message]):
    async def on_message(message: discord.Message) -> None:
        if not future.done():
            future.set_result(message)

    return on_message


async def test_privileged_intents_must_be_allowed() -> None:
    async with Sandbox(allowed_intents=0) as sb:
        build_world(sb)
        client = discord.Client(intents=discord.Intents.all())
        with sb.patch_discord(), pytest.raises(discord.PrivilegedIntentsRequired):
            await asyncio.wait_for(client.start(sb.token), 5)
        await client.close()


async def test_invalidated_session_reidentifies_and_reconnect_resumes() -> None:
    async with Sandbox() as sb:
        build_world(sb)
        async with connected(sb, discord.Intents.default()):
            sb.gateway.invalidate_sessions()
            await sb.wait_until(lambda: sb.gateway.identify_count == 2 and sb.gateway.connected, 10, "re-identify")
            sb.gateway.request_reconnect()
            await sb.wait_resumed(1)
            assert sb.gateway.identify_count == 2 and len(sb.gateway.live_sessions()) == 1
