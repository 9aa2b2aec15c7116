"""Fixtures: a started Sandbox with a small server, and the real test bot connected to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest_asyncio

from sandbox import Channel, Guild, Role, Sandbox, User
from sandbox import permission_bits as perms

from .botkit import Recorder, TestBot


@dataclass
class Lab:
    sb: Sandbox
    guild: Guild
    studio: Channel
    lounge: Channel
    quiet: Channel
    alice: User
    bob: User
    mod: User
    mod_role: Role


def build_world(sb: Sandbox) -> Lab:
    guild = sb.add_guild("Atelier Lab")
    studio = sb.add_channel(guild, "studio")
    lounge = sb.add_channel(guild, "after-dark", nsfw=True)
    quiet = sb.add_channel(guild, "announcements", bot_can_send=False)
    alice, bob, mod = sb.add_user("alice", global_name="Alice"), sb.add_user("bob"), sb.add_user("mia")
    mod_role = sb.add_role(guild, "Moderators", perms.MANAGE_GUILD)
    sb.add_member(guild, alice)
    sb.add_member(guild, bob)
    sb.add_member(guild, mod, roles=[mod_role])
    return Lab(sb, guild, studio, lounge, quiet, alice, bob, mod, mod_role)


@dataclass
class Running:
    world: Lab
    bot: TestBot
    rec: Recorder

    @property
    def sb(self) -> Sandbox:
        return self.world.sb


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running() -> AsyncIterator[Running]:
    """Sandbox + real discord.py bot, ready and with its commands synced (shared per module)."""
    async with Sandbox() as sb:
        world = build_world(sb)
        rec = Recorder()
        bot = TestBot(rec)
        with sb.patch_discord():
            task = asyncio.create_task(bot.start(sb.token))
            await sb.wait_ready()
            await sb.wait_for_commands("echo", "mod", "upload")
            await asyncio.wait_for(bot.wait_until_ready(), 5)
            try:
                yield Running(world, bot, rec)
            finally:
                await bot.close()
                await asyncio.wait_for(task, 5)
