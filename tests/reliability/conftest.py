"""Reliability fixtures: the real bot, sandbox, engine child process and SQLite database on the
tiny model, configured as cheap as the guarantees allow (256² images, the smallest size the settings
accept, 2 steps, no safety model).

Every module shares one studio (`loop_scope="module"`) because starting the engine process costs
seconds; tests create their own members so quotas and queues stay independent. A module-wide log
capture records every log line (message and traceback) so the secrets check can scan them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from config.settings import Settings
from studio.harness import Studio, open_studio, tiny_settings


def reliability_settings(model_dir: Path, data_dir: Path, *, refiner: bool = True, **overrides: Any) -> Settings:
    """Tiny-model settings at 128² and 2 steps; `refiner=False` makes the base-only model the default."""
    models = {
        "tiny": {"base": str(model_dir / "base"), "refiner": str(model_dir / "refiner"), "default": refiner},
        "tiny-base": {"base": str(model_dir / "base"), "default": not refiner},
    }
    sections: dict[str, Any] = {
        "models": models,
        "generation": {"default_steps": 2, "upscale_steps": 2, "aspects": {"1:1": "256x256", "16:9": "448x256"}},
        "engine": {"preview_every": 1, "preview_size": 32},
        "safety": {"enabled": False},
    }
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(sections.get(section), dict):
            sections[section] = {**sections[section], **values}
        else:
            sections[section] = values
    return tiny_settings(model_dir, data_dir, **sections)


class LogCapture(logging.Handler):
    """Every record, formatted with its traceback, for the secrets scan."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a broken log call must not break the scenario under test
            self.lines.append(f"unformattable record from {record.name}")


@pytest.fixture(scope="module")
def all_logs() -> Iterator[LogCapture]:
    handler = LogCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    # INFO, not DEBUG: per-request debug lines would slow the load test down by themselves.
    root.setLevel(min(old_level, logging.INFO) if old_level else logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


@pytest.fixture(scope="module")
def studio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path, all_logs: LogCapture) -> AsyncIterator[Studio]:
    async with open_studio(reliability_settings(tiny_model_dir, studio_dir)) as running:
        yield running
        running.sb.clear_faults()
