"""A small real discord.py bot that exercises every interaction kind against the sandbox.

It is deliberately plain discord.py (commands.Bot, app_commands, DynamicItem, views, modals):
the sandbox is only useful if the unmodified library works against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

FLAVOURS = ["vanilla", "chocolate", "pistachio", "strawberry"]


def png_bytes(width: int = 8, height: int = 6, colour: tuple[int, int, int] = (200, 30, 60)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Recorder:
    """What the bot saw, for assertions (exceptions raised by discord.py calls, events)."""

    errors: list[BaseException] = field(default_factory=list)
    error_seen: asyncio.Event = field(default_factory=asyncio.Event)
    resumed: int = 0
    messages: list[discord.Message] = field(default_factory=list)
    seen: list[discord.Message] = field(default_factory=list)
    done: dict[str, asyncio.Event] = field(default_factory=dict)

    def fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.error_seen.set()

    def flag(self, name: str) -> None:
        self.done.setdefault(name, asyncio.Event()).set()

    async def wait_flag(self, name: str, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.done.setdefault(name, asyncio.Event()).wait(), timeout)


class Counter(discord.ui.DynamicItem[discord.ui.Button], template=r"tb:count:(?P<n>\d+)"):
    """Persistent button: each click edits the message (response type 7) with n+1."""

    def __init__(self, n: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"Count {n}", emoji="🎲", style=discord.ButtonStyle.primary, custom_id=f"tb:count:{n}"
            )
        )
        self.n = n

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str], /
    ) -> Counter:
        return cls(int(match["n"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None)
        view.add_item(Counter(self.n + 1))
        await interaction.response.edit_message(content=f"count {self.n + 1} by {interaction.user.name}", view=view)


class AskModal(discord.ui.Modal, title="Tell me"):
    answer = discord.ui.TextInput(label="Answer", custom_id="tb:answer", max_length=50)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"modal said {self.answer.value}", ephemeral=True)


class Ask(discord.ui.DynamicItem[discord.ui.Button], template=r"tb:ask"):
    """Persistent button that opens a modal (response type 9)."""

    def __init__(self) -> None:
        super().__init__(discord.ui.Button(label="Ask", style=discord.ButtonStyle.secondary, custom_id="tb:ask"))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: Any, match: Any, /) -> Ask:
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(AskModal())


class TestBot(commands.Bot):
    def __init__(self, recorder: Recorder, *, slow_seconds: float = 0.5) -> None:
        super().__init__(
            command_prefix="!",
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.recorder = recorder
        self.slow_seconds = slow_seconds
        self.release = asyncio.Event()

    async def setup_hook(self) -> None:
        self.add_dynamic_items(Counter, Ask)
        register(self)
        await self.tree.sync()

    async def on_resumed(self) -> None:
        self.recorder.resumed += 1

    async def on_message(self, message: discord.Message) -> None:
        if message.author != self.user:
            self.recorder.seen.append(message)
            self.recorder.flag(f"seen:{message.id}")


class FlavourSelect(discord.ui.Select["discord.ui.View"]):
    def __init__(self) -> None:
        options = [discord.SelectOption(label=f.title(), value=f) for f in FLAVOURS]
        super().__init__(custom_id="tb:flavours", placeholder="Pick flavours", max_values=2, options=options)

    async def callback(self, interaction: discord.Interaction) -> None:
        await interaction.response.edit_message(content=f"chose {', '.join(self.values)}", view=None)


def register(bot: TestBot) -> None:
    tree = bot.tree
    rec = bot.recorder

    @tree.command(description="Repeat text")
    @app_commands.describe(text="what to say", times="how often")
    async def echo(
        interaction: discord.Interaction,
        text: app_commands.Range[str, 1, 100],
        times: app_commands.Range[int, 1, 3] = 1,
        shout: bool = False,
    ) -> None:
        said = " ".join([text.upper() if shout else text] * times)
        view = discord.ui.View(timeout=None)
        view.add_item(Counter(0))
        view.add_item(Ask())
        await interaction.response.send_message(said, view=view)

    @tree.command(description="Pick a flavour")
    @app_commands.choices(flavour=[app_commands.Choice(name=f.title(), value=f) for f in FLAVOURS[:2]])
    async def pick(interaction: discord.Interaction, flavour: app_commands.Choice[str]) -> None:
        await interaction.response.send_message(f"picked {flavour.value}", ephemeral=True)

    @tree.command(description="Show a select menu")
    async def menu(interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None)
        view.add_item(FlavourSelect())
        await interaction.response.send_message("choose", view=view)

    @tree.command(description="Search flavours")
    async def search(interaction: discord.Interaction, query: str) -> None:
        await interaction.response.send_message(f"searched {query}")

    @search.autocomplete("query")
    async def search_complete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=f.title(), value=f) for f in FLAVOURS if f.startswith(current)]

    mod = app_commands.Group(name="mod", description="Moderation", guild_only=True)
    quota = app_commands.Group(name="quota", description="Quotas", parent=mod)

    @quota.command(name="set", description="Set a user's limit")
    async def quota_set(
        interaction: discord.Interaction, user: discord.Member, limit: app_commands.Range[int, 0, 1000]
    ) -> None:
        can = interaction.permissions.manage_guild
        await interaction.response.send_message(f"set {user.name} to {limit} (manage_guild={can})", ephemeral=True)

    tree.add_command(mod)

    @tree.command(description="Checksum an image and send it back")
    async def upload(interaction: discord.Interaction, image: discord.Attachment) -> None:
        data = await image.read()
        digest = hashlib.sha256(data).hexdigest()
        await interaction.response.send_message(
            f"{image.filename} {image.width}x{image.height} {digest}",
            file=discord.File(io.BytesIO(data), filename=f"back-{image.filename}"),
        )

    @tree.command(description="Think, then edit the original with a file")
    async def think(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await bot.release.wait()
        bot.release.clear()
        await interaction.edit_original_response(
            content="done thinking", attachments=[discord.File(io.BytesIO(png_bytes(4, 4)), filename="a.png")]
        )
        rec.flag("think")

    @tree.command(description="Post two files then edit: keep one, drop one, add one")
    async def album(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(
            "album",
            files=[
                discord.File(io.BytesIO(png_bytes(2, 2)), filename="one.png"),
                discord.File(io.BytesIO(png_bytes(3, 3)), filename="two.png"),
            ],
        )
        original = await interaction.original_response()
        keep = original.attachments[0]
        await interaction.edit_original_response(
            content="album edited",
            attachments=[keep, discord.File(io.BytesIO(png_bytes(5, 5)), filename="three.png")],
        )
        rec.flag("album")

    @tree.command(description="Post with the bot token (channel.send with a file), reply and edit")
    async def post(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("posting…", ephemeral=True)
        try:
            msg = await interaction.channel.send(
                "posted with bot token", file=discord.File(io.BytesIO(png_bytes(6, 6)), filename="post.png")
            )
            reply = await msg.reply("a reply", mention_author=False)
            await msg.edit(content="posted and edited", attachments=[])
            rec.messages += [msg, reply]
            rec.flag("post")
        except discord.HTTPException as exc:
            rec.fail(exc)

    @tree.command(description="Answer after the response window")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(bot.slow_seconds)
        try:
            await interaction.response.send_message("too late")
        except discord.HTTPException as exc:
            rec.fail(exc)

    @tree.command(description="Defer, wait for release, then try the interaction webhook and the bot token")
    async def longjob(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await bot.release.wait()
        bot.release.clear()
        try:
            await interaction.edit_original_response(content="result via webhook")
        except discord.HTTPException as exc:
            rec.fail(exc)
            await interaction.channel.send(f"result via bot token for {interaction.user.mention}")
        rec.flag("longjob")

    @tree.command(description="DM the caller")
    async def dm(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"in {'dm' if interaction.guild is None else 'guild'}")
        await interaction.user.send("hello in your DMs")
        rec.flag("dm")

    @tree.command(description="Send a message that breaks a Discord limit")
    @app_commands.choices(
        kind=[app_commands.Choice(name=k, value=k) for k in ("content", "custom_id", "rows", "followup")]
    )
    async def limits(interaction: discord.Interaction, kind: str) -> None:
        try:
            if kind == "content":
                await interaction.response.send_message("x" * 2001)
            elif kind == "custom_id":
                view = discord.ui.View()
                view.add_item(discord.ui.Button(label="long", custom_id="c" * 101))
                await interaction.response.send_message("long id", view=view)
            elif kind == "rows":
                await interaction.response.defer()
                view = discord.ui.View()
                for i in range(5):
                    for j in range(5):
                        view.add_item(discord.ui.Button(label=f"{i}{j}", custom_id=f"b{i}{j}", row=i))
                await interaction.followup.send("25 buttons is fine", view=view)
            else:
                await interaction.response.send_message("ok", ephemeral=True)
                await interaction.followup.send("e" * 2001)
        except discord.HTTPException as exc:
            rec.fail(exc)
            if not interaction.response.is_done():
                await interaction.response.send_message(f"refused {exc.code}", ephemeral=True)
