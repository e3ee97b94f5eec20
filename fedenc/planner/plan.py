"""Choosing the plan: profile the candidates' operators (or read them from the machine's cache),
schedule each candidate's operator graph on this machine's processors, predict its step time
(the makespan), and pick the lowest; then run training steps by that schedule.

The choice is deterministic for the same measurements: candidates are enumerated in a fixed order,
schedules break ties by task order and processor name, and the cheapest plan wins with ties going
to the earlier candidate. The plain trainer loop (``default``) stays unless a candidate is predicted
at least ``MIN_GAIN`` faster than the candidate that mirrors it, so measurement noise alone does
not move a trainer off its well-trodden path.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedenc.data.batching import build_batch
from fedenc.data.sessions import Examples
from fedenc.encoders.base import SessionEncoder
from fedenc.planner.cost import CostCache, CostModel, cost_key, load_average, measure_bandwidth
from fedenc.planner.executor import Executor, TaskFailedError
from fedenc.planner.graph import Task, TaskGraph
from fedenc.planner.scheduler import Processor, Schedule, schedule
from fedenc.planner.spec import (
    DEFAULT_CHUNK,
    PlanError,
    PlanSpec,
    cuda_available,
    enumerate_candidates,
    machine_cores,
)
from fedenc.planner.step import StepProgram, Workload, workload_of

MIN_GAIN = 0.03  # predicted gain needed to leave the plain loop
OptimizerFactory = Callable[[Sequence[torch.nn.Parameter]], torch.optim.Optimizer]
Log = Callable[[str], None]


def processors(spec: PlanSpec, cores: int) -> list[Processor]:
    procs = [Processor(f"cpu{i}", "cpu", "host") for i in range(cores)]
    if spec.device == "cuda":
        procs.append(Processor("gpu0", "cuda", "cuda:0"))
    return procs


def default_equivalent(threads: int) -> PlanSpec:
    """The candidate that runs what the plain trainer loop runs."""
    return PlanSpec(threads=threads, chunk=DEFAULT_CHUNK)


#: A default loop predicted this many times slower than the best plan means skewed costs.
SKEWED = 10.0


@dataclass
class PlanChoice:
    """The outcome: the plan (None = the plain loop) and everything that explains it."""

    requested: str
    spec: PlanSpec | None
    predicted: dict[str, float] = field(default_factory=dict)  # candidate -> seconds per step
    methods: dict[str, str] = field(default_factory=dict)  # candidate -> schedule search
    schedule: Schedule | None = None
    graph: TaskGraph | None = None
    baseline: str = ""  # the candidate that mirrors the plain loop
    profiled: list[str] = field(default_factory=list)  # candidates profiled in this call
    cache: Path | None = None
    reason: str = ""
    load: str = ""  # the load average the costs were profiled under

    @property
    def name(self) -> str:
        return "default" if self.spec is None else self.spec.name

    def explain(self, top: int = 5) -> list[str]:
        lines = [f"plan: {self.name} ({self.reason})"]
        if self.predicted:
            ranked = sorted(self.predicted.items(), key=lambda kv: kv[1])
            base = self.predicted.get(self.baseline)
            shown = ranked[:top]
            if self.baseline and self.baseline not in dict(shown):
                shown.append((self.baseline, self.predicted[self.baseline]))
            for name, seconds in shown:
                rel = f" ({seconds / base - 1:+.1%} vs default)" if base else ""
                tag = " <- default loop" if name == self.baseline else ""
                lines.append(f"  {name:22s} {1000 * seconds:8.2f} ms/step predicted{rel}{tag}")
            lines.append(f"  {len(self.predicted)} candidates; ")
            source = (
                f"profiled {len(self.profiled)} now" if self.profiled else "all costs from cache"
            )
            lines[-1] += f"{source} ({self.cache})"
            if self.load:
                lines[-1] += f", profiled at load average {self.load}"
            best = ranked[0][1]
            if base and best and base > SKEWED * best:
                lines.append(
                    f"  the default loop is predicted {base / best:.0f}x slower than the best: "
                    "costs profiled on a busy machine skew the choice; delete the cache file "
                    "to profile again when it is quiet"
                )
        if self.schedule is not None and self.graph is not None:
            lanes = self.schedule.per_processor()
            lines.append(
                f"  schedule ({self.schedule.method}): "
                + "; ".join(f"{p}: {' '.join(ts)}" for p, ts in sorted(lanes.items()))
            )
        return lines


class Planner:
    """Plans the training step of ``model`` with batches of ``batch_size`` drawn from
    ``examples``; profiling runs on copies, so the model and its optimizer are untouched."""

    def __init__(
        self,
        model: SessionEncoder,
        optimizer_factory: OptimizerFactory,
        examples: Examples,
        batch_size: int,
        device: str = "auto",
        cache_dir: str | Path | None = None,
        repeats: int = 5,
        seed: int = 0,
        cores: int | None = None,
    ) -> None:
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise PlanError(f"unknown device {device!r} for planning")
        self.model = model
        self.optimizer_factory = optimizer_factory
        self.examples = examples
        self.batch_size = batch_size
        self.cores = cores or machine_cores()
        self.cuda = cuda_available() and device != "cpu"
        self.device_policy = device
        self.repeats = repeats
        self.rng = np.random.default_rng(seed)
        self.cache = CostCache(cache_dir)
        sample = build_batch(examples, self._index(), torch.device("cpu"))
        self.workload: Workload = workload_of(model, sample, batch_size)
        self.costs = self.cache.load(self.workload.key()) or CostModel()
        self.profiled: list[str] = []

    def _index(self) -> np.ndarray:
        n = len(self.examples)
        return self.rng.integers(0, n, size=min(self.batch_size, n))

    # -- candidates --------------------------------------------------------------------------
    def candidates(self) -> list[PlanSpec]:
        specs = enumerate_candidates(
            self.cores, self.workload.num_items, self.batch_size, self.cuda
        )
        if self.device_policy.startswith("cuda"):
            specs = [s for s in specs if s.device == "cuda"]
        elif self.device_policy == "cpu":
            specs = [s for s in specs if s.device == "cpu"]
        return specs

    def parse(self, name: str) -> PlanSpec:
        """A named plan checked against this machine and workload (:class:`PlanError` if not)."""
        spec = PlanSpec.parse(name)
        spec.check(self.cores, self.workload.num_items, self.batch_size, cuda_available())
        if self.device_policy == "cpu" and spec.device == "cuda":
            raise PlanError(f"plan {name!r} refused: it runs on the GPU and the device is cpu")
        return spec

    def _device(self, spec: PlanSpec) -> torch.device:
        return torch.device("cuda") if spec.device == "cuda" else torch.device("cpu")

    def _program(self, spec: PlanSpec, model: SessionEncoder, optimizer: Any) -> StepProgram:
        return StepProgram(model, optimizer, spec, self.workload, self._device(spec))

    # -- profiling ---------------------------------------------------------------------------
    def _missing(self, spec: PlanSpec) -> bool:
        graph = self._program(spec, self.model, None).graph
        return any(
            not self.costs.has(t, t.kinds[0])
            for t in graph.tasks.values()
            if not t.op.startswith("ps_exchange")
        )

    def profile(self, specs: Sequence[PlanSpec], log: Log | None = None) -> None:
        """Run each spec's step a few times on a copy of the model, timing every task.

        Candidates take turns step by step (round robin), so a burst of load from other
        processes hits all of them alike instead of skewing one; the first turn is a warm-up.
        """
        todo = [s for s in specs if self._missing(s)]
        if not todo:
            return
        if log:
            log(f"planner: profiling {len(todo)} candidate(s) on this machine (cached after)")
        copies: dict[str, tuple[SessionEncoder, torch.optim.Optimizer]] = {}
        runs: list[Any] = []
        try:
            for spec in todo:
                device = self._device(spec)
                if device.type not in copies:
                    model = copy.deepcopy(self.model).to(device)
                    copies[device.type] = (model, self.optimizer_factory(list(model.parameters())))
                model, optimizer = copies[device.type]
                program = self._program(spec, model, optimizer)
                timings: dict[str, list[float]] = {}
                graph = _timed(program.graph, timings, device)
                sched = schedule(graph, processors(spec, self.cores), lambda t, k: 1.0, budget=5000)
                runs.append((spec, device, graph, timings, Executor(graph, sched), [None]))
            for rep in range(self.repeats + 1):
                for spec, device, _, timings, executor, held in runs:
                    # Two steps per turn, the first untimed: in training a plan runs step after
                    # step, so its step is timed right after one of its own (warm caches), not
                    # after another candidate's.
                    for timed in (False, True):
                        marks = {k: len(v) for k, v in timings.items()}
                        inputs: dict[str, Any] = {
                            "examples": self.examples,
                            "index": self._index(),
                        }
                        if spec.prefetch:
                            if held[0] is None:
                                held[0] = build_batch(self.examples, inputs["index"], device)
                            inputs.update(batch=held[0], next_index=self._index())
                        out = executor.run(inputs)
                        if not timed or rep == 0:  # rep 0: allocator, caches, lazy init
                            for k, v in timings.items():
                                del v[marks.get(k, 0) :]
                        if spec.prefetch:
                            held[0] = out["batch_next"]
        finally:
            for run in runs:
                run[4].close()
        for spec, _, graph, timings, _, _ in runs:
            for name, xs in timings.items():
                task = graph.tasks[name]
                for x in xs:
                    self.costs.add(cost_key(task, task.kinds[0]), x)
            self.profiled.append(spec.name)
        if self.cuda and "host->cuda:0" not in self.costs.bandwidth:
            self.costs.bandwidth["host->cuda:0"] = measure_bandwidth(torch.device("cuda"))
        self.costs.profiled_at = time.time()
        self.costs.load = load_average()
        self.cache.save(self.workload.key(), self.costs)

    # -- prediction and choice ---------------------------------------------------------------
    def predict(self, spec: PlanSpec) -> tuple[float, Schedule, TaskGraph]:
        graph = self._program(spec, self.model, None).graph
        costs = self.costs

        def cost(task: str, kind: str) -> float:
            return costs.cost(graph.tasks[task], kind)

        sched = schedule(graph, processors(spec, self.cores), cost, costs.transfer)
        return sched.makespan, sched, graph

    def choose(self, request: str = "auto", log: Log | None = None) -> PlanChoice:
        """``default``: the plain loop; ``auto``: the cheapest candidate; a name: that plan."""
        request = request.strip().lower()
        base = default_equivalent(min(torch.get_num_threads(), self.cores))
        if request == "default":
            return PlanChoice(request, None, reason="requested")
        if request != "auto":
            spec = self.parse(request)
            self.profile([spec, base], log)
            _, sched, graph = self.predict(spec)
            return PlanChoice(
                request,
                spec,
                predicted={s.name: self.predict(s)[0] for s in (spec, base)},
                schedule=sched,
                graph=graph,
                baseline=base.name,
                profiled=list(self.profiled),
                cache=self.cache.path,
                load=self.costs.load,
                reason="requested",
            )
        specs = self.candidates()
        if base not in specs and base.device == "cpu":
            specs.append(base)
        self.profile(specs, log)
        predicted: dict[str, float] = {}
        methods: dict[str, str] = {}
        best: tuple[float, int] | None = None
        best_spec = base
        for i, spec in enumerate(specs):
            seconds, sched, _ = self.predict(spec)
            predicted[spec.name] = seconds
            methods[spec.name] = sched.method
            if best is None or (seconds, i) < best:
                best, best_spec = (seconds, i), spec
        base_time = predicted.get(base.name)
        assert best is not None
        if base_time is not None and best[0] > base_time * (1 - MIN_GAIN):
            return PlanChoice(
                request,
                None,
                predicted=predicted,
                methods=methods,
                baseline=base.name,
                profiled=list(self.profiled),
                cache=self.cache.path,
                load=self.costs.load,
                reason=(
                    f"no candidate is predicted {MIN_GAIN:.0%} faster than the plain loop "
                    f"({base.name}, {1000 * base_time:.2f} ms/step)"
                ),
            )
        _, sched, graph = self.predict(best_spec)
        gain = "" if base_time is None else f", {1 - best[0] / base_time:.1%} under the default"
        return PlanChoice(
            request,
            best_spec,
            predicted=predicted,
            methods=methods,
            schedule=sched,
            graph=graph,
            baseline=base.name,
            profiled=list(self.profiled),
            cache=self.cache.path,
            load=self.costs.load,
            reason=f"lowest predicted step time, {1000 * best[0]:.2f} ms{gain}",
        )


def _timed(graph: TaskGraph, timings: dict[str, list[float]], device: torch.device) -> TaskGraph:
    """The same graph whose callables record their wall time (GPU work synchronised)."""
    sync = device.type == "cuda"
    tasks = []
    for name in graph.order:
        task = graph.tasks[name]
        fn = task.fn
        assert fn is not None

        def timed(args: Any, fn: Any = fn, name: str = name) -> Any:
            t0 = time.perf_counter()
            out = fn(args)
            if sync:
                torch.cuda.synchronize(device)
            timings.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        tasks.append(Task(task.name, task.op, task.width, task.kinds, timed))
    return TaskGraph(tasks, graph.edges)


class PlannedSteps:
    """Training steps of ``model`` run by ``choice``'s schedule (one executor, reused)."""

    def __init__(
        self,
        model: SessionEncoder,
        optimizer: torch.optim.Optimizer,
        choice: PlanChoice,
        workload: Workload,
        cores: int | None = None,
    ) -> None:
        if choice.spec is None:
            raise PlanError("the default plan runs the trainer's plain loop, not planned steps")
        self.spec = choice.spec
        self.device = torch.device("cuda") if self.spec.device == "cuda" else torch.device("cpu")
        where = {p.device.type for p in model.parameters()}
        if where != {self.device.type}:
            raise PlanError(
                f"plan {self.spec.name!r} runs on {self.device.type} but the model's parameters "
                f"are on {', '.join(sorted(where))}: move the model first"
            )
        self.program = StepProgram(model, optimizer, self.spec, workload, self.device)
        sched = choice.schedule
        if sched is None or choice.graph is None:
            raise PlanError("a plan needs its schedule")
        # The choice's schedule was made on a structurally identical graph (same task names).
        if sorted(choice.graph.tasks) != sorted(self.program.graph.tasks):
            raise PlanError("schedule and step graph disagree")
        self.executor = Executor(self.program.graph, sched)

    def run(self, examples: Examples, batches: Iterator[np.ndarray]) -> Iterator[tuple[int, float]]:
        """Train on each index batch; yields ``(batch size, loss)`` per step."""
        loss_task = self.program.loss_task
        if not self.spec.prefetch:
            for index in batches:
                out = self._run({"examples": examples, "index": index})
                yield int(index.size), float(out[loss_task]["value"])
            return
        current = next(batches, None)
        if current is None:
            return
        batch = build_batch(examples, current, self.device)
        while current is not None:
            upcoming = next(batches, None)
            out = self._run(
                {"examples": examples, "index": current, "batch": batch, "next_index": upcoming}
            )
            yield int(current.size), float(out[loss_task]["value"])
            current, batch = upcoming, out["batch_next"]

    def _run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.executor.run(inputs)
        except TaskFailedError as err:
            # A diverged loss reads as in the plain loop (checked before the optimizer step).
            if isinstance(err.__cause__, FloatingPointError):
                raise err.__cause__ from None
            raise

    def close(self) -> None:
        self.executor.close()
