"""Registered application commands: stored from the bot's sync, validated like Discord does.

Two jobs: (1) reject command definitions Discord would reject at sync time (bad names, > 25
choices, required-after-optional ...), so a bot that syncs here also syncs on Discord; (2) check
test invocations against the registered schema, the way the Discord client only lets a user send
what the schema allows (choices, ranges, lengths, required options, subcommand paths).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from . import api_errors as errors
from .api_errors import InvocationError
from .snowflakes import SnowflakeFactory

SUB_COMMAND = 1
SUB_COMMAND_GROUP = 2
STRING = 3
INTEGER = 4
BOOLEAN = 5
USER = 6
CHANNEL = 7
ROLE = 8
MENTIONABLE = 9
NUMBER = 10
ATTACHMENT = 11

CHAT_INPUT = 1
MAX_COMMANDS = 100
MAX_OPTIONS = 25
MAX_CHOICES = 25
MAX_SAFE_INT = 2**53
NAME_RE = re.compile(r"^[-_'\w]{1,32}$")


@dataclass
class RegisteredCommand:
    id: int
    application_id: int
    guild_id: int | None
    name: str
    type: int
    description: str
    options: list[dict[str, Any]] = field(default_factory=list)
    default_member_permissions: str | None = None
    dm_permission: bool | None = None
    contexts: list[int] | None = None
    integration_types: list[int] | None = None
    nsfw: bool = False
    version: int = 0

    def to_payload(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": str(self.id),
            "application_id": str(self.application_id),
            "version": str(self.version),
            "type": self.type,
            "name": self.name,
            "description": self.description,
            "options": copy.deepcopy(self.options),
            "default_member_permissions": self.default_member_permissions,
            "dm_permission": self.dm_permission if self.dm_permission is not None else True,
            "contexts": self.contexts,
            "integration_types": self.integration_types or [0],
            "nsfw": self.nsfw,
            "name_localizations": None,
            "description_localizations": None,
        }
        if self.guild_id is not None:
            out["guild_id"] = str(self.guild_id)
        return out

    @property
    def qualified_paths(self) -> list[str]:
        """Every invocable path ("mod quota set", "generate")."""
        paths: list[str] = []
        subs = [o for o in self.options if o.get("type") in (SUB_COMMAND, SUB_COMMAND_GROUP)]
        if not subs:
            return [self.name]
        for opt in subs:
            if opt["type"] == SUB_COMMAND:
                paths.append(f"{self.name} {opt['name']}")
            else:
                paths += [f"{self.name} {opt['name']} {s['name']}" for s in opt.get("options", [])]
        return paths


def _fail(path: str, message: str, code: str = "BASE_TYPE_INVALID") -> errors.ApiError:
    return errors.invalid_form(path, code, message)


def _check_options(options: list[dict[str, Any]], path: str, depth: int) -> None:
    if len(options) > MAX_OPTIONS:
        raise errors.too_long(path, MAX_OPTIONS)
    names: set[str] = set()
    seen_optional = False
    kinds = {o.get("type") for o in options}
    if kinds & {SUB_COMMAND, SUB_COMMAND_GROUP} and kinds - {SUB_COMMAND, SUB_COMMAND_GROUP}:
        raise _fail(
            path,
            "Sub-commands and sub-command groups cannot be mixed with other options",
            "APPLICATION_COMMAND_OPTIONS_TYPE_INVALID",
        )
    for i, opt in enumerate(options):
        here = f"{path}.{i}"
        kind = opt.get("type")
        name = opt.get("name", "")
        if not NAME_RE.match(name) or name != name.lower():
            raise _fail(f"{here}.name", "Command name is invalid", "APPLICATION_COMMAND_INVALID_NAME")
        if name in names:
            raise _fail(f"{here}.name", "Option names must be unique", "APPLICATION_COMMAND_OPTION_NAME_NOT_UNIQUE")
        names.add(name)
        desc = opt.get("description", "")
        if not 1 <= len(desc) <= 100:
            raise _fail(f"{here}.description", "Must be between 1 and 100 in length.", "BASE_TYPE_BAD_LENGTH")
        if kind == SUB_COMMAND_GROUP:
            if depth > 0:
                raise _fail(f"{here}.type", "Sub-command groups cannot be nested")
            subs = opt.get("options", [])
            if any(s.get("type") != SUB_COMMAND for s in subs):
                raise _fail(f"{here}.options", "Sub-command groups may only contain sub-commands")
            _check_options(subs, f"{here}.options", depth + 1)
            continue
        if kind == SUB_COMMAND:
            if depth > 1:
                raise _fail(f"{here}.type", "Sub-commands cannot be nested that deep")
            _check_options(opt.get("options", []), f"{here}.options", 2)
            continue
        if kind not in (STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, MENTIONABLE, NUMBER, ATTACHMENT):
            raise _fail(f"{here}.type", "Value is not a valid option type", "BASE_TYPE_CHOICES")
        if opt.get("required"):
            if seen_optional:
                raise _fail(
                    f"{here}.required",
                    "Required options must be placed before non-required options",
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                )
        else:
            seen_optional = True
        choices = opt.get("choices") or []
        if choices:
            if kind not in (STRING, INTEGER, NUMBER):
                raise _fail(f"{here}.choices", "Choices are only allowed for string, integer and number options")
            if len(choices) > MAX_CHOICES:
                raise errors.too_long(f"{here}.choices", MAX_CHOICES)
            if opt.get("autocomplete"):
                raise _fail(
                    f"{here}.autocomplete",
                    "Autocomplete cannot be set with choices",
                    "APPLICATION_COMMAND_AUTOCOMPLETE_INVALID",
                )
            for j, ch in enumerate(choices):
                if not 1 <= len(str(ch.get("name", ""))) <= 100:
                    raise _fail(
                        f"{here}.choices.{j}.name",
                        "Must be between 1 and 100 in length.",
                        "BASE_TYPE_BAD_LENGTH",
                    )
                if kind == STRING and len(str(ch.get("value"))) > 100:
                    raise errors.too_long(f"{here}.choices.{j}.value", 100)
        lo, hi = opt.get("min_value"), opt.get("max_value")
        if lo is not None and hi is not None and lo > hi:
            raise _fail(f"{here}.min_value", "min_value must be less than or equal to max_value")
        for key in ("min_value", "max_value"):
            value = opt.get(key)
            if value is not None and abs(value) > MAX_SAFE_INT:
                raise _fail(f"{here}.{key}", f"Must be between -{MAX_SAFE_INT} and {MAX_SAFE_INT}.")
        for key, low in (("min_length", 0), ("max_length", 1)):
            value = opt.get(key)
            if value is not None and not low <= value <= 6000:
                raise _fail(f"{here}.{key}", f"Must be between {low} and 6000.")


def check_definition(cmd: dict[str, Any], path: str) -> None:
    """Reject a command definition the way Discord's bulk-overwrite endpoint does."""
    kind = cmd.get("type", CHAT_INPUT)
    name = cmd.get("name", "")
    if not NAME_RE.match(name) or (kind == CHAT_INPUT and name != name.lower()):
        raise _fail(f"{path}.name", "Command name is invalid", "APPLICATION_COMMAND_INVALID_NAME")
    desc = cmd.get("description", "")
    if kind == CHAT_INPUT and not 1 <= len(desc) <= 100:
        raise _fail(f"{path}.description", "Must be between 1 and 100 in length.", "BASE_TYPE_BAD_LENGTH")
    if kind != CHAT_INPUT and desc:
        raise _fail(f"{path}.description", "Context menu commands cannot have a description")
    _check_options(cmd.get("options") or [], f"{path}.options", 0)


