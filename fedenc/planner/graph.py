"""Operator-task graphs: the tasks of one unit of work (a training step), their dependencies, and
the bytes each dependency carries.

A :class:`Task` names the *operator* it runs (``op``, the key the cost model prices), how many CPU
cores it occupies while it runs (``width``: its intra-op threads, so the thread budget is part of
the graph), which kinds of processor may run it, and optionally the callable the executor runs. An
:class:`Edge` says that ``dst`` consumes what ``src`` produced, and how many bytes that is: moving
them between processors of different kinds (host and GPU, two processes) costs time, moving them
between threads of one process does not.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TaskFn = Callable[[Mapping[str, Any]], Any]
"""What a task runs: it gets the outputs of its predecessors by task name, returns its own."""


class GraphError(ValueError):
    """A malformed operator graph (unknown task, duplicate name, cycle)."""


@dataclass(frozen=True)
class Task:
    name: str
    op: str  # the operator, as the cost model knows it (e.g. "score_fwd[rows=100,items=21549]")
    width: int = 1  # CPU cores (intra-op threads) the task holds while it runs
    kinds: tuple[str, ...] = ("cpu",)  # processor kinds that may run it
    fn: TaskFn | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            raise GraphError("a task needs a name")
        if self.width < 1:
            raise GraphError(f"task {self.name!r}: width must be >= 1 (got {self.width})")
        if not self.kinds:
            raise GraphError(f"task {self.name!r}: no processor kind may run it")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    nbytes: int = 0  # size of the data ``dst`` reads from ``src``


class TaskGraph:
    """A DAG of tasks; construction checks names, edges and acyclicity."""

    def __init__(self, tasks: Iterable[Task], edges: Iterable[Edge] = ()) -> None:
        self.tasks: dict[str, Task] = {}
        for task in tasks:
            if task.name in self.tasks:
                raise GraphError(f"duplicate task name {task.name!r}")
            self.tasks[task.name] = task
        self.edges: list[Edge] = []
        self.preds: dict[str, list[Edge]] = {name: [] for name in self.tasks}
        self.succs: dict[str, list[Edge]] = {name: [] for name in self.tasks}
        seen: set[tuple[str, str]] = set()
        for edge in edges:
            for end in (edge.src, edge.dst):
                if end not in self.tasks:
                    raise GraphError(f"edge {edge.src} -> {edge.dst}: unknown task {end!r}")
            if edge.src == edge.dst:
                raise GraphError(f"self-loop on task {edge.src!r}")
            if (edge.src, edge.dst) in seen:
                continue
            seen.add((edge.src, edge.dst))
            self.edges.append(edge)
            self.preds[edge.dst].append(edge)
            self.succs[edge.src].append(edge)
        self.order = self._topological_order()

    def _topological_order(self) -> list[str]:
        """Kahn's algorithm; ties broken by insertion order, so the order is deterministic."""
        indeg = {name: len(p) for name, p in self.preds.items()}
        ready = [name for name in self.tasks if indeg[name] == 0]
        out: list[str] = []
        while ready:
            name = ready.pop(0)
            out.append(name)
            for edge in self.succs[name]:
                indeg[edge.dst] -= 1
                if indeg[edge.dst] == 0:
                    ready.append(edge.dst)
        if len(out) != len(self.tasks):
            stuck = sorted(set(self.tasks) - set(out))
            raise GraphError(f"the operator graph has a cycle through {stuck}")
        return out

    def __len__(self) -> int:
        return len(self.tasks)

    def predecessors(self, name: str) -> list[str]:
        return [e.src for e in self.preds[name]]

    def successors(self, name: str) -> list[str]:
        return [e.dst for e in self.succs[name]]

    def describe(self, costs: Mapping[str, float] | None = None) -> list[str]:
        """One line per task in topological order: op, width, inputs with their sizes."""
        lines = []
        for name in self.order:
            task = self.tasks[name]
            inputs = ", ".join(f"{e.src} ({_human_bytes(e.nbytes)})" for e in self.preds[name])
            cost = f" {1000 * costs[name]:.2f} ms" if costs and name in costs else ""
            lines.append(
                f"{name}: {task.op} x{task.width}{cost}" + (f" <- {inputs}" if inputs else "")
            )
        return lines


def chain(names: Sequence[str]) -> list[Edge]:
    """Edges ``a -> b -> c ...`` carrying no data size (control dependencies)."""
    return [Edge(a, b) for a, b in itertools.pairwise(names)]


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
