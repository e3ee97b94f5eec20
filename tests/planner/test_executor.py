"""The executor runs every task after its inputs and returns what sequential execution returns."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from fedenc.planner.executor import Executor, TaskFailedError, run_sequential
from fedenc.planner.graph import Edge, Task, TaskGraph
from fedenc.planner.scheduler import Processor, heft, schedule, table_cost

PROCS = [Processor("c0"), Processor("c1"), Processor("c2")]


def tensor_graph(seed: int, n: int = 12) -> tuple[TaskGraph, dict[str, dict[str, float]], list]:
    """Each task mixes its inputs' tensors with a seeded matrix and logs start/end times."""
    rng = random.Random(seed)
    log: list[tuple[str, str, float]] = []
    lock = threading.Lock()
    tasks, table = [], {}
    preds: dict[str, list[str]] = {}
    edges = []
    for j in range(n):
        name = f"t{j}"
        preds[name] = [f"t{i}" for i in range(j) if rng.random() < 0.3]
        edges += [Edge(p, name, nbytes=64 * 64 * 4) for p in preds[name]]

        def fn(args: Mapping[str, Any], name: str = name, j: int = j) -> torch.Tensor:
            with lock:
                log.append(("start", name, time.perf_counter()))
            gen = torch.Generator().manual_seed(j)
            out = torch.randn(64, 64, generator=gen)
            for p in sorted(preds[name]):
                out = torch.tanh(out @ args[p]) + args["x"]
            time.sleep(0.001 * rng.random())
            with lock:
                log.append(("end", name, time.perf_counter()))
            return out

        width = 2 if j % 5 == 4 else 1
        tasks.append(Task(name, "mix", width=width, fn=fn))
        table[name] = {"cpu": rng.choice([1.0, 2.0, 4.0])}
    return TaskGraph(tasks, edges), table, log


@pytest.mark.parametrize("seed", range(4))
def test_executor_equals_sequential_and_respects_dependencies(seed: int) -> None:
    graph, table, log = tensor_graph(seed)
    x = torch.full((64, 64), 0.01)
    expected = run_sequential(graph, {"x": x})
    sched = schedule(graph, PROCS, table_cost(table), budget=2000)
    with Executor(graph, sched) as ex:
        for _ in range(3):  # the same workers serve several runs
            log.clear()
            got = ex.run({"x": x})
            assert set(got) == set(expected)
            for name in expected:
                assert torch.equal(got[name], expected[name]), name
            start = {n: t for kind, n, t in log if kind == "start"}
            end = {n: t for kind, n, t in log if kind == "end"}
            for edge in graph.edges:
                assert end[edge.src] <= start[edge.dst], f"{edge.src} -> {edge.dst}"
            assert len(ex.last_order) == len(graph)


def test_each_processor_runs_its_tasks_in_schedule_order() -> None:
    graph, table, log = tensor_graph(11, n=10)
    sched = heft(graph, PROCS, table_cost(table))
    with Executor(graph, sched) as ex:
        ex.run({"x": torch.zeros(64, 64)})
    start = {n: t for kind, n, t in log if kind == "start"}
    end = {n: t for kind, n, t in log if kind == "end"}
    for proc, names in sched.per_processor().items():
        for a, b in itertools.pairwise(names):
            assert end[a] <= start[b], f"{proc}: {a} before {b}"


def test_a_failing_task_fails_the_run_and_its_dependents_do_not_run() -> None:
    ran: list[str] = []

    def ok(name: str):
        return lambda args: ran.append(name) or name

    def boom(args: Mapping[str, Any]) -> None:
        raise ArithmeticError("bad op")

    graph = TaskGraph(
        [
            Task("a", "a", fn=ok("a")),
            Task("b", "b", fn=boom),
            Task("c", "c", fn=ok("c")),
            Task("d", "d", fn=ok("d")),
        ],
        [Edge("a", "b"), Edge("b", "c"), Edge("a", "d")],
    )
    sched = schedule(graph, PROCS[:2], table_cost({n: {"cpu": 1.0} for n in "abcd"}))
    with Executor(graph, sched) as ex:
        with pytest.raises(TaskFailedError, match="'b' failed") as info:
            ex.run()
        assert isinstance(info.value.__cause__, ArithmeticError)
        assert "c" not in ran and "a" in ran and "d" in ran
        ran.clear()
        with pytest.raises(TaskFailedError):  # the executor stays usable
            ex.run()


def test_tasks_without_callables_are_refused() -> None:
    graph = TaskGraph([Task("a", "a")])
    sched = schedule(graph, PROCS, table_cost({"a": {"cpu": 1.0}}))
    with pytest.raises(ValueError, match="without a callable"):
        Executor(graph, sched)
