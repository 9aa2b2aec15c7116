"""Prints the benchmarks' one summary table at the end of `make bench` (see tests/bench/report.py);
``ATELIER_BENCH_JSON=FILE`` also writes it as JSON."""

from __future__ import annotations

import os
from typing import Any

from tests.bench import report


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not report.FIGURES:
        return
    terminalreporter.write_sep("=", "Atelier performance report")
    terminalreporter.write_line(f"measured on: {report.machine()}")
    terminalreporter.write_line(report.table())
    if path := os.environ.get("ATELIER_BENCH_JSON"):
        report.write_json(path)
        terminalreporter.write_line(f"written to {path}")
