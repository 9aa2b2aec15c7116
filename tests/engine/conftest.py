"""What the engine's tests share: one torch thread for the tiny model, and settings whose [models]
are exactly the ones a test gives."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from config.settings import Settings, load_settings

ENGINE = {"device": "cpu", "dtype": "fp32", "preview_every": 2, "preview_size": 64, "start_timeout": 300}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not suffer when other work shares the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_settings(directory: Path, models: dict[str, dict[str, Any]], **engine: Any) -> Settings:
    """Settings whose [models] are exactly `models` (the shipped hub model replaced)."""
    lines = ["[engine]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in {**ENGINE, **engine}.items()]
    for name, table in models.items():
        lines.append(f"[models.{json.dumps(name)}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path = directory / "atelier.toml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATELIER_CONFIG", str(path))
        return load_settings()
