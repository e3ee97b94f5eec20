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


def test_the_first_lane_runs_in_the_callers_thread_with_its_threads_restored() -> None:
    """Wide tasks lead on the first lane, which runs in the caller's thread (its own OpenMP
    team); other lanes run width-1 tasks on one intra-op thread, so they start no team."""
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def fn(args: Mapping[str, Any]) -> str:
            seen[name] = (threading.get_ident(), torch.get_num_threads())
            return name

        return fn

    two = [Processor("cpu0", "cpu"), Processor("cpu1", "cpu")]
    graph = TaskGraph(
        [
            Task("wide", "wide", width=2, fn=record("wide")),
            Task("left", "left", fn=record("left")),
            Task("right", "right", fn=record("right")),
            Task("join", "join", fn=record("join")),
        ],
        [Edge("wide", "left"), Edge("wide", "right"), Edge("left", "join"), Edge("right", "join")],
    )
    costs = {name: {"cpu": 1.0} for name in ("wide", "left", "right", "join")}
    sched = heft(graph, two, table_cost(costs))
    caller = threading.get_ident()
    before = torch.get_num_threads()
    with Executor(graph, sched) as ex:
        ex.run()
        first = next(iter(ex.lanes))
    assert torch.get_num_threads() == before
    assert seen["wide"] == (caller, 2)
    for name in ("left", "right", "join"):
        on_first = any(n == name for n, _ in ex.lanes[first])
        assert (seen[name][0] == caller) == on_first, name
        assert seen[name][1] == 1, name
    assert any(seen[n][0] != caller for n in ("left", "right", "join"))  # a worker lane ran
