"""`python -m bot` in its own process against the in-process sandbox, as operators run it: for the
scenarios that kill the bot (SIGKILL, SIGTERM) and for the load test, where the bot's own memory
and CPU must not be mixed with the sandbox's. The database is a file the test opens too."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from db.session import Database
from sandbox import Sandbox


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def _toml(tables: dict[str, dict[str, Any]], prefix: str = "") -> str:
    lines: list[str] = []
    for name, table in tables.items():
        full = f"{prefix}{json.dumps(name) if ':' in name or '.' in name else name}"
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{full}]")
        lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in scalars.items()]
        if nested:
            lines.append(_toml(nested, prefix=f"{full}."))
    return "\n".join(lines) + "\n"


def write_config(folder: Path, model_dir: Path, **sections: dict[str, Any]) -> Path:
    """A config file for the tiny model (256², 2 steps, no safety model), sections merged over."""
    tables: dict[str, dict[str, Any]] = {
        "database": {"url": f"sqlite+aiosqlite:///{folder / 'atelier.db'}"},
        "storage": {"output_dir": str(folder / "outputs")},
        "engine": {"device": "cpu", "torch_threads": 1, "preview_every": 1, "preview_size": 32},
        "generation": {"default_steps": 2, "upscale_steps": 2, "aspects": {"1:1": "256x256", "big": "1024x1024"}},
        "safety": {"enabled": False},
        "models": {
            "tiny": {"base": str(model_dir / "base"), "refiner": str(model_dir / "refiner"), "default": True},
        },
    }
    for name, values in sections.items():
        tables[name] = {**tables.get(name, {}), **values} if name != "models" else values
    path = folder / "atelier.toml"
    path.write_text(_toml(tables))
    return path


async def start_bot(sb: Sandbox, config: Path, log_path: Path) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env.update(sb.env(), ATELIER_CONFIG=str(config), HF_HUB_OFFLINE="1")
    log = log_path.open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=config.parent, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
        )
    finally:
        log.close()  # the child has its own copy of the descriptor


async def wait_bot_ready(sb: Sandbox, identifies: int, timeout: float = 90.0) -> None:
    """Until the bot process identified (the `identifies`-th time) and synced its commands."""
    await sb.wait_until(
        lambda: sb.gateway.identify_count >= identifies and sb.gateway.connected,
        timeout,
        "the bot process to connect",
    )
    await sb.wait_for_commands("generate", "mod", timeout=timeout)


def engine_children(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def stop_bot(bot: asyncio.subprocess.Process, *, sig: int = signal.SIGTERM, timeout: float = 25.0) -> int:
    """Send `sig` and wait; kill if it does not end in time. Returns the exit code."""
    if bot.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            bot.send_signal(sig)
    try:
        return await asyncio.wait_for(bot.wait(), timeout)
    except TimeoutError:
        bot.kill()
        await bot.wait()
        raise


@contextlib.asynccontextmanager
async def database(folder: Path) -> AsyncIterator[Database]:
    db = Database(f"sqlite+aiosqlite:///{folder / 'atelier.db'}")
    await db.connect()
    try:
        yield db
    finally:
        await db.close()
