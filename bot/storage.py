"""Finished images on local disk, so `/job id` can re-post a result after a restart, and the
input images of jobs still queued or running.

Layout: `<output_dir>/YYYY/MM/DD/<job_id>-<index>.<ext>` (UTC date of saving), and beside a
ControlNet job's images its control map, `<job_id>-control.<ext>`. Dated folders keep any one
directory small and make pruning by age obvious to an operator with `ls`. Inputs are
`<output_dir>/inputs/<job_id>.png` (and a control image `<job_id>.control.png`): kept only while a
retry may need them (the bot deletes them when their job ends), and counted in `max_gb` with the
outputs.

Why the details are the way they are:

* Writes are atomic (a hidden temp file in the same folder, then `os.replace`): a crash or a
  full disk never leaves a truncated PNG that `/job` would later post as a broken image.
* Any OSError while saving (ENOSPC above all) becomes `StorageError` with a one-line message.
  The disk copy is a convenience: the caller still posts the job to Discord from memory.
* `prune` only ever touches what this store writes: files named like ours inside
  `YYYY/MM/DD` folders. A mistyped `output_dir` pointing at a home directory therefore cannot
  delete anyone's files. It walks the tree once (os.scandir, one stat per file), deletes by
  age, then oldest-first until the total fits the cap, then removes emptied date folders.
* `keep_days = 0` means "no age limit" and `max_gb = 0` means "no size cap" (both off keeps
  everything). Sizes are GiB (1024³ bytes), as `df -h` reports them. Inputs of active jobs
  (`prune(active=...)`) are never deleted; other inputs are leftovers of a crash and go.
* All methods are synchronous, short file operations; call `prune` via `asyncio.to_thread`
  (it may touch thousands of files), `save`/`read` are a single small file each.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config.settings import StorageSettings
from engine.api import ImageOut

log = logging.getLogger(__name__)

GIB = 1024**3
DAY_SECONDS = 86400.0
# Crash leftovers: temp files older than this are deleted; younger ones may be a save in flight.
STALE_TEMP_SECONDS = 3600.0

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
OUTPUT_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}-(?:\d+|control)\.(?:png|webp|jpg)")
TEMP_NAME_PATTERN = re.compile(r"\.[A-Za-z0-9_-]{1,64}-(?:\d+|control)\.(?:png|webp|jpg)\.[0-9a-f]+\.tmp")
INPUT_NAME_PATTERN = re.compile(r"(?P<job>[A-Za-z0-9_-]{1,64})(?:\.control)?\.png")
INPUTS = "inputs"
# A ControlNet job's second picture: its control image among the inputs, its control map among
# the outputs (an entry of the job's `images` marked with this role, after its images).
CONTROL = "control"
DATE_PARTS = (re.compile(r"\d{4}"), re.compile(r"\d{2}"), re.compile(r"\d{2}"))


class StorageError(Exception):
    """Saving an image failed (disk full, permissions, ...); the message is one line."""


@dataclass(frozen=True)
class PruneReport:
    deleted_files: int = 0
    deleted_bytes: int = 0
    kept_files: int = 0
    kept_bytes: int = 0
    removed_dirs: int = 0
    errors: int = 0


@dataclass(frozen=True)
class _Entry:
    path: str
    mtime: float
    size: int


class OutputStore:
    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self.root = Path(settings.output_dir).absolute()

    def path_for(self, job_id: str, index: int, image: ImageOut, *, now: datetime | None = None) -> Path:
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} is not a safe file name")
        if index < 0:
            raise ValueError(f"image index {index} is negative")
        day = (now or datetime.now(UTC)).astimezone(UTC)
        folder = self.root / f"{day:%Y}" / f"{day:%m}" / f"{day:%d}"
        return folder / f"{job_id}-{index}.{image.filename_suffix}"

    def save(self, job_id: str, index: int, image: ImageOut, *, now: datetime | None = None) -> Path:
        """Write one image atomically and return its absolute path; StorageError on any OSError."""
        return self._write(self.path_for(job_id, index, image, now=now), image.data)

    def save_control(self, job_id: str, image: ImageOut, *, now: datetime | None = None) -> Path:
        """Write a ControlNet job's control map beside its images (as `save`)."""
        path = self.path_for(job_id, 0, image, now=now)
        return self._write(path.with_name(f"{job_id}-{CONTROL}.{image.filename_suffix}"), image.data)

    def _write(self, path: Path, data: bytes) -> Path:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            # Twice: a concurrent prune may remove the (empty) day folder between mkdir and open.
            for attempt in (1, 2):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with open(temp, "wb") as handle:
                        handle.write(data)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            os.replace(temp, path)
        except OSError as exc:
            _unlink_quietly(temp)
            raise StorageError(_describe_os_error(exc, path)) from exc
        return path

    def read(self, path: str | os.PathLike[str]) -> bytes | None:
        """The image's bytes, or None when it has been pruned (or never existed).

        A relative path is taken relative to `output_dir`; paths outside it are refused, so a
        tampered database row cannot make the bot post arbitrary files.
        """
        full = (self.root / path).resolve()
        if not full.is_relative_to(self.root.resolve()):
            raise ValueError(f"{path} is outside the output folder {self.root}")
        try:
            return full.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    # ------------------------------------------------------------------ inputs
    def input_path(self, job_id: str, role: str = "") -> Path:
        """A job's input image, or with `role` (CONTROL) its other input."""
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError(f"job id {job_id!r} is not a safe file name")
        if role not in ("", CONTROL):
            raise ValueError(f"no input role {role!r}")
        return self.root / INPUTS / (f"{job_id}.{role}.png" if role else f"{job_id}.png")

    def save_input(self, job_id: str, data: bytes, role: str = "") -> Path:
        """Write a job's input image (before the job exists, so the engine never sees a job
        without its image); StorageError on any OSError."""
        path = self.input_path(job_id, role)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as exc:
            _unlink_quietly(path)
            raise StorageError(_describe_os_error(exc, path)) from exc
        return path

    def drop_input(self, job_id: str) -> None:
        """The job ended: its inputs are not needed any more."""
        _unlink_quietly(self.input_path(job_id))
        _unlink_quietly(self.input_path(job_id, CONTROL))

    def delete(self, paths: list[str]) -> int:
        """Delete stored images (a deleted result, an erased history); returns how many went.
        Paths outside the output folder are refused, as in `read`."""
        deleted = 0
        for path in paths:
            full = (self.root / path).resolve()
            if not full.is_relative_to(self.root.resolve()):
                raise ValueError(f"{path} is outside the output folder {self.root}")
            try:
                full.unlink()
                deleted += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("could not delete %s: %s", full, exc.strerror or exc)
        return deleted

    def prune(self, now: float | datetime | None = None, *, active: Collection[str] = ()) -> PruneReport:
        """Delete images older than keep_days and leftover inputs (of jobs not in `active`), then
        the oldest images until images and inputs together fit in max_gb."""
        if isinstance(now, datetime):
            now = now.timestamp()
        current = datetime.now(UTC).timestamp() if now is None else float(now)
        files, temps, dirs, inputs = self._scan()

        doomed: list[_Entry] = [t for t in temps if current - t.mtime > STALE_TEMP_SECONDS]
        live_inputs = [i for i in inputs if _input_job(i.path) in active]
        doomed += [i for i in inputs if _input_job(i.path) not in active and current - i.mtime > STALE_TEMP_SECONDS]
        kept = files
        if self.settings.keep_days > 0:
            cutoff = current - self.settings.keep_days * DAY_SECONDS
            doomed += [f for f in files if f.mtime < cutoff]
            kept = [f for f in files if f.mtime >= cutoff]
        if self.settings.max_gb > 0:
            cap = int(self.settings.max_gb * GIB) - sum(i.size for i in live_inputs)
            kept.sort(key=lambda f: (f.mtime, f.path))
            total = sum(f.size for f in kept)
            oldest = 0
            while total > cap and oldest < len(kept):
                total -= kept[oldest].size
                oldest += 1
            doomed += kept[:oldest]
            kept = kept[oldest:]

        deleted_files = deleted_bytes = errors = 0
        for entry in doomed:
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                errors += 1
                log.warning("could not delete %s: %s", entry.path, exc.strerror or exc)
                continue
            deleted_files += 1
            deleted_bytes += entry.size

        removed_dirs = 0
        for folder in sorted(dirs, key=lambda d: d.count(os.sep), reverse=True):
            try:
                os.rmdir(folder)
            except OSError:  # not empty (the usual case), or already gone
                continue
            removed_dirs += 1

        report = PruneReport(
            deleted_files=deleted_files,
            deleted_bytes=deleted_bytes,
            kept_files=len(kept),
            kept_bytes=sum(f.size for f in kept),
            removed_dirs=removed_dirs,
            errors=errors,
        )
        if deleted_files or errors:
            log.info("pruned outputs: %s", report)
        return report

    def _scan(self) -> tuple[list[_Entry], list[_Entry], list[str], list[_Entry]]:
        """One walk over root/YYYY/MM/DD: our images, our temp files, the date folders, and the
        inputs in root/inputs."""
        files: list[_Entry] = []
        temps: list[_Entry] = []
        dirs: list[str] = []
        inputs: list[_Entry] = []

        def walk(folder: str, depth: int) -> None:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                return
            for entry in entries:
                try:
                    if depth == 0 and entry.name == INPUTS and entry.is_dir(follow_symlinks=False):
                        walk_inputs(entry.path)
                        continue
                    if depth < 3:
                        if DATE_PARTS[depth].fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                            dirs.append(entry.path)
                            walk(entry.path, depth + 1)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    if OUTPUT_NAME_PATTERN.fullmatch(entry.name):
                        bucket = files
                    elif TEMP_NAME_PATTERN.fullmatch(entry.name):
                        bucket = temps
                    else:
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except OSError:  # vanished while walking
                    continue
                bucket.append(_Entry(entry.path, stat.st_mtime, stat.st_size))

        def walk_inputs(folder: str) -> None:
            for entry in os.scandir(folder):
                if INPUT_NAME_PATTERN.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    inputs.append(_Entry(entry.path, stat.st_mtime, stat.st_size))

        walk(str(self.root), 0)
        return files, temps, dirs, inputs


def _input_job(path: str) -> str:
    match = INPUT_NAME_PATTERN.fullmatch(Path(path).name)
    return match["job"] if match else Path(path).stem


def result_images(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's stored images without its control map."""
    return [entry for entry in entries if entry.get("role") != CONTROL]


def control_entry(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The stored control map of a ControlNet job, if it has one."""
    return next((entry for entry in entries if entry.get("role") == CONTROL), None)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = "the disk is full"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"no permission to write there ({exc.strerror})"
    else:
        reason = exc.strerror or str(exc)
    return f"could not save {path}: {reason}; free space or change storage.output_dir"


__all__ = ["CONTROL", "OutputStore", "PruneReport", "StorageError", "control_entry", "result_images"]
