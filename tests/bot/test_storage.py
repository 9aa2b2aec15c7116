"""OutputStore: atomic saves, reads after pruning, age and size pruning, disk-full errors."""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

import bot.storage as storage
from bot.storage import GIB, OutputStore, PruneReport, StorageError
from config.settings import StorageSettings
from engine.api import ImageOut

NOW = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
DAY = 86400.0


def image(data: bytes = b"\x89PNG fake", fmt: str = "png") -> ImageOut:
    return ImageOut(data=data, format=fmt, seed=1, width=8, height=8)  # type: ignore[arg-type]


def store(tmp_path: Path, *, retention_days: float = 30, max_gb: float = 0) -> OutputStore:
    return OutputStore(StorageSettings(output_dir=str(tmp_path / "out"), retention_days=retention_days, max_gb=max_gb))


def age(path: Path, days: float) -> None:
    stamp = NOW.timestamp() - days * DAY
    os.utime(path, (stamp, stamp))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ save/read


def test_save_layout_and_read_back(tmp_path: Path) -> None:
    s = store(tmp_path)
    path = s.save("abc123", 0, image(b"one"), now=NOW)
    assert path == tmp_path / "out" / "2025" / "06" / "15" / "abc123-0.png"
    assert path.is_absolute()
    assert s.read(path) == b"one"
    assert s.read(path.relative_to(tmp_path / "out")) == b"one"
    jpeg = s.save("abc123", 1, image(b"two", "jpeg"), now=NOW)
    webp = s.save("abc123", 2, image(b"three", "webp"), now=NOW)
    assert (jpeg.name, webp.name) == ("abc123-1.jpg", "abc123-2.webp")
    assert files_under(tmp_path / "out") == [
        "2025/06/15/abc123-0.png",
        "2025/06/15/abc123-1.jpg",
        "2025/06/15/abc123-2.webp",
    ]


def test_save_defaults_to_today_utc(tmp_path: Path) -> None:
    path = store(tmp_path).save("j", 0, image())
    today = datetime.now(UTC)
    assert path.parent.parts[-3:] == (f"{today:%Y}", f"{today:%m}", f"{today:%d}")


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save("j", 0, image(b"old"), now=NOW)
    path = s.save("j", 0, image(b"new"), now=NOW)
    assert path.read_bytes() == b"new"
    assert files_under(tmp_path / "out") == ["2025/06/15/j-0.png"]  # no temp left behind


def test_unsafe_names_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    for bad in ("../evil", "a/b", "", "x" * 65, "dot.dot"):
        with pytest.raises(ValueError, match="safe file name"):
            s.save(bad, 0, image())
    with pytest.raises(ValueError, match="negative"):
        s.save("j", -1, image())


def test_read_missing_is_none_and_outside_is_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.read(tmp_path / "out" / "2025" / "01" / "01" / "gone-0.png") is None
    assert s.read("2025/01/01/gone-0.png") is None
    (tmp_path / "secret.txt").write_text("x")
    with pytest.raises(ValueError, match="outside"):
        s.read(tmp_path / "secret.txt")
    with pytest.raises(ValueError, match="outside"):
        s.read("../secret.txt")


# ----------------------------------------------------------------------------- disk full


def test_disk_full_on_replace_raises_storage_error_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = store(tmp_path)

    def full(src: object, dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", full)
    with pytest.raises(StorageError) as info:
        s.save("j", 0, image(), now=NOW)
    message = str(info.value)
    assert "disk is full" in message and "j-0.png" in message and "\n" not in message
    assert isinstance(info.value.__cause__, OSError)
    assert files_under(tmp_path / "out") == []  # neither a temp file nor a half image


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that gets half the bytes out, then ENOSPC: nothing is left at the final path."""
    s = store(tmp_path)
    s.save("j", 0, image(b"previous good copy"), now=NOW)
    real_open = open

    class FullDisk:
        def __init__(self, path: str) -> None:
            self.handle = real_open(path, "wb")

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "open", lambda path, mode: FullDisk(path), raising=False)
    with pytest.raises(StorageError, match="disk is full"):
        s.save("j", 0, image(b"the new image, never fully written"), now=NOW)
    assert files_under(tmp_path / "out") == ["2025/06/15/j-0.png"]
    assert s.read(tmp_path / "out/2025/06/15/j-0.png") == b"previous good copy"


def test_unwritable_output_dir_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("a file where the folder should be")
    with pytest.raises(StorageError, match="could not save"):
        store(tmp_path).save("j", 0, image(), now=NOW)


def test_save_survives_prune_removing_the_day_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prune may rmdir an empty day folder between save's mkdir and its open: save retries."""
    s = store(tmp_path)
    day_folder = tmp_path / "out" / "2025" / "06" / "15"
    real_mkdir = Path.mkdir
    raced = 0

    def racing_mkdir(self: Path, *args: object, **kwargs: object) -> None:
        nonlocal raced
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]
        if self == day_folder and not raced:
            raced += 1
            os.rmdir(self)  # the prune wins the race once

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    path = s.save("j", 0, image(b"ok"), now=NOW)
    assert path.read_bytes() == b"ok" and raced == 1


