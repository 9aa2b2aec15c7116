"""A Discord-compatible sandbox server for offline demos and end-to-end tests of the bot.

The real discord.py client connects to it unchanged; only its two endpoint class attributes move::

    async with Sandbox() as sb:                       # 127.0.0.1, random free port
        guild = sb.add_guild("Atelier Lab")
        studio = sb.add_channel(guild, "studio")
        alice = sb.add_user("alice"); sb.add_member(guild, alice)
        with sb.patch_discord():                      # or run the bot with sb.env()
            task = asyncio.create_task(bot.start(sb.token))
            await sb.wait_ready(); await sb.wait_for_commands("generate")
            inter = await sb.slash(alice, studio, "generate", {"prompt": "a cat"})
            first = await inter.wait_response()       # must come within 3 s, as on Discord
            result = await sb.wait_for_message(lambda m: bool(m.attachments), timeout=60)
            await sb.click(alice, result, label="Reroll")
            await bot.close(); await task             # close the bot before the sandbox
        write_transcript(sb, [studio], "demo-out")
"""

from .api_errors import ApiError, InvocationError, SandboxError
from .command_registry import RegisteredCommand
from .faults import FaultRule
from .interactions import CallbackRecord, InteractionRecord
from .records import Channel, Guild, Member, Message, MessageSnapshot, Role, StoredFile, User
from .server import RequestRecord, Sandbox
from .transcript import write_transcript
from .tuning import SandboxSettings

__all__ = [
    "ApiError",
    "CallbackRecord",
    "Channel",
    "FaultRule",
    "Guild",
    "InteractionRecord",
    "InvocationError",
    "Member",
    "Message",
    "MessageSnapshot",
    "RegisteredCommand",
    "RequestRecord",
    "Role",
    "Sandbox",
    "SandboxError",
    "SandboxSettings",
    "StoredFile",
    "User",
    "write_transcript",
]
