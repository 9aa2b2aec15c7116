"""End-to-end fixtures: the real bot (discord.py, scheduler, SQLite, engine child process on the
tiny model) against the built-in sandbox server, shared per test module because starting the
engine process costs a few seconds.

Tests in a module share one studio, so each test makes its own members with
`studio.new_member(...)` to keep quotas and queues independent. Mark modules with
`pytestmark = pytest.mark.asyncio(loop_scope="module")`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from studio.harness import Studio, open_studio, tiny_settings


@pytest.fixture(scope="module")
def studio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("studio")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def studio(tiny_model_dir: Path, studio_dir: Path) -> AsyncIterator[Studio]:
    settings = tiny_settings(tiny_model_dir, studio_dir)
    async with open_studio(settings) as running:
        yield running
