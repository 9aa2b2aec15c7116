"""Shared fixtures: the tiny random-weight SDXL, built once per test session, and settings for it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may reach a model hub from the tests: everything loads from folders the tests build.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PATH with base/, refiner/, single/base.safetensors and single/base-config/ (see engine.tiny)."""
    from engine.tiny import build_tiny_sdxl

    path = tmp_path_factory.mktemp("tiny-sdxl")
    build_tiny_sdxl(path)
    return path


@pytest.fixture(scope="session")
def tiny_models_config(tiny_model_dir: Path) -> dict[str, dict[str, object]]:
    """A [models] table for the tiny model: folders (default), base only, and the single file."""
    return {
        "tiny": {
            "base": str(tiny_model_dir / "base"),
            "refiner": str(tiny_model_dir / "refiner"),
            "default": True,
        },
        "tiny-base": {"base": str(tiny_model_dir / "base")},
        "tiny-single": {
            "base": str(tiny_model_dir / "single" / "base.safetensors"),
            "base_config": str(tiny_model_dir / "single" / "base-config"),
        },
    }


@pytest.fixture(scope="session")
def tiny_addons_dir(tiny_model_dir: Path) -> Path:
    """The tiny model's folder with its add-ons beside `base/` (engine.tiny_addons: LoRAs, an
    embedding, a ControlNet, depth and pose estimators), written once per session."""
    from engine.tiny_addons import ADDONS, build_tiny_addons

    if not all((tiny_model_dir / relative).exists() for relative in ADDONS):
        build_tiny_addons(tiny_model_dir)
    return tiny_model_dir
