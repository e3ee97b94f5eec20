"""The scheduler on synthetic graphs with known costs, against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from fedenc.planner.graph import Edge, GraphError, Task, TaskGraph
from fedenc.planner.scheduler import (
    Processor,
    ScheduleError,
    evaluate,
    exhaustive,
    heft,
    schedule,
    table_cost,
)

CPU2 = [Processor("c0"), Processor("c1")]
HETERO = [Processor("c0"), Processor("c1"), Processor("g0", kind="gpu", space="gpu")]


def transfer(nbytes: int, src: str, dst: str) -> float:
    return nbytes * 1e-3  # 1 kB per second: edges weigh as much as tasks here


def random_graph(rng: random.Random, n: int, kinds: tuple[str, ...]) -> tuple[TaskGraph, dict]:
    tasks, table = [], {}
    for i in range(n):
        width = rng.choice([1, 1, 1, 2]) if "gpu" not in kinds else 1
        tasks.append(Task(f"t{i}", op=f"op{i}", width=width, kinds=kinds))
        table[f"t{i}"] = {
            k: rng.choice([1.0, 2.0, 3.0, 5.0]) * (0.5 if k == "gpu" else 1) for k in kinds
        }
    edges = [
        Edge(f"t{i}", f"t{j}", nbytes=rng.choice([0, 500, 2000]))
        for j in range(n)
        for i in range(j)
        if rng.random() < 0.35
    ]
    return TaskGraph(tasks, edges), table


def brute_force(graph: TaskGraph, procs: list[Processor], table: dict, xfer=None) -> float:
    """Every dispatch order consistent with the graph x every processor set for every task."""
    cost = table_cost(table)
    best = math.inf
    choices = {}
    for name in graph.order:
        task = graph.tasks[name]
        opts = []
        for kind in task.kinds:
            members = [p.name for p in procs if p.kind == kind]
            opts += list(itertools.combinations(members, task.width))
        choices[name] = opts
    for perm in itertools.permutations(graph.order):
        pos = {n: i for i, n in enumerate(perm)}
        if any(pos[e.src] > pos[e.dst] for e in graph.edges):
            continue
        for assign in itertools.product(*(choices[n] for n in perm)):
            order = list(zip(perm, assign, strict=True))
            kw = {"transfer": xfer} if xfer else {}
            best = min(best, evaluate(graph, procs, cost, order, **kw).makespan)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_exhaustive_finds_the_brute_force_optimum_on_cores(seed: int) -> None:
    rng = random.Random(seed)
    graph, table = random_graph(rng, 5, ("cpu",))
    procs = [*CPU2, Processor("c2")]
    got = exhaustive(graph, procs, table_cost(table))
    assert got.makespan == pytest.approx(brute_force(graph, procs, table))
    # the schedule it returns is a valid one with that makespan
    replay = evaluate(graph, procs, table_cost(table), [(p.task, p.procs) for p in got.placements])
    assert replay.makespan == pytest.approx(got.makespan)


@pytest.mark.parametrize("seed", range(4))
def test_exhaustive_optimal_on_heterogeneous_processors_with_transfers(seed: int) -> None:
    rng = random.Random(100 + seed)
    graph, table = random_graph(rng, 5, ("cpu", "gpu"))
    got = exhaustive(graph, HETERO, table_cost(table), transfer)
    assert got.makespan == pytest.approx(brute_force(graph, HETERO, table, transfer))


def test_known_optimum_two_independent_chains() -> None:
    # a(2)->b(2) and c(2)->d(2) on two cores: 4; one wide task x(3, width 2) after both: 7.
    tasks = [Task(n, n) for n in "abcd"] + [Task("x", "x", width=2)]
    edges = [Edge("a", "b"), Edge("c", "d"), Edge("b", "x"), Edge("d", "x")]
    table = {n: {"cpu": 2.0} for n in "abcd"} | {"x": {"cpu": 3.0}}
    got = exhaustive(TaskGraph(tasks, edges), CPU2, table_cost(table))
    assert got.makespan == pytest.approx(7.0)
    assert set(got.by_task()["x"].procs) == {"c0", "c1"}


def test_heft_is_valid_and_never_better_than_optimal() -> None:
    for seed in range(10):
        graph, table = random_graph(random.Random(seed), 6, ("cpu",))
        h = heft(graph, CPU2, table_cost(table))
        opt = exhaustive(graph, CPU2, table_cost(table))
        assert h.makespan >= opt.makespan - 1e-12
        replay = evaluate(graph, CPU2, table_cost(table), [(p.task, p.procs) for p in h.placements])
        assert replay.makespan == pytest.approx(h.makespan)


def test_schedule_falls_back_to_heft_on_large_graphs() -> None:
    graph, table = random_graph(random.Random(7), 30, ("cpu",))
    got = schedule(graph, CPU2, table_cost(table), budget=500)
    assert got.method == "heft"
    small, stable = random_graph(random.Random(7), 4, ("cpu",))
    assert schedule(small, CPU2, table_cost(stable)).method == "exhaustive"


def test_plans_are_deterministic_for_the_same_costs() -> None:
    graph, table = random_graph(random.Random(3), 7, ("cpu",))
    a = schedule(graph, CPU2, table_cost(table))
    b = schedule(graph, CPU2, table_cost(dict(reversed(list(table.items())))))
    assert [(p.task, p.procs, p.start) for p in a.placements] == [
        (p.task, p.procs, p.start) for p in b.placements
    ]


def test_bad_graphs_and_impossible_tasks_are_refused() -> None:
    with pytest.raises(GraphError, match="cycle"):
        TaskGraph([Task("a", "a"), Task("b", "b")], [Edge("a", "b"), Edge("b", "a")])
    with pytest.raises(GraphError, match="unknown task"):
        TaskGraph([Task("a", "a")], [Edge("a", "z")])
    with pytest.raises(GraphError, match="duplicate"):
        TaskGraph([Task("a", "a"), Task("a", "b")])
    wide = TaskGraph([Task("w", "w", width=3)])
    with pytest.raises(ScheduleError, match="no processor set"):
        schedule(wide, CPU2, table_cost({"w": {"cpu": 1.0}}))
    g = TaskGraph([Task("a", "a"), Task("b", "b")], [Edge("a", "b")])
    with pytest.raises(ScheduleError, match="before its inputs"):
        evaluate(
            g, CPU2, table_cost({"a": {"cpu": 1}, "b": {"cpu": 1}}), [("b", ["c0"]), ("a", ["c0"])]
        )
