"""Operator schedules: which processors run each task, in which order, and the makespan.

Processors are single slots (one CPU core, one GPU). A task of width ``w`` needs ``w`` slots of one
kind *at once* (its intra-op threads), so inter-op parallelism (two 1-thread tasks side by side)
and intra-op parallelism (one 2-thread task) compete for the same cores, as they do in a real
process. Data moving along an edge between processors in different address spaces (host and GPU,
two processes) costs ``transfer(nbytes, src_space, dst_space)`` seconds.

Two searches:

* :func:`exhaustive` enumerates every *list schedule* (pick a ready task and a processor set, start
  it as early as possible after what that set already runs) with branch and bound. Every schedule
  can be replayed in start-time order as such a list schedule no later than the original, so this
  finds the optimal makespan;
* :func:`heft` is Heterogeneous Earliest Finish Time (Topcuoglu et al. 2002): tasks by upward rank,
  each on the processor set that finishes it first. Polynomial, for graphs too big to enumerate.

:func:`schedule` picks: exhaustive while it stays within a fixed node budget, else HEFT. Both are
deterministic for the same costs (ties break by task order, then processor name).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from fedenc.planner.graph import Edge, TaskGraph

CostFn = Callable[[str, str], float]
"""``cost(task_name, processor_kind)`` in seconds; ``math.inf`` where that kind cannot run it."""
TransferFn = Callable[[int, str, str], float]
"""``transfer(nbytes, src_space, dst_space)`` in seconds (0 within one space)."""


class ScheduleError(ValueError):
    """No processor can run a task, or a schedule breaks the graph's rules."""


@dataclass(frozen=True)
class Processor:
    name: str
    kind: str = "cpu"  # what the cost model prices ("cpu", "cuda")
    space: str = "host"  # address space: data moves for free within one


@dataclass(frozen=True)
class Placement:
    task: str
    procs: tuple[str, ...]
    kind: str
    start: float
    finish: float


@dataclass
class Schedule:
    placements: list[Placement] = field(default_factory=list)  # in dispatch (list) order
    method: str = ""
    explored: int = 0  # search nodes expanded (exhaustive) or tasks placed (HEFT)

    @property
    def makespan(self) -> float:
        return max((p.finish for p in self.placements), default=0.0)

    def by_task(self) -> dict[str, Placement]:
        return {p.task: p for p in self.placements}

    def per_processor(self) -> dict[str, list[str]]:
        """Each processor's tasks in the order it runs them."""
        out: dict[str, list[str]] = {}
        for p in sorted(self.placements, key=lambda q: (q.start, q.task)):
            for proc in p.procs:
                out.setdefault(proc, []).append(p.task)
        return out


def no_transfer(nbytes: int, src: str, dst: str) -> float:
    return 0.0


# -- the list-schedule state ------------------------------------------------------------------

_Undo = tuple[str, list[tuple[int, float]]]


class _State:
    """Processor availability and task finish times while a list schedule is built."""

    def __init__(
        self,
        graph: TaskGraph,
        procs: Sequence[Processor],
        cost: CostFn,
        transfer: TransferFn,
    ) -> None:
        self.graph = graph
        self.procs = list(procs)
        self.index = {p.name: i for i, p in enumerate(self.procs)}
        self.cost = cost
        self.transfer = transfer
        self.avail = [0.0] * len(self.procs)
        self.placed: dict[str, Placement] = {}
        self.space = {p.name: p.space for p in self.procs}

    def ready_time(self, task: str, space: str) -> float:
        """When all inputs of ``task`` can be in ``space``."""
        t = 0.0
        for edge in self.graph.preds[task]:
            src = self.placed[edge.src]
            arrive = src.finish + self._move(edge, self.space[src.procs[0]], space)
            t = max(t, arrive)
        return t

    def _move(self, edge: Edge, src: str, dst: str) -> float:
        return 0.0 if src == dst else self.transfer(edge.nbytes, src, dst)

    def options(self, task: str) -> list[tuple[tuple[int, ...], str, float, float]]:
        """Distinct ``(processor indices, kind, start, finish)`` choices for ``task``.

        Processor sets that look alike (same kind, space and availability times) are equivalent
        for everything that follows, so only one of each is returned.
        """
        t = self.graph.tasks[task]
        out = []
        seen: set[tuple[str, str, tuple[float, ...]]] = set()
        for kind in t.kinds:
            run = self.cost(task, kind)
            if not math.isfinite(run):
                continue
            groups: dict[str, list[int]] = {}
            for i, p in enumerate(self.procs):
                if p.kind == kind:
                    groups.setdefault(p.space, []).append(i)
            for space, members in sorted(groups.items()):
                if len(members) < t.width:
                    continue
                ready = self.ready_time(task, space)
                for combo in itertools.combinations(members, t.width):
                    key = (kind, space, tuple(sorted(self.avail[i] for i in combo)))
                    if key in seen:
                        continue
                    seen.add(key)
                    start = max(ready, *(self.avail[i] for i in combo))
                    out.append((combo, kind, start, start + run))
        return out

    def place(
        self, task: str, combo: tuple[int, ...], kind: str, start: float, end: float
    ) -> _Undo:
        undo = (task, [(i, self.avail[i]) for i in combo])
        for i in combo:
            self.avail[i] = end
        names = tuple(self.procs[i].name for i in combo)
        self.placed[task] = Placement(task, names, kind, start, end)
        return undo

    def unplace(self, undo: _Undo) -> None:
        task, old = undo
        for i, value in old:
            self.avail[i] = value
        del self.placed[task]