# --------------------------------------------------------------------------------- prune


def put(root: Path, rel: str, size: int, days_old: float) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    age(path, days_old)
    return path


def test_prune_by_age_and_removes_empty_dirs(tmp_path: Path) -> None:
    s = store(tmp_path, retention_days=30)
    root = tmp_path / "out"
    old = put(root, "2025/04/01/old-0.png", 100, 75)
    put(root, "2025/05/10/edge-0.png", 10, 29.9)
    put(root, "2025/06/15/new-0.webp", 20, 0)
    put(root, "2025/06/15/new-1.jpg", 30, 0)
    report = s.prune(now=NOW)
    assert report == PruneReport(
        deleted_files=1, deleted_bytes=100, kept_files=3, kept_bytes=60, removed_dirs=2, errors=0
    )
    assert s.read(old) is None
    assert files_under(root) == ["2025/05/10/edge-0.png", "2025/06/15/new-0.webp", "2025/06/15/new-1.jpg"]
    assert not (root / "2025" / "04").exists()
    assert root.is_dir()  # the root itself stays


def test_prune_accepts_epoch_seconds_and_defaults_to_now(tmp_path: Path) -> None:
    s = store(tmp_path, retention_days=1)
    put(tmp_path / "out", "2025/06/13/a-0.png", 5, 2)
    assert s.prune(now=NOW.timestamp()).deleted_files == 1
    fresh = s.save("b", 0, image())
    assert s.prune().deleted_files == 0 and fresh.exists()


def test_prune_by_size_deletes_oldest_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "GIB", 1000)  # max_gb=1 → a 1000-byte cap, to keep the test small
    s = store(tmp_path, retention_days=0, max_gb=1)
    root = tmp_path / "out"
    put(root, "2020/01/01/a-0.png", 400, 2000)  # far beyond any age: retention 0 keeps it by age
    put(root, "2025/06/10/b-0.png", 400, 5)
    put(root, "2025/06/14/c-0.png", 400, 1)
    put(root, "2025/06/15/d-0.png", 250, 0)
    report = s.prune(now=NOW)  # 1450 bytes: dropping a (→1050) is not enough, b too (→650)
    assert (report.deleted_files, report.deleted_bytes, report.kept_bytes) == (2, 800, 650)
    assert files_under(root) == ["2025/06/14/c-0.png", "2025/06/15/d-0.png"]
    assert report.removed_dirs == 4  # 2020/01/01, 2020/01, 2020 and 2025/06/10
    assert s.prune(now=NOW).deleted_files == 0  # already under the cap


def test_prune_age_then_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "GIB", 1000)
    s = store(tmp_path, retention_days=10, max_gb=0.5)
    root = tmp_path / "out"
    put(root, "2025/05/01/old-0.png", 50, 45)
    put(root, "2025/06/10/x-0.png", 300, 5)
    put(root, "2025/06/12/y-0.png", 300, 3)
    report = s.prune(now=NOW)
    assert files_under(root) == ["2025/06/12/y-0.png"]
    assert (report.deleted_files, report.kept_bytes) == (2, 300)


def test_no_limits_keeps_everything(tmp_path: Path) -> None:
    s = store(tmp_path, retention_days=0, max_gb=0)
    put(tmp_path / "out", "2001/01/01/ancient-0.png", 10, 9000)
    assert s.prune(now=NOW) == PruneReport(kept_files=1, kept_bytes=10)


def test_real_gib_cap_is_respected(tmp_path: Path) -> None:
    s = store(tmp_path, retention_days=0, max_gb=1)
    put(tmp_path / "out", "2025/06/15/a-0.png", 10, 0)
    assert s.prune(now=NOW).kept_files == 1
    assert GIB == 1024**3


