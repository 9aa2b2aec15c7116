"""The real bot, in this process, against the built-in sandbox: used by `atelier demo` and the
end-to-end tests, so both drive exactly the code that runs on Discord."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.app import AtelierBot
from bot.wiring import make_engine
from config.settings import Settings, load_settings
from engine.api import EngineClient
from sandbox import Channel, Guild, InteractionRecord, Message, Role, Sandbox, User
from sandbox import permission_bits as perms

log = logging.getLogger(__name__)

JOB_IN_TEXT = re.compile(r"Job `?([0-9A-Z]{8})`?")


def tiny_settings(model_dir: Path, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for the tiny model: small sizes and few steps, everything under `data_dir`."""
    sections: dict[str, Any] = {
        "database": {"url": f"sqlite+aiosqlite:///{data_dir / 'atelier.db'}"},
        "storage": {"output_dir": str(data_dir / "outputs")},
        "models": {
            "tiny": {
                "base": str(model_dir / "base"),
                "refiner": str(model_dir / "refiner"),
                "default": True,
                "description": "random-weight SDXL for tests and the demo (noise by design)",
            },
            "tiny-base": {"base": str(model_dir / "base"), "description": "the tiny base alone"},
        },
        "generation": {
            "default_steps": 4,
            "upscale_steps": 4,
            "aspects": {"1:1": "256x256", "4:5": "256x320", "16:9": "448x256"},
        },
        "engine": {"device": "cpu", "preview_every": 1, "preview_size": 64, "torch_threads": 1},
        "discord": {"api_base": "http://127.0.0.1:1/api/v10", "gateway": "ws://127.0.0.1:1/gateway"},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(sections.get(section), dict) and section != "models":
            sections[section] = {**sections[section], **values}
        else:
            sections[section] = values
    return load_settings(**sections)


@dataclass
class Studio:
    """A sandbox server with one guild, three members and the bot connected."""

    sb: Sandbox
    bot: AtelierBot
    guild: Guild
    channel: Channel
    nsfw: Channel
    alice: User
    bob: User
    mod: User
    mod_role: Role

    def new_member(self, name: str, *, roles: list[Role] | None = None) -> User:
        """A fresh member (own quota, own queue) so tests sharing one studio stay independent."""
        user = self.sb.add_user(name)
        self.sb.add_member(self.guild, user, roles=roles or [])
        return user

    async def command(
        self,
        user: User,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        channel: Channel | None = None,
        attachments: list[tuple[str, bytes, str]] | None = None,
        timeout: float = 5.0,
    ) -> InteractionRecord:
        inter = await self.sb.slash(user, channel or self.channel, name, options or {}, attachments=attachments)
        await inter.wait_response(timeout)
        return inter

    async def click(self, user: User, message: Message, label: str, timeout: float = 5.0) -> InteractionRecord:
        inter = await self.sb.click(user, message, label=label)
        await inter.wait_response(timeout)
        return inter

    async def result_of(self, job_id: str, *, timeout: float = 120.0) -> Message:
        """The result message of a job (the bot's message whose buttons name the job)."""

        def is_result(message: Message) -> bool:
            return any(
                f":{job_id}" in (component.get("custom_id") or "")
                and not (component.get("custom_id") or "").startswith("atelier:cancel:")
                for row in message.components or []
                for component in row.get("components", [])
            )

        return await self.sb.wait_for_message(is_result, timeout=timeout)

    async def status_text(self, job_id: str, prefix: str, *, timeout: float = 120.0) -> Message:
        """Wait until the job's status message starts with `prefix` (e.g. "Failed:", "Done")."""

        def matches(message: Message) -> bool:
            return message.content.startswith(prefix) and f"`{job_id}`" in message.content

        def found() -> Message | None:
            messages = self.sb.channel_messages(self.channel) + self.sb.channel_messages(self.nsfw)
            return next((m for m in messages if matches(m)), None)

        return await self.sb.wait_until(found, timeout=timeout)


def job_id_of(inter: InteractionRecord) -> str:
    """The job id on a queue card (the first response of an accepted command or click)."""
    assert inter.response is not None, "no response"
    match = JOB_IN_TEXT.search(inter.response.content or "")
    if match is None:
        raise AssertionError(f"no job id in {inter.response.content!r}")
    return match[1]


def build_world(sb: Sandbox) -> dict[str, Any]:
    guild = sb.add_guild("Atelier Lab")
    channel = sb.add_channel(guild, "studio")
    nsfw = sb.add_channel(guild, "after-dark", nsfw=True)
    alice, bob, mod = sb.add_user("alice", global_name="Alice"), sb.add_user("bob"), sb.add_user("mia")
    mod_role = sb.add_role(guild, "Moderators", perms.MANAGE_GUILD)
    sb.add_member(guild, alice)
    sb.add_member(guild, bob)
    sb.add_member(guild, mod, roles=[mod_role])
    return {
        "guild": guild,
        "channel": channel,
        "nsfw": nsfw,
        "alice": alice,
        "bob": bob,
        "mod": mod,
        "mod_role": mod_role,
    }


@contextlib.asynccontextmanager
async def open_bot(
    sb: Sandbox,
    settings: Settings,
    *,
    engine_factory: Callable[[Settings], EngineClient] = make_engine,
) -> AsyncIterator[AtelierBot]:
    """Start the real bot against a running sandbox; on exit shut it down as SIGTERM would."""
    bot = AtelierBot(settings, engine_factory=engine_factory, guild_ready_timeout=0.2)
    with sb.patch_discord():
        task = asyncio.create_task(bot.start(sb.token), name="atelier-bot")
        try:
            await asyncio.wait_for(bot.wait_until_ready(), 60)
            yield bot
        finally:
            await bot.shutdown(grace=0.0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)


@contextlib.asynccontextmanager
async def open_studio(
    settings: Settings,
    *,
    sandbox: Sandbox | None = None,
    engine_factory: Callable[[Settings], EngineClient] = make_engine,
) -> AsyncIterator[Studio]:
    own = sandbox is None
    sb = sandbox or Sandbox()
    if own:
        await sb.start()
    world = build_world(sb)
    try:
        async with open_bot(sb, settings, engine_factory=engine_factory) as bot:
            await sb.wait_for_commands("generate", "mod")
            await bot.wiring.engine.ready()
            yield Studio(sb=sb, bot=bot, **world)
    finally:
        if own:
            await sb.stop()