def _check(graph: TaskGraph, procs: Sequence[Processor], cost: CostFn) -> None:
    if not procs:
        raise ScheduleError("no processors to schedule on")
    names = [p.name for p in procs]
    if len(set(names)) != len(names):
        raise ScheduleError(f"duplicate processor names in {names}")
    for name in graph.order:
        task = graph.tasks[name]
        ok = any(
            math.isfinite(cost(name, kind)) and sum(p.kind == kind for p in procs) >= task.width
            for kind in task.kinds
        )
        if not ok:
            raise ScheduleError(
                f"no processor set can run task {name!r} (kinds {task.kinds}, width {task.width})"
            )


# -- exhaustive -------------------------------------------------------------------------------


class SearchBudgetExceeded(RuntimeError):
    pass


def exhaustive(
    graph: TaskGraph,
    procs: Sequence[Processor],
    cost: CostFn,
    transfer: TransferFn = no_transfer,
    budget: int | None = None,
) -> Schedule:
    """The optimal list schedule by branch and bound; ``SearchBudgetExceeded`` after ``budget``
    expanded nodes (None = no limit)."""
    _check(graph, procs, cost)
    state = _State(graph, procs, cost, transfer)
    position = {name: i for i, name in enumerate(graph.order)}
    # Lower bound on the time from a task's start to the end: its cheapest cost plus the
    # cheapest chain below it (transfers ignored, so the bound stays valid).
    cheapest = {n: min(cost(n, k) for k in graph.tasks[n].kinds) for n in graph.order}
    bottom: dict[str, float] = {}
    for name in reversed(graph.order):
        below = max((bottom[s] for s in graph.successors(name)), default=0.0)
        bottom[name] = cheapest[name] + below
    total_work = sum(cheapest[n] * graph.tasks[n].width for n in graph.order)
    first = heft(graph, procs, cost, transfer)  # a good incumbent prunes early
    best, best_span = first, first.makespan
    explored = 0
    indeg = {n: len(graph.preds[n]) for n in graph.order}
    ready = [n for n in graph.order if indeg[n] == 0]
    dispatch: list[str] = []

    def bound(done_work: float) -> float:
        lb = max((p.finish for p in state.placed.values()), default=0.0)
        for n in ready:  # critical path below each ready task, transfers ignored
            inputs = max((state.placed[e.src].finish for e in graph.preds[n]), default=0.0)
            lb = max(lb, inputs + bottom[n])
        # Work conservation: processor i is taken until avail[i], and the remaining
        # slot-seconds must fit after that on some processor.
        return max(lb, (sum(state.avail) + total_work - done_work) / len(procs))

    def dfs(done_work: float) -> None:
        nonlocal best, best_span, explored
        explored += 1
        if budget is not None and explored > budget:
            raise SearchBudgetExceeded(f"more than {budget} search nodes")
        if not ready:
            span = max(p.finish for p in state.placed.values())
            if span < best_span - 1e-15:
                best_span = span
                best = Schedule(placements=[state.placed[n] for n in dispatch], method="exhaustive")
            return
        if bound(done_work) >= best_span - 1e-15:
            return
        for name in sorted(ready, key=position.__getitem__):
            for combo, kind, start, end in sorted(
                state.options(name), key=lambda o: (o[3], o[0], o[1])
            ):
                if end >= best_span - 1e-15:
                    continue
                undo = state.place(name, combo, kind, start, end)
                ready.remove(name)
                dispatch.append(name)
                released = []
                for edge in graph.succs[name]:
                    indeg[edge.dst] -= 1
                    if indeg[edge.dst] == 0:
                        ready.append(edge.dst)
                        released.append(edge.dst)
                dfs(done_work + cheapest[name] * graph.tasks[name].width)
                for edge in graph.succs[name]:
                    indeg[edge.dst] += 1
                for r in released:
                    ready.remove(r)
                dispatch.pop()
                ready.append(name)
                state.unplace(undo)

    dfs(0.0)
    best.method = "exhaustive"
    best.explored = explored
    return best


