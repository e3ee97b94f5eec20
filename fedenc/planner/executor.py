"""Runs an operator graph by its schedule: one worker thread per processor, each running its tasks
in the scheduled order, each task waiting for its inputs.

A task placed on several processors (width > 1) runs on the first of them with ``width`` torch
intra-op threads while the others hold back until it is done, so the cores the schedule gave it
are really free for it. Worker threads live as long as the executor, so a training step pays for a
few event hand-offs (tens of microseconds), not for thread creation.

The first processor's lane runs in the thread that calls :meth:`run`, not in a worker. That is
where the wide tasks lead, so their OpenMP team is the caller's own: a worker thread running a
multi-threaded torch op starts a second team, and once a process holds more OpenMP threads than
cores libgomp stops spin-waiting at barriers in every team, which made every wide op slower (and
the wide plans' profiles, taken with many executors alive, about 1.5x too slow).

The outputs are those of sequential execution: every task sees exactly its predecessors' outputs,
whatever the interleaving. A failing task fails the tasks that depend on it and :meth:`run`
re-raises its error after every worker has stopped for this run.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedenc.planner.graph import TaskGraph
from fedenc.planner.scheduler import Schedule, ScheduleError


class TaskFailedError(RuntimeError):
    """A task raised; ``__cause__`` holds its exception."""


@dataclass
class _Run:
    inputs: Mapping[str, Any]
    results: dict[str, Any] = field(default_factory=dict)
    done: dict[str, threading.Event] = field(default_factory=dict)
    arrived: dict[tuple[str, str], threading.Event] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)  # completion order (tests, tracing)
    lock: threading.Lock = field(default_factory=threading.Lock)
    workers_left: int = 0
    all_done: threading.Event = field(default_factory=threading.Event)


class Executor:
    """Executes ``graph`` as ``schedule`` says; every task must carry a callable (``Task.fn``)."""

    def __init__(self, graph: TaskGraph, schedule: Schedule, set_threads: bool = True) -> None:
        missing = [n for n in graph.order if graph.tasks[n].fn is None]
        if missing:
            raise ScheduleError(f"tasks without a callable cannot be executed: {missing}")
        placed = schedule.by_task()
        if sorted(placed) != sorted(graph.order):
            raise ScheduleError("the schedule must place every task of the graph exactly once")
        self.graph = graph
        self.schedule = schedule
        self.set_threads = set_threads
        # Each processor's list, in the order the schedule runs them; the lead processor of a
        # task runs it, the others only wait for it.
        self.schedule_procs = {n: p.procs for n, p in placed.items()}
        self.lanes: dict[str, list[tuple[str, bool]]] = {}
        for proc, names in schedule.per_processor().items():
            self.lanes[proc] = [(n, placed[n].procs[0] == proc) for n in names]
        self._check_lane_order()
        self._queues: list[queue.SimpleQueue[_Run | None]] = []
        self._threads: list[threading.Thread] = []
        self._inline = next(iter(self.lanes))  # the caller's lane (see the module docstring)
        for proc, lane in self.lanes.items():
            if proc == self._inline:
                continue
            q: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
            thread = threading.Thread(
                target=self._worker, args=(proc, lane, q), name=f"planner-{proc}", daemon=True
            )
            self._queues.append(q)
            self._threads.append(thread)
            thread.start()
        self._closed = False

    def _check_lane_order(self) -> None:
        """A lane running a task before one of its ancestors on the same lane would deadlock."""
        ancestors: dict[str, set[str]] = {}
        for name in self.graph.order:
            acc: set[str] = set()
            for pred in self.graph.predecessors(name):
                acc |= {pred} | ancestors[pred]
            ancestors[name] = acc
        for proc, lane in self.lanes.items():
            seen: set[str] = set()
            for name, _ in lane:
                later = ancestors[name] & {n for n, _ in lane} - seen
                if later:
                    raise ScheduleError(
                        f"processor {proc} runs {name!r} before its input(s) {sorted(later)}"
                    )
                seen.add(name)

    def _worker(
        self, proc: str, lane: Sequence[tuple[str, bool]], q: queue.SimpleQueue[_Run | None]
    ) -> None:
        while True:
            run = q.get()
            if run is None:
                return
            self._run_lane(proc, lane, run)

    def _run_lane(self, proc: str, lane: Sequence[tuple[str, bool]], run: _Run) -> None:
        """Run this processor's share of ``run`` in the calling thread."""
        for name, lead in lane:
            if not lead:
                run.arrived[(name, proc)].set()  # this core is free for the task now
                run.done[name].wait()
                continue
            task = self.graph.tasks[name]
            for other in self.schedule_procs[name][1:]:
                run.arrived[(name, other)].wait()
            args: dict[str, Any] = dict(run.inputs)
            failed = None
            for pred in self.graph.predecessors(name):
                run.done[pred].wait()
                if pred in run.errors:
                    failed = run.errors[pred]
                else:
                    args[pred] = run.results[pred]
            if failed is None:
                # torch's intra-op setting is per thread (OpenMP): read, not tracked.
                if (
                    self.set_threads
                    and "cpu" in task.kinds
                    and torch.get_num_threads() != task.width
                ):
                    torch.set_num_threads(task.width)  # this thread's intra-op pool
                try:
                    assert task.fn is not None
                    run.results[name] = task.fn(args)
                except BaseException as err:  # reported by run(), not lost in a thread
                    failed = err
            with run.lock:
                if failed is not None:
                    run.errors[name] = failed
                run.finished.append(name)
            run.done[name].set()
        with run.lock:
            run.workers_left -= 1
            last = run.workers_left == 0
        if last:
            run.all_done.set()

    def run(self, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run every task once; returns each task's output by name. ``inputs`` are visible to
        every task next to its predecessors' outputs (names must not clash with task names)."""
        if self._closed:
            raise RuntimeError("executor is closed")
        given = dict(inputs or {})
        clash = sorted(set(given) & set(self.graph.tasks))
        if clash:
            raise ValueError(f"inputs shadow task names {clash}")
        run = _Run(inputs=given, workers_left=len(self.lanes))
        run.done = {name: threading.Event() for name in self.graph.order}
        run.arrived = {
            (name, proc): threading.Event()
            for name, procs in self.schedule_procs.items()
            for proc in procs[1:]
        }
        for q in self._queues:
            q.put(run)
        before = torch.get_num_threads()
        try:
            self._run_lane(self._inline, self.lanes[self._inline], run)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)  # the caller's setting, as it was
        run.all_done.wait()
        self.last_order = list(run.finished)
        if run.errors:
            first = next(n for n in run.finished if n in run.errors)
            raise TaskFailedError(f"task {first!r} failed: {run.errors[first]!r}") from (
                run.errors[first]
            )
        return run.results

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q in self._queues:
            q.put(None)
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_sequential(graph: TaskGraph, inputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The reference: every task in topological order in the calling thread."""
    results: dict[str, Any] = {}
    for name in graph.order:
        fn = graph.tasks[name].fn
        if fn is None:
            raise ScheduleError(f"task {name!r} has no callable")
        args = dict(inputs or {})
        args.update({p: results[p] for p in graph.predecessors(name)})
        results[name] = fn(args)
    return results
