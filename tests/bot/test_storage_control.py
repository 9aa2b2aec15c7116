"""The control image of a ControlNet job among the inputs (kept while the job may need it, by the
same rules as an img2img input) and its control map among the outputs (kept, pruned and deleted
with the job's images)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

from bot.storage import CONTROL, OutputStore, control_entry, result_images
from config.settings import StorageSettings
from engine.api import ImageOut

DAY = 86400.0


def store(tmp_path: Path, **settings: float) -> OutputStore:
    return OutputStore(StorageSettings(output_dir=str(tmp_path / "out"), **settings))


def test_control_input_beside_the_image_input_and_dropped_with_it(tmp_path: Path) -> None:
    outputs = store(tmp_path)
    image = outputs.save_input("JOB1", b"image")
    control = outputs.save_input("JOB1", b"control", CONTROL)
    assert image.name == "JOB1.png" and control.name == "JOB1.control.png"
    assert outputs.input_path("JOB1", CONTROL).read_bytes() == b"control"
    outputs.drop_input("JOB1")
    assert not image.exists() and not control.exists()


def test_prune_keeps_control_inputs_of_active_jobs_and_removes_leftovers(tmp_path: Path) -> None:
    outputs = store(tmp_path)
    live = outputs.save_input("LIVE", b"c", CONTROL)
    left = outputs.save_input("GONE", b"c", CONTROL)
    old = time.time() - 2 * 3600
    for path in (live, left):
        os.utime(path, (old, old))
    outputs.prune(active={"LIVE"})
    assert live.exists() and not left.exists()


def test_control_map_saved_beside_the_images_pruned_by_age_like_them(tmp_path: Path) -> None:
    outputs = store(tmp_path, keep_days=1)
    when = datetime(2026, 3, 4, tzinfo=UTC)
    shown = ImageOut(b"map", "png", 0, 64, 64)
    image = outputs.save("JOB2", 0, ImageOut(b"img", "png", 1, 64, 64), now=when)
    control = outputs.save_control("JOB2", shown, now=when)
    assert control.parent == image.parent and control.name == "JOB2-control.png"
    assert outputs.read(control) == b"map"
    for path in (image, control):
        os.utime(path, (when.timestamp(), when.timestamp()))
    report = outputs.prune(when.timestamp() + 2 * DAY)
    assert report.deleted_files == 2 and not control.exists()


def test_the_control_entry_is_told_apart_from_the_images() -> None:
    entries = [{"seed": 1, "path": "a"}, {"seed": 2, "path": "b"}, {"role": CONTROL, "path": "m"}]
    assert result_images(entries) == entries[:2]
    assert control_entry(entries) == entries[2]
    assert control_entry(entries[:2]) is None
