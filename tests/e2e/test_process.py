"""`python -m bot` as operators run it: a separate process against the sandbox, stopped by SIGTERM.

Contract: on SIGTERM the bot stops taking work, finishes or requeues the running job within 20 s
and exits 0; a restarted bot resumes the requeued job from the database.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from db.jobs import JobStore
from db.session import Database
from sandbox import Sandbox
from studio.harness import build_world, job_id_of

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]


def write_config(tmp_path: Path, model_dir: Path) -> Path:
    config = tmp_path / "atelier.toml"
    config.write_text(
        f"""
[database]
url = "sqlite+aiosqlite:///{tmp_path / "atelier.db"}"
[storage]
output_dir = "{tmp_path / "outputs"}"
[engine]
device = "cpu"
torch_threads = 1
[generation]
default_steps = 4
[generation.aspects]
"1:1" = "256x256"
"huge" = "1024x1024"
[safety]
enabled = false
[models.tiny]
base = "{model_dir / "base"}"
refiner = "{model_dir / "refiner"}"
"""
    )
    return config


async def start_bot(sb: Sandbox, config: Path, cwd: Path, log_name: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATELIER_")}
    env.update(sb.env(), ATELIER_CONFIG=str(config), HF_HUB_OFFLINE="1")
    log = (cwd / log_name).open("wb")
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", cwd=cwd, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT
    )


async def test_sigterm_requeues_the_running_job_exits_0_and_the_restart_resumes_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = write_config(tmp_path, tiny_model_dir)
    async with Sandbox() as sb:
        world = build_world(sb)
        alice, channel = world["alice"], world["channel"]
        bot = await start_bot(sb, config, tmp_path, "bot-1.log")
        try:
            await sb.wait_ready(timeout=60)
            await sb.wait_for_commands("generate", timeout=60)
            # 4 images × 60 steps at 1024²: far longer than the shutdown grace, so it is requeued.
            inter = await sb.slash(
                alice, channel, "generate", {"prompt": "a slow one", "aspect": "huge", "steps": 60, "count": 4}
            )
            await inter.wait_response(3)
            job_id = job_id_of(inter)
            await sb.wait_until(
                lambda: any(
                    m.content.startswith("Running") and job_id in m.content for m in sb.channel_messages(channel)
                ),
                timeout=90,
            )
            started = time.monotonic()
            bot.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(bot.wait(), 25)
            stopped_in = time.monotonic() - started
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
        log = (tmp_path / "bot-1.log").read_text(errors="replace")
        assert code == 0, log[-3000:]
        assert stopped_in < 20
        assert sb.token not in log

        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'atelier.db'}")
        await db.connect()
        record = await JobStore(db).get(job_id)
        await db.close()
        assert record is not None and record.status == "queued" and record.attempts == 1

        # A new bot process picks the job up again from the database.
        restarted_at = datetime.now(UTC)
        bot = await start_bot(sb, config, tmp_path, "bot-2.log")
        try:

            def resumed() -> bool:
                return any(
                    m.content.startswith("Running")
                    and job_id in m.content
                    and m.edited_at is not None
                    and m.edited_at > restarted_at
                    for m in sb.channel_messages(channel)
                )

            await sb.wait_until(resumed, timeout=120)
            cancel = await sb.slash(alice, channel, "cancel", {"job": job_id})
            answer = await cancel.wait_response(3)
            assert "refunded" in answer.content
            await sb.wait_until(
                lambda: any(
                    m.content.startswith("Cancelled") and job_id in m.content for m in sb.channel_messages(channel)
                ),
                timeout=30,
            )
            bot.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(bot.wait(), 25) == 0
        finally:
            if bot.returncode is None:
                bot.kill()
                await bot.wait()