class CommandRegistry:
    """Global and per-guild commands of the one application the sandbox hosts."""

    def __init__(self, application_id: int, snowflakes: SnowflakeFactory) -> None:
        self.application_id = application_id
        self._snowflakes = snowflakes
        self._scopes: dict[int | None, dict[tuple[str, int], RegisteredCommand]] = {None: {}}
        self.sync_count = 0

    def scope(self, guild_id: int | None) -> dict[tuple[str, int], RegisteredCommand]:
        return self._scopes.setdefault(guild_id, {})

    def list(self, guild_id: int | None) -> list[RegisteredCommand]:
        return list(self.scope(guild_id).values())

    def _make(self, guild_id: int | None, data: dict[str, Any], old: RegisteredCommand | None) -> RegisteredCommand:
        perms = data.get("default_member_permissions")
        return RegisteredCommand(
            id=old.id if old else self._snowflakes.next(),
            application_id=self.application_id,
            guild_id=guild_id,
            name=data["name"],
            type=data.get("type", CHAT_INPUT),
            description=data.get("description", ""),
            options=copy.deepcopy(data.get("options") or []),
            default_member_permissions=None if perms is None else str(perms),
            dm_permission=data.get("dm_permission"),
            contexts=data.get("contexts"),
            integration_types=data.get("integration_types"),
            nsfw=bool(data.get("nsfw", False)),
            version=self._snowflakes.next(),
        )

    def bulk_overwrite(self, guild_id: int | None, payload: list[dict[str, Any]]) -> list[RegisteredCommand]:
        if not isinstance(payload, list):
            raise errors.invalid_form("_root", "BASE_TYPE_BAD_ARRAY", "Must be an array.")
        if sum(1 for c in payload if c.get("type", CHAT_INPUT) == CHAT_INPUT) > MAX_COMMANDS:
            raise errors.too_long("_root", MAX_COMMANDS)
        seen: set[tuple[str, int]] = set()
        for i, cmd in enumerate(payload):
            check_definition(cmd, str(i))
            key = (cmd["name"], cmd.get("type", CHAT_INPUT))
            if key in seen:
                raise _fail(
                    f"{i}.name",
                    "Application command names must be unique",
                    "APPLICATION_COMMANDS_DUPLICATE_NAME",
                )
            seen.add(key)
        old = self.scope(guild_id)
        fresh = {}
        for cmd in payload:
            key = (cmd["name"], cmd.get("type", CHAT_INPUT))
            fresh[key] = self._make(guild_id, cmd, old.get(key))
        self._scopes[guild_id] = fresh
        self.sync_count += 1
        return list(fresh.values())

    def upsert(self, guild_id: int | None, data: dict[str, Any]) -> RegisteredCommand:
        check_definition(data, "_root")
        key = (data["name"], data.get("type", CHAT_INPUT))
        scope = self.scope(guild_id)
        scope[key] = self._make(guild_id, data, scope.get(key))
        return scope[key]

    def get(self, guild_id: int | None, command_id: int) -> RegisteredCommand:
        for cmd in self.scope(guild_id).values():
            if cmd.id == command_id:
                return cmd
        raise errors.unknown_command()

    def edit(self, guild_id: int | None, command_id: int, patch: dict[str, Any]) -> RegisteredCommand:
        cmd = self.get(guild_id, command_id)
        merged = {**cmd.to_payload(), **patch}
        check_definition(merged, "_root")
        scope = self.scope(guild_id)
        del scope[(cmd.name, cmd.type)]
        new = self._make(guild_id, merged, cmd)
        scope[(new.name, new.type)] = new
        return new

    def delete(self, guild_id: int | None, command_id: int) -> None:
        cmd = self.get(guild_id, command_id)
        del self.scope(guild_id)[(cmd.name, cmd.type)]

    def find(self, name: str, guild_id: int | None, kind: int = CHAT_INPUT) -> RegisteredCommand | None:
        """What a user in ``guild_id`` sees under ``name``: guild commands shadow global ones."""
        if guild_id is not None:
            found = self.scope(guild_id).get((name, kind))
            if found is not None:
                return found
        return self.scope(None).get((name, kind))


