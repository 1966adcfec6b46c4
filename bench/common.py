"""Helpers shared by the bench scripts: timing and result files."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable

from irconvert.fileformat import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def median_time(fn: Callable[[], object], repeat: int = 10, warmup: int = 2) -> float:
    """Return the median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def write_results(name: str, rows, table: str, results: Path = RESULTS, quiet: bool = False) -> None:
    """Write <results>/<name>.json and <name>.md atomically (bench/results by default) and print the table."""
    write_text(results / f"{name}.json", json.dumps(rows, indent=2) + "\n")
    write_text(results / f"{name}.md", table + "\n")
    if not quiet:
        print(table)
