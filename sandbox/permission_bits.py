"""Permission bits and the guild-level permission computation Discord performs.

Interaction payloads carry ``member.permissions`` and ``app_permissions`` already computed;
bots (Atelier's moderator check included) trust those numbers, so they must follow Discord's
rules: owner and Administrator get everything, otherwise OR of @everyone and the member's roles.
"""

from __future__ import annotations

CREATE_INSTANT_INVITE = 1 << 0
KICK_MEMBERS = 1 << 1
BAN_MEMBERS = 1 << 2
ADMINISTRATOR = 1 << 3
MANAGE_CHANNELS = 1 << 4
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
MENTION_EVERYONE = 1 << 17
USE_EXTERNAL_EMOJIS = 1 << 18
CHANGE_NICKNAME = 1 << 26
MANAGE_ROLES = 1 << 28
USE_APPLICATION_COMMANDS = 1 << 31
SEND_MESSAGES_IN_THREADS = 1 << 38
MODERATE_MEMBERS = 1 << 40

ALL = (1 << 51) - 1

# What a fresh server's @everyone role can do (the parts that matter to a bot).
DEFAULT_EVERYONE = (
    CREATE_INSTANT_INVITE
    | ADD_REACTIONS
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | MENTION_EVERYONE
    | USE_EXTERNAL_EMOJIS
    | CHANGE_NICKNAME
    | USE_APPLICATION_COMMANDS
    | SEND_MESSAGES_IN_THREADS
)

# What a typical invite link grants a bot like Atelier.
DEFAULT_BOT = VIEW_CHANNEL | SEND_MESSAGES | EMBED_LINKS | ATTACH_FILES | READ_MESSAGE_HISTORY | ADD_REACTIONS


def compute(base_roles: list[int], *, is_owner: bool) -> int:
    """Guild-wide permissions from the permission ints of @everyone plus the member's roles."""
    if is_owner:
        return ALL
    perms = 0
    for value in base_roles:
        perms |= value
    if perms & ADMINISTRATOR:
        return ALL
    return perms


def has(perms: int, needed: int) -> bool:
    return perms & needed == needed