# -- invocations -------------------------------------------------------------------------


def walk_path(cmd: RegisteredCommand, parts: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Follow "group sub" below the command name.

    Returns (parameter definitions of the leaf, chain of sub-command/group definitions).
    """
    options = cmd.options
    chain: list[dict[str, Any]] = []
    for part in parts:
        match = next(
            (o for o in options if o.get("name") == part and o.get("type") in (SUB_COMMAND, SUB_COMMAND_GROUP)),
            None,
        )
        if match is None:
            raise InvocationError(f"/{cmd.name}: no sub-command {part!r} (available: {', '.join(cmd.qualified_paths)})")
        chain.append(match)
        options = match.get("options") or []
    if any(o.get("type") in (SUB_COMMAND, SUB_COMMAND_GROUP) for o in options):
        raise InvocationError(
            f"/{' '.join([cmd.name, *parts])} is a group; choose one of: {', '.join(cmd.qualified_paths)}"
        )
    return options, chain


def nest(chain: list[dict[str, Any]], leaf_options: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Wrap leaf option values into the sub-command/group structure Discord sends."""
    options = leaf_options
    for definition in reversed(chain):
        options = [{"type": definition["type"], "name": definition["name"], "options": options}]
    return options


def coerce_primitive(opt: dict[str, Any], value: Any, where: str, *, partial: bool = False) -> Any:
    """Check a string/integer/number/boolean value the way the Discord client constrains input.

    ``partial`` is for autocomplete: the user is still typing, so Discord sends the raw text and
    applies no checks.
    """
    kind = opt["type"]
    if partial:
        return value if isinstance(value, str) else str(value)
    choices = opt.get("choices") or []
    if kind == BOOLEAN:
        if not isinstance(value, bool):
            raise InvocationError(f"{where}: expected a boolean, got {value!r}")
        return value
    if kind == STRING:
        if not isinstance(value, str):
            raise InvocationError(f"{where}: expected a string, got {value!r}")
        lo, hi = opt.get("min_length", 0), opt.get("max_length", 6000)
        if not lo <= len(value) <= hi:
            raise InvocationError(f"{where}: length {len(value)} outside {lo}..{hi}")
    elif kind in (INTEGER, NUMBER):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvocationError(f"{where}: expected a number, got {value!r}")
        if kind == INTEGER and not float(value).is_integer():
            raise InvocationError(f"{where}: expected an integer, got {value!r}")
        if kind == INTEGER:
            value = int(value)
        lo = opt.get("min_value", -MAX_SAFE_INT)
        hi = opt.get("max_value", MAX_SAFE_INT)
        if not lo <= value <= hi:
            raise InvocationError(f"{where}: {value} outside {lo}..{hi}")
    if choices and value not in [c["value"] for c in choices]:
        raise InvocationError(f"{where}: {value!r} is not one of the choices {[c['value'] for c in choices]}")
    return value