# -- HEFT -------------------------------------------------------------------------------------


def upward_ranks(
    graph: TaskGraph, procs: Sequence[Processor], cost: CostFn, transfer: TransferFn
) -> dict[str, float]:
    """HEFT's upward rank: mean cost over the kinds present plus the heaviest path below,
    counting the mean transfer time of each edge."""
    kinds_present = {p.kind for p in procs}
    spaces = sorted({p.space for p in procs})
    rank: dict[str, float] = {}
    for name in reversed(graph.order):
        task = graph.tasks[name]
        costs = [cost(name, k) for k in task.kinds if k in kinds_present]
        finite = [c for c in costs if math.isfinite(c)]
        mean = sum(finite) / len(finite) if finite else 0.0
        tail = 0.0
        for edge in graph.succs[name]:
            pairs = [(a, b) for a in spaces for b in spaces]
            comm = sum(0.0 if a == b else transfer(edge.nbytes, a, b) for a, b in pairs)
            tail = max(tail, comm / len(pairs) + rank[edge.dst])
        rank[name] = mean + tail
    return rank


def heft(
    graph: TaskGraph,
    procs: Sequence[Processor],
    cost: CostFn,
    transfer: TransferFn = no_transfer,
) -> Schedule:
    _check(graph, procs, cost)
    rank = upward_ranks(graph, procs, cost, transfer)
    position = {name: i for i, name in enumerate(graph.order)}
    # Decreasing rank is a topological order when costs are positive; the explicit readiness
    # check keeps it one with zero-cost tasks too.
    pending = sorted(graph.order, key=lambda n: (-rank[n], position[n]))
    state = _State(graph, procs, cost, transfer)
    dispatch: list[str] = []
    while pending:
        name = next(n for n in pending if all(p in state.placed for p in graph.predecessors(n)))
        pending.remove(name)
        choice = min(state.options(name), key=lambda o: (o[3], o[0], o[1]))
        state.place(name, *choice)
        dispatch.append(name)
    return Schedule(
        placements=[state.placed[n] for n in dispatch], method="heft", explored=len(dispatch)
    )


def schedule(
    graph: TaskGraph,
    procs: Sequence[Processor],
    cost: CostFn,
    transfer: TransferFn = no_transfer,
    budget: int = 20000,
) -> Schedule:
    """Exhaustive (optimal) when the search fits ``budget`` nodes, else HEFT."""
    try:
        return exhaustive(graph, procs, cost, transfer, budget=budget)
    except SearchBudgetExceeded:
        return heft(graph, procs, cost, transfer)


def evaluate(
    graph: TaskGraph,
    procs: Sequence[Processor],
    cost: CostFn,
    order: Sequence[tuple[str, Sequence[str]]],
    transfer: TransferFn = no_transfer,
) -> Schedule:
    """The makespan of one explicit list schedule: ``(task, processor names)`` in dispatch order.

    Raises :class:`ScheduleError` when the order breaks a dependency or a task is placed on
    processors of the wrong kind or number.
    """
    state = _State(graph, procs, cost, transfer)
    if sorted(t for t, _ in order) != sorted(graph.order):
        raise ScheduleError("the order must place every task exactly once")
    by_name = {p.name: p for p in procs}
    for name, names in order:
        task = graph.tasks[name]
        missing = [p for p in graph.predecessors(name) if p not in state.placed]
        if missing:
            raise ScheduleError(f"task {name!r} dispatched before its inputs {missing}")
        chosen = [by_name[n] for n in names]
        kinds = {p.kind for p in chosen}
        spaces = {p.space for p in chosen}
        if len(chosen) != task.width or len(kinds) != 1 or len(spaces) != 1:
            raise ScheduleError(f"task {name!r} needs {task.width} processors of one kind")
        kind = kinds.pop()
        run = cost(name, kind) if kind in task.kinds else math.inf
        if not math.isfinite(run):
            raise ScheduleError(f"task {name!r} cannot run on {kind}")
        combo = tuple(state.index[p.name] for p in chosen)
        start = max(state.ready_time(name, spaces.pop()), *(state.avail[i] for i in combo))
        state.place(name, combo, kind, start, start + run)
    return Schedule(placements=[state.placed[n] for n, _ in order], method="given")


def table_cost(table: Mapping[str, Mapping[str, float]]) -> CostFn:
    """A cost function from ``{task: {kind: seconds}}`` (missing = cannot run)."""

    def cost(task: str, kind: str) -> float:
        return table.get(task, {}).get(kind, math.inf)

    return cost
