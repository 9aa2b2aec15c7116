"""Timers, peak memory, the time budget, and the one table + JSON the bench ends with.

Every figure is a Row: a section, what was measured, and seconds for the sides that ran it (bare
diffusers, the engine's Runner in this process, the engine client end to end) or one value with
its unit. Section results are written to the JSON after EACH section, so a run cut short by its
lease still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for the GPU: a CUDA call returns before its kernels ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], T]) -> tuple[T, float]:
    """fn() and its wall time in seconds, with the device idle before and after."""
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class PeakMemory:
    """Peak memory over a block: torch.cuda.max_memory_allocated on CUDA (weights + activations
    of everything this process holds on the GPU); on a CPU the process's peak resident set
    (ru_maxrss, which never goes down: an upper bound, not a per-block figure)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gib = 0.0

    @property
    def kind(self) -> str:
        return "cuda.max_memory_allocated" if self.device.type == "cuda" else "process ru_maxrss"

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Budget:
    """Wall-clock budget of the whole run: a section runs only when its estimate fits in what is
    left after the reserve kept for the sections after it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def left(self) -> float:
        return self.seconds - self.elapsed

    def allows(self, estimate: float, reserve: float = 0.0) -> bool:
        return estimate + reserve <= self.left


@dataclass
class Row:
    section: str
    figure: str
    bare: float | None = None  # seconds (per image where the figure says so)
    runner: float | None = None
    client: float | None = None
    value: float | None = None
    unit: str = "s"
    note: str = ""
    compare: bool = True  # False for one-off figures (warm-ups) where a ratio means nothing

    def ratio(self, side: str) -> float | None:
        """Engine speed ÷ bare speed (bare seconds ÷ engine seconds): ≥ 0.97 is the goal."""
        engine = getattr(self, side)
        if not self.compare or self.bare is None or engine is None or engine <= 0:
            return None
        return self.bare / engine


@dataclass
class SectionResult:
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""
    seconds: float = 0.0
    rows: list[Row] = field(default_factory=list)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    for name in ("diffusers", "transformers", "accelerate", "peft", "compel", "spandrel", "torchvision"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    return info


class Report:
    """The sections' results, printed as one markdown table and written as JSON."""

    def __init__(self, out: Path | None, header: dict[str, Any]) -> None:
        self.out = out
        self.header = header
        self.sections: dict[str, SectionResult] = {}
        self.started = time.perf_counter()

    @contextmanager
    def section(self, name: str) -> Iterator[SectionResult]:
        """Collects a section's rows and time; the caller catches failures (see cli.run_section)."""
        result = self.sections.setdefault(name, SectionResult())
        started = time.perf_counter()
        try:
            yield result
        finally:
            result.seconds += time.perf_counter() - started
            self.write()

    def skip(self, name: str, reason: str) -> None:
        self.sections[name] = SectionResult(status="skipped", reason=reason)
        self.write()

    def to_json(self) -> dict[str, Any]:
        sections = {}
        for name, result in self.sections.items():
            rows = []
            for row in result.rows:
                data = asdict(row)
                data["runner_speed_vs_bare"] = row.ratio("runner")
                data["client_speed_vs_bare"] = row.ratio("client")
                rows.append(data)
            sections[name] = {
                "status": result.status,
                "reason": result.reason,
                "seconds": round(result.seconds, 3),
                "rows": rows,
            }
        return {**self.header, "total_seconds": round(time.perf_counter() - self.started, 3), "sections": sections}

    def write(self) -> None:
        if self.out is None:
            return
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        tmp.replace(self.out)  # never a half-written file, even if the run is killed here

    def table(self) -> str:
        def cell(value: float | None, unit: str = "s") -> str:
            if value is None:
                return ""
            if unit == "s":
                return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
            return f"{value:.3g} {unit}".strip()

        def ratios(row: Row) -> str:
            parts = [f"{side} {r:.3f}" for side in ("runner", "client") if (r := row.ratio(side)) is not None]
            return ", ".join(parts)

        columns = ("section", "figure", "bare diffusers", "engine Runner", "engine client", "engine speed ÷ bare")
        lines = ["| " + " | ".join((*columns, "value", "note")) + " |", "| --- " * (len(columns) + 2) + "|"]
        for name, result in self.sections.items():
            if result.status == "skipped" and result.reason == "not selected":
                continue  # --only / --skip: the JSON says so, the table stays short
            if result.status != "ok":
                lines.append(f"| {name} | {result.status.upper()} | | | | | | {result.reason} |")
                continue
            for row in result.rows:
                value = cell(row.value, row.unit) if row.value is not None else ""
                lines.append(
                    f"| {row.section} | {row.figure} | {cell(row.bare)} | {cell(row.runner)} | {cell(row.client)} "
                    f"| {ratios(row)} | {value} | {row.note} |"
                )
        return "\n".join(lines)


__all__ = ["Budget", "PeakMemory", "Report", "Row", "SectionResult", "machine_info", "median", "sync", "timed"]
