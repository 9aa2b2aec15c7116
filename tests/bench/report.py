"""The one table `make bench` ends with: every benchmark records its headline figures here
(each a ratio or a distribution measured side by side in the same run), and the bench conftest
prints them together after the last test, with the machine they were measured on."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Figure:
    area: str
    what: str
    value: str
    goal: str = ""
    met: bool | None = None  # None: no goal, reported for information


FIGURES: list[Figure] = []


def record(area: str, what: str, value: str, goal: str = "", met: bool | None = None) -> None:
    FIGURES.append(Figure(area, what, value, goal, met))


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average {load:.1f}"


def table() -> str:
    header = ("area", "figure", "measured", "goal", "")
    rows = [header] + [
        (f.area, f.what, f.value, f.goal, "" if f.met is None else ("met" if f.met else "MISSED")) for f in FIGURES
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_json(path: str) -> None:
    with open(path, "w") as out:
        json.dump({"machine": machine(), "figures": [asdict(f) for f in FIGURES]}, out, indent=2)
