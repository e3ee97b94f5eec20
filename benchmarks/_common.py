"""Helpers shared by the benchmark scripts: data location, timing, table printing."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def data_dir(arg: str | None) -> Path | None:
    """``--data``, else $FEDENC_DATA, else ../shared/data when it exists."""
    for candidate in (arg, os.environ.get("FEDENC_DATA")):
        if candidate:
            return Path(candidate)
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return default if default.is_dir() else None


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Run every variant once per repeat, alternating, so machine noise hits all of them alike."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            out[name].append(timed(fn))
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"