def test_prune_only_touches_our_files(tmp_path: Path) -> None:
    """A mistyped output_dir must not cost anyone their files."""
    s = store(tmp_path, retention_days=1)
    root = tmp_path / "out"
    foreign = [
        put(root, "notes.txt", 5, 400),
        put(root, "2025/06/01/holiday.png", 5, 400),  # wrong name pattern
        put(root, "photos/2020/01/01/x-0.png", 5, 400),  # not a date tree at the top
        put(root, "2025/6/01/x-0.png", 5, 400),  # not two-digit month
        put(root, "2025/06/01/deep/x-0.png", 5, 400),  # below the day level
    ]
    ours = put(root, "2025/06/01/x-0.png", 5, 400)
    report = s.prune(now=NOW)
    assert report.deleted_files == 1 and not ours.exists()
    assert all(p.exists() for p in foreign)


def test_prune_stale_temp_files_but_not_in_flight_ones(tmp_path: Path) -> None:
    s = store(tmp_path, retention_days=30)
    root = tmp_path / "out"
    stale = put(root, "2025/06/15/.j-0.png.0a1b2c3d.tmp", 7, 0.5)
    fresh = put(root, "2025/06/15/.k-0.png.deadbeef.tmp", 7, 0.001)
    report = s.prune(now=NOW)
    assert not stale.exists() and fresh.exists()
    assert report.deleted_files == 1 and report.kept_files == 0


def test_prune_empty_or_missing_root(tmp_path: Path) -> None:
    assert store(tmp_path).prune(now=NOW) == PruneReport()
    (tmp_path / "out" / "2025" / "06" / "15").mkdir(parents=True)
    assert store(tmp_path).prune(now=NOW).removed_dirs == 3


def test_prune_counts_delete_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path, retention_days=1)
    put(tmp_path / "out", "2025/01/01/a-0.png", 5, 100)

    def busy(path: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(storage.os, "unlink", busy)
    report = s.prune(now=NOW)
    assert (report.deleted_files, report.errors, report.removed_dirs) == (0, 1, 0)


def test_prune_walks_the_tree_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = store(tmp_path, retention_days=1)
    root = tmp_path / "out"
    for day in range(1, 11):
        for i in range(5):
            put(root, f"2025/05/{day:02d}/j{day}-{i}.png", 3, 40)
    scanned: list[str] = []
    real_scandir = os.scandir

    def counting(path: str) -> object:
        scanned.append(path)
        return real_scandir(path)

    monkeypatch.setattr(storage.os, "scandir", counting)
    report = s.prune(now=NOW)
    assert report.deleted_files == 50 and report.removed_dirs == 12
    assert len(scanned) == len(set(scanned)) == 1 + 1 + 1 + 10  # root, year, month, 10 days


# ------------------------------------------------------------------------------ inputs (issue 12)


def test_inputs_live_while_their_job_does(tmp_path: Path) -> None:
    s = store(tmp_path, retention_days=0, max_gb=0)
    path = s.save_input("JOB1", b"png bytes")
    assert path == s.input_path("JOB1") and path.read_bytes() == b"png bytes"
    s.drop_input("JOB1")
    assert not path.exists()
    s.drop_input("JOB1")  # twice is fine
    with pytest.raises(ValueError):
        s.input_path("../escape")


def test_prune_deletes_leftover_inputs_but_never_an_active_jobs(tmp_path: Path) -> None:
    s = store(tmp_path, retention_days=1)
    root = tmp_path / "out"
    put(root, "inputs/LIVE.png", 3, 10)  # old, but its job is still queued
    put(root, "inputs/LEFT.png", 3, 10)  # old, and its job ended (a crash left it)
    put(root, "inputs/FRESH.png", 3, 0)  # just written: its job may be being admitted
    report = s.prune(now=NOW, active={"LIVE"})
    assert report.deleted_files == 1
    assert sorted(p.name for p in (root / "inputs").iterdir()) == ["FRESH.png", "LIVE.png"]


def test_inputs_count_in_max_gb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "GIB", 1000)  # max_gb=1 → a 1000-byte cap
    s = store(tmp_path, retention_days=0, max_gb=1)
    root = tmp_path / "out"
    put(root, "2025/05/01/old-0.png", 500, 5)
    put(root, "2025/05/02/new-0.png", 500, 4)
    put(root, "inputs/LIVE.png", 500, 1)  # a queued job's upload: the oldest output makes room
    s.prune(now=NOW, active={"LIVE"})
    assert not (root / "2025/05/01/old-0.png").exists()
    assert (root / "2025/05/02/new-0.png").exists() and (root / "inputs/LIVE.png").exists()
