"""The cost model: each operator's measured execution time on each node type, cached per machine.

A cost is keyed by the operator (its sizes are part of its name, see
:mod:`fedenc.planner.step`) and the node type that runs it: the processor kind and the number of
cores the task holds (``cpu x2``: one task on two intra-op threads; ``score_fwd/2`` ops are the
one-thread item-shard tasks measured while their sibling shard runs beside them, so memory-
bandwidth sharing is in the number). Samples come from short profiling runs of the real task
callables and are summarised by their median. Transfers between address spaces cost
``latency + bytes / bandwidth`` with the bandwidth measured by a copy.

The cache is a JSON file per machine, ``~/.cache/fedenc/planner/<machine-id>.json`` (directory
overridable with ``$FEDENC_PLANNER_CACHE`` or an argument), holding one entry per workload (model
sizes and batch), so a second run on the same machine plans without profiling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedenc import atomic
from fedenc.planner.graph import Task

CACHE_ENV = "FEDENC_PLANNER_CACHE"
# Bumped when the operators or the way they are profiled change, so costs measured before are
# profiled again instead of trusted. 2: tied input lookup, item-major logit blocks, and the
# executor's caller-thread lane (costs of 1 were taken with extra OpenMP teams alive).
# 3: each profiled step runs right after an untimed step of the same candidate (warm caches).
log = logging.getLogger(__name__)
FORMAT = 3


def machine_description() -> dict[str, Any]:
    """What makes operator costs differ between machines."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpu": cpu,
        "cores": cores,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "gpus": gpus,
    }


def machine_id(desc: dict[str, Any] | None = None) -> str:
    blob = json.dumps(desc or machine_description(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir(override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    return Path.home() / ".cache" / "fedenc" / "planner"


def cost_key(task: Task, kind: str) -> str:
    width = task.width if kind == "cpu" else 1
    return f"{task.op}|{kind}x{width}"


@dataclass
class CostModel:
    """Operator samples (seconds) by cost key, and transfer bandwidths by ``src->dst`` space."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    bandwidth: dict[str, float] = field(default_factory=dict)  # bytes per second
    latency: float = 20e-6  # per transfer between spaces
    profiled_at: float = 0.0
    load: str = ""

    def add(self, key: str, seconds: float) -> None:
        # Rounded as the cache stores it, so a plan from fresh measurements and one from the
        # cache of the same measurements are the same plan.
        self.samples.setdefault(key, []).append(round(seconds, 9))

    def has(self, task: Task, kind: str) -> bool:
        return cost_key(task, kind) in self.samples

    def cost(self, task: Task, kind: str) -> float:
        """Median measured seconds; ``inf`` when never measured (the scheduler then avoids it)."""
        if task.op.startswith("ps_exchange"):
            return 0.0  # the placeholder: no parameter server in the local trainer
        xs = self.samples.get(cost_key(task, kind))
        return statistics.median(xs) if xs else math.inf

    def transfer(self, nbytes: int, src: str, dst: str) -> float:
        if src == dst:
            return 0.0
        bw = self.bandwidth.get(f"{src}->{dst}") or self.bandwidth.get(f"{dst}->{src}")
        if not bw:
            return math.inf
        return self.latency + nbytes / bw

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": {k: list(v) for k, v in sorted(self.samples.items())},
            "bandwidth": self.bandwidth,
            "latency": self.latency,
            "profiled_at": self.profiled_at,
            "load": self.load,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostModel:
        return cls(
            samples={k: [float(x) for x in v] for k, v in data.get("samples", {}).items()},
            bandwidth={k: float(v) for k, v in data.get("bandwidth", {}).items()},
            latency=float(data.get("latency", 20e-6)),
            profiled_at=float(data.get("profiled_at", 0.0)),
            load=str(data.get("load", "")),
        )


class CostCache:
    """The machine's cost file: ``{"machine": ..., "workloads": {key: CostModel}}``."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.desc = machine_description()
        self.path = cache_dir(directory) / f"{machine_id(self.desc)}.json"

    def load(self, workload: str) -> CostModel | None:
        """The cached costs of ``workload``; None (profile again) when there are none, or when
        the file or the entry cannot be read (logged with the file, which is then rewritten)."""
        if not self.path.exists():
            return None
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                return None
            entry = data.get("workloads", {}).get(workload)
            if not entry:
                return None
            model = CostModel.from_json(entry)
            bad = [k for k, xs in model.samples.items() if not all(0 <= x < math.inf for x in xs)]
            if bad:
                raise ValueError(f"negative or non-finite samples of {bad[0]}")
            return model
        except (OSError, ValueError, TypeError, AttributeError) as err:
            log.warning("planner cache %s unreadable (%s): profiling again", self.path, err)
            return None

    def save(self, workload: str, model: CostModel) -> None:
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != FORMAT:
                data = {}
        except (OSError, ValueError):
            data = {}
        if not isinstance(data.get("workloads"), dict):
            data = {}
        data["format"] = FORMAT
        data["machine"] = self.desc
        data.setdefault("workloads", {})[workload] = model.to_json()
        try:
            # Atomic: concurrent trainers never read half a file (a cache: no fsync).
            atomic.write_text(
                self.path, json.dumps(data, indent=1, sort_keys=True) + "\n", durable=False
            )
        except OSError as err:  # the profile is used all the same, only not kept
            log.warning("planner cache %s cannot be written (%s): not cached", self.path, err)


def measure_bandwidth(device: torch.device, nbytes: int = 16 << 20, repeats: int = 5) -> float:
    """Host <-> ``device`` copy bandwidth in bytes/s (median of ``repeats`` copies)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        src.to(device, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:])


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""
