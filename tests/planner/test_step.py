"""Planned training steps give the plain trainer step's loss and update, on every candidate."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedenc.data.batching import build_batch
from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.registry import build_encoder
from fedenc.planner.executor import Executor, run_sequential
from fedenc.planner.scheduler import Processor, schedule
from fedenc.planner.spec import PlanSpec
from fedenc.planner.step import StepProgram, workload_of

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def examples() -> Examples:
    splits = generate(SyntheticConfig(num_sessions=600, num_items=300, seed=1))
    return Examples.from_sessions(splits.train)


def plain_step(model, examples, index, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)
    loss = model.loss(build_batch(examples, index, CPU))
    loss.backward()
    opt.step()
    return float(loss.detach())


def uniform_cost(task: str, kind: str) -> float:
    return 1.0


@pytest.mark.parametrize("encoder", ["srgnn", "edge_attn"])
@pytest.mark.parametrize(
    "name",
    [
        "cpu-t1-c64",
        "cpu-t2-c4096",
        "cpu-t1-c50-s2",
        "cpu-t1-c64-s3",
        "cpu-t1-c128-dp2",
        "cpu-t1-c64-pf",
    ],
)
@pytest.mark.parametrize("pairs", [32, 1])  # 1: an epoch's last batch, fewer pairs than replicas
def test_planned_step_equals_the_plain_step(
    examples: Examples, encoder: str, name: str, pairs: int
) -> None:
    torch.manual_seed(0)
    reference = build_encoder(encoder, examples.num_items, hidden=16)
    reference.reset_parameters()
    planned = copy.deepcopy(reference)
    index = np.arange(40, 40 + pairs)
    expected_loss = plain_step(reference, examples, index)

    spec = PlanSpec.parse(name)
    opt = torch.optim.SGD(planned.parameters(), lr=0.1)
    sample = build_batch(examples, index, CPU)
    program = StepProgram(planned, opt, spec, workload_of(planned, sample, 32), CPU)
    inputs = {"examples": examples, "index": index}
    if spec.prefetch:
        inputs.update(batch=sample, next_index=np.arange(8))
    procs = [Processor(f"c{i}") for i in range(3)]
    sched = schedule(program.graph, procs, uniform_cost)
    with Executor(program.graph, sched) as ex:
        out = ex.run(inputs)
    assert out[program.loss_task]["value"] == pytest.approx(expected_loss, rel=1e-5)
    for (n, a), b in zip(reference.named_parameters(), planned.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    if spec.prefetch:
        assert torch.equal(out["batch_next"].items, build_batch(examples, np.arange(8)).items)


def test_sequential_and_scheduled_runs_of_a_sharded_step_agree(examples: Examples) -> None:
    torch.manual_seed(0)
    a = build_encoder("srgnn", examples.num_items, hidden=16)
    b = copy.deepcopy(a)
    index = np.arange(10, 42)
    spec = PlanSpec.parse("cpu-t1-c40-s2")
    results = []
    for model, parallel in ((a, False), (b, True)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sample = build_batch(examples, index, CPU)
        program = StepProgram(model, opt, spec, workload_of(model, sample, 32), CPU)
        inputs = {"examples": examples, "index": index}
        if parallel:
            sched = schedule(program.graph, [Processor("c0"), Processor("c1")], uniform_cost)
            with Executor(program.graph, sched) as ex:
                results.append(ex.run(inputs)[program.loss_task]["value"])
        else:
            results.append(run_sequential(program.graph, inputs)[program.loss_task]["value"])
    assert results[0] == results[1]  # same shards, same order: bit for bit
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("name", ["cpu-t2-c4096", "cpu-t1-c50-s2"])
def test_the_table_gradient_is_kept_not_copied(
    examples: Examples, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scoring gradient handed to the tied lookup becomes the table's .grad as it is (no
    17 MB copy per step on Diginetica): nothing else may hold a reference to it."""
    from fedenc.encoders.layers import tied_lookup

    handed: list[int] = []
    preload = tied_lookup.TableGradTie.preload

    def spy(self: tied_lookup.TableGradTie, grad: torch.Tensor) -> None:
        handed.append(grad.data_ptr())
        preload(self, grad)

    monkeypatch.setattr(tied_lookup.TableGradTie, "preload", spy)
    model = build_encoder("srgnn", examples.num_items, hidden=16)
    kept: list[int] = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def, override]
            grad = model.embedding.weight.grad
            assert grad is not None
            kept.append(grad.data_ptr())
            return super().step(closure)

    index = np.arange(40, 72)
    sample = build_batch(examples, index, CPU)
    program = StepProgram(
        model, Spy(model.parameters(), lr=0.1), PlanSpec.parse(name),
        workload_of(model, sample, 32), CPU,
    )  # fmt: skip
    sched = schedule(program.graph, [Processor("c0"), Processor("c1")], uniform_cost)
    with Executor(program.graph, sched) as ex:
        ex.run({"examples": examples, "index": index})
    assert handed and kept == handed
