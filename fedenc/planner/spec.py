"""Candidate parallel computing graphs of a training step, named and validated.

A :class:`PlanSpec` fixes the structure of the step; the operator graph it implies is built by
:mod:`fedenc.planner.step`:

* ``threads`` -- intra-op threads (cores held) of the tasks that run one at a time;
* ``chunk`` -- items per scoring block (the GEMM shape: ``batch x hidden x chunk``);
* ``shards`` -- the catalog is split into this many item shards, scored side by side by
  one-thread tasks (inter-op parallelism instead of intra-op);
* ``replicas`` -- data parallel: the batch is split over this many one-thread replicas whose
  gradients are summed (all-reduce) before the optimizer step;
* ``prefetch`` -- the next batch is built by its own task while this step computes (pipelining);
* ``device`` -- ``cpu`` or ``cuda`` (where a GPU exists).

Names read like ``cpu-t2-c4096``, ``cpu-t1-c4096-s2``, ``cpu-t1-c8192-dp2``, ``cpu-t1-c4096-pf``,
``cuda-c16384``. ``default`` is the trainer's plain loop, untouched by the planner.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

DEFAULT_CHUNK = 4096
CHUNKS = (1024, 2048, 4096, 8192, 16384)


class PlanError(ValueError):
    """A plan name that does not parse, or a plan this machine or model cannot run."""


@dataclass(frozen=True, order=True)
class PlanSpec:
    device: str = "cpu"
    threads: int = 1
    chunk: int = DEFAULT_CHUNK
    shards: int = 1
    replicas: int = 1
    prefetch: bool = False

    @property
    def name(self) -> str:
        if self.device == "cuda":
            parts = ["cuda", f"c{self.chunk}"]
        else:
            parts = ["cpu", f"t{self.threads}", f"c{self.chunk}"]
        if self.shards > 1:
            parts.append(f"s{self.shards}")
        if self.replicas > 1:
            parts.append(f"dp{self.replicas}")
        if self.prefetch:
            parts.append("pf")
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    @property
    def lanes(self) -> int:
        """Tasks that can run side by side by design (1 = a sequential step)."""
        return max(self.shards, self.replicas) + int(self.prefetch)

    @classmethod
    def parse(cls, name: str) -> PlanSpec:
        tokens = name.strip().lower().split("-")
        if not tokens or tokens[0] not in ("cpu", "cuda"):
            raise PlanError(
                f"bad plan name {name!r}: it starts with cpu or cuda "
                "(e.g. cpu-t2-c4096, cpu-t1-c4096-s2, cpu-t1-c4096-dp2, cuda-c16384), "
                "or use 'auto' or 'default'"
            )
        values: dict[str, int | bool | str] = {"device": tokens[0]}
        patterns = {
            "threads": r"t(\d+)",
            "chunk": r"c(\d+)",
            "shards": r"s(\d+)",
            "replicas": r"dp(\d+)",
        }
        for token in tokens[1:]:
            if token == "pf":
                values["prefetch"] = True
                continue
            for field_name, pattern in patterns.items():
                match = re.fullmatch(pattern, token)
                if match:
                    if field_name in values:
                        raise PlanError(f"bad plan name {name!r}: {token!r} given twice")
                    values[field_name] = int(match.group(1))
                    break
            else:
                raise PlanError(
                    f"bad plan name {name!r}: unknown part {token!r} (use tN threads, cN chunk, "
                    "sN item shards, dpN replicas, pf prefetch)"
                )
        if values["device"] == "cuda":
            values.setdefault("threads", 1)
        return cls(**values)  # type: ignore[arg-type]

    def check(self, cores: int, num_items: int, batch_size: int, cuda: bool) -> None:
        """:class:`PlanError` saying why this machine or workload cannot run the plan."""
        problems = []
        if self.device == "cuda" and not cuda:
            problems.append("it places the step on a GPU, and CUDA is not available here")
        if self.device == "cuda" and (self.shards > 1 or self.replicas > 1 or self.threads != 1):
            problems.append("GPU plans run the step as one stream (no tN, sN or dpN)")
        if self.threads < 1 or self.threads > cores:
            problems.append(f"threads must lie in 1..{cores} (this machine's cores)")
        if self.chunk < 1:
            problems.append("chunk must be >= 1")
        if self.shards < 1 or self.replicas < 1:
            problems.append("shards and replicas must be >= 1")
        if self.shards > 1 and self.replicas > 1:
            problems.append("item shards and data-parallel replicas do not combine")
        if self.replicas > 1 and self.prefetch:  # each replica builds its own batch
            problems.append("data-parallel replicas and prefetch (pf) do not combine")
        if self.shards > cores or self.replicas > cores:
            problems.append(f"{max(self.shards, self.replicas)} parallel lanes on {cores} cores")
        if self.shards > num_items:
            problems.append(f"{self.shards} item shards for {num_items} items")
        if self.replicas > batch_size:
            problems.append(f"{self.replicas} replicas for batches of {batch_size}")
        if (self.shards > 1 or self.replicas > 1) and self.threads != 1:
            problems.append("parallel lanes run one thread each (use t1)")
        if problems:
            raise PlanError(f"plan {self.name!r} refused: " + "; ".join(problems))


def enumerate_candidates(cores: int, num_items: int, batch_size: int, cuda: bool) -> list[PlanSpec]:
    """Every candidate this machine can run, in a fixed order (ties in cost keep this order)."""
    out: list[PlanSpec] = []
    counts = parallel_widths(cores)
    for chunk in CHUNKS:
        for threads in counts:
            out.append(PlanSpec(threads=threads, chunk=chunk))
        for lanes in counts[1:]:
            out.append(PlanSpec(threads=1, chunk=chunk, shards=lanes))
            out.append(PlanSpec(threads=1, chunk=chunk, replicas=lanes))
    for threads in counts:
        if threads < cores:
            out.append(PlanSpec(threads=threads, chunk=DEFAULT_CHUNK, prefetch=True))
    if cuda:
        for chunk in (*CHUNKS, 65536):
            out.append(PlanSpec(device="cuda", chunk=chunk))
    valid = []
    for spec in out:
        try:
            spec.check(cores, num_items, batch_size, cuda)
        except PlanError:
            continue
        if spec not in valid:
            valid.append(spec)
    return valid


def parallel_widths(cores: int) -> list[int]:
    """Thread and lane counts worth trying: powers of two and ``cores`` itself.

    Every count up to ``cores`` would make the space (and the profiling run) grow with the
    core count -- about 250 candidates on a 16-core machine; the costs between two powers of
    two lie between theirs, so the sparse ladder loses little.
    """
    widths = [1]
    while widths[-1] * 2 <= cores:
        widths.append(widths[-1] * 2)
    if widths[-1] != cores:
        widths.append(cores)
    return widths


def machine_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())
