"""Plan choice from measured costs: cached, deterministic, explained; overrides checked."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedenc.cli import app
from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.registry import build_encoder
from fedenc.planner.cost import CostCache, cost_key
from fedenc.planner.plan import Planner
from fedenc.planner.spec import PlanError, PlanSpec, enumerate_candidates, parallel_widths
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer


@pytest.fixture(scope="module")
def examples() -> Examples:
    return Examples.from_sessions(generate(SyntheticConfig(num_sessions=400, num_items=200)).train)


def adam(params):
    return torch.optim.Adam(params, lr=1e-3)


def planner(examples: Examples, cache: Path, **kw) -> Planner:
    torch.manual_seed(0)
    model = build_encoder("srgnn", examples.num_items, hidden=8)
    return Planner(model, adam, examples, 16, device="cpu", cache_dir=cache, repeats=1, **kw)


def test_plans_are_deterministic_for_the_same_measurements(
    examples: Examples, tmp_path: Path
) -> None:
    first = planner(examples, tmp_path, cores=2)
    before = copy.deepcopy(first.model.state_dict())
    a = first.choose("auto")
    assert a.profiled  # nothing cached yet: every candidate was profiled ...
    for name, tensor in first.model.state_dict().items():  # ... on a copy of the model
        assert torch.equal(tensor, before[name]), name
    cache_file = CostCache(tmp_path).path
    assert cache_file.is_file() and "samples" in cache_file.read_text()
    b = planner(examples, tmp_path, cores=2).choose("auto")  # same measurements, from the cache
    assert not b.profiled
    assert a.name == b.name and a.predicted == b.predicted
    if a.schedule is not None:
        assert b.schedule is not None
        assert a.schedule.per_processor() == b.schedule.per_processor()
    expected = {s.name for s in enumerate_candidates(2, examples.num_items, 16, cuda=False)}
    assert set(a.predicted) == expected
    text = "\n".join(a.explain())
    assert a.name in text and "ms/step predicted" in text and "default loop" in text
    assert f"profiled at load average {a.load}" in text and a.load
    skewed = copy.copy(a)  # a default loop 50x slower than the best: costs from a busy machine
    skewed.predicted = {**a.predicted, a.baseline: 50 * min(a.predicted.values())}
    assert "predicted 50x slower than the best" in "\n".join(skewed.explain())


def test_the_cheapest_candidate_wins_under_edited_costs(examples: Examples, tmp_path: Path) -> None:
    p = planner(examples, tmp_path, cores=2)
    p.choose("auto")
    # Make every operator that one candidate does not use 10x dearer: it must be chosen.
    target = PlanSpec.parse("cpu-t1-c1024-s2")
    used = {cost_key(t, "cpu") for t in p._program(target, p.model, None).graph.tasks.values()}
    data = json.loads(p.cache.path.read_text())
    samples = next(iter(data["workloads"].values()))["samples"]
    for key in samples:
        if key not in used:
            samples[key] = [10 * x for x in samples[key]]
    p.cache.path.write_text(json.dumps(data))
    choice = planner(examples, tmp_path, cores=2).choose("auto")
    assert choice.spec == target
    assert choice.predicted[choice.name] == min(choice.predicted.values())
    assert choice.schedule is not None  # its two shards run side by side
    lanes = choice.schedule.per_processor()
    assert {"score_fwd0", "score_fwd1"} <= set(lanes["cpu0"]) ^ set(lanes["cpu1"])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cpu-t64-c4096", "threads must lie in 1..2"),
        ("cuda-c4096", "CUDA is not available"),
        ("cpu-t1-c4096-s2-dp2", "do not combine"),
        ("cpu-t1-c4096-dp2-pf", r"replicas and prefetch \(pf\) do not combine"),
        ("cpu-t2-c4096-s2", "one thread each"),
        ("cpu-t1-c4096-dp999", "replicas for batches of 16"),
    ],
)
def test_bad_overrides_are_refused(
    examples: Examples, tmp_path: Path, name: str, message: str
) -> None:
    if "cuda" in name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = planner(examples, tmp_path, cores=2)
    with pytest.raises(PlanError, match=message):
        p.choose(name)
    assert not p.profiled


def test_bad_plan_names_are_refused_with_the_grammar() -> None:
    for bad in ("fast", "cpu-t2-q7", "cpu-c1-c2"):
        with pytest.raises(PlanError, match="bad plan name"):
            PlanSpec.parse(bad)
    with pytest.raises(ValueError, match="bad plan name"):
        TrainConfig(plan="turbo")
    assert PlanSpec.parse("cpu-t1-c2048-dp2").name == "cpu-t1-c2048-dp2"


def test_trainer_refuses_an_override_before_training(examples: Examples) -> None:
    model = build_encoder("srgnn", examples.num_items, hidden=8)
    with pytest.raises(PlanError, match=r"CUDA|threads"):
        Trainer(
            model,
            TrainConfig(
                plan="cuda-c1024" if not torch.cuda.is_available() else "cpu-t99-c1", device="auto"
            ),
        )


def test_trainer_trains_by_a_named_plan_like_the_plain_loop(
    examples: Examples, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FEDENC_PLANNER_CACHE", str(tmp_path))
    torch.manual_seed(0)
    base = build_encoder("srgnn", examples.num_items, hidden=8)
    other = copy.deepcopy(base)
    cfg = {"epochs": 1, "batch_size": 16, "max_examples_per_epoch": 96, "seed": 3}
    plain = Trainer(base, TrainConfig(**cfg))
    planned = Trainer(other, TrainConfig(**cfg, plan="cpu-t1-c64-s2"))
    lines: list[str] = []
    try:
        planned.prepare_plan(examples, lines.append)
        a = plain.train_epoch(examples)
        b = planned.train_epoch(examples)
    finally:
        planned.close()
    assert any(line.startswith("plan: cpu-t1-c64-s2 (requested)") for line in lines)
    assert a["pairs"] == b["pairs"] == 96
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for pa, pb in zip(base.parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-3, atol=1e-5)


def test_cli_refuses_a_bad_plan_clearly() -> None:
    result = CliRunner().invoke(
        app, ["train", "--synthetic-sessions", "200", "--epochs", "1", "--plan", "cpu-t1-c64-s999"]
    )
    assert result.exit_code == 2
    assert "refused" in result.output or "refused" in str(result.stderr_bytes or b"")


def test_shard_bounds_cover_the_catalog_once() -> None:
    # shard bounds cover every item exactly once
    from fedenc.planner.step import shard_bounds

    for n, k in ((10, 3), (43097, 2), (5, 5)):
        bounds = shard_bounds(n, k)
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a < b for a, b in bounds)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))
    assert np.sum([b - a for a, b in shard_bounds(43097, 2)]) == 43097


@pytest.mark.parametrize(
    ("cores", "widths"),
    [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (6, [1, 2, 4, 6]), (16, [1, 2, 4, 8, 16])],
)
def test_thread_and_lane_counts_follow_a_power_of_two_ladder(cores: int, widths: list[int]) -> None:
    assert parallel_widths(cores) == widths
    specs = enumerate_candidates(cores, 43097, 100, cuda=False)
    assert {s.threads for s in specs} == set(widths)
    assert {s.shards for s in specs} | {s.replicas for s in specs} <= set(widths)
    assert len(specs) == len({s.name for s in specs})  # no duplicates


def test_planned_steps_refuse_a_model_on_another_device(examples: Examples, tmp_path: Path) -> None:
    from fedenc.planner.plan import PlanChoice, PlannedSteps

    p = planner(examples, tmp_path, cores=2)
    spec = PlanSpec.parse("cpu-t1-c1024")
    p.profile([spec])
    _, sched, graph = p.predict(spec)
    choice = PlanChoice("cpu-t1-c1024", spec, schedule=sched, graph=graph)
    elsewhere = copy.deepcopy(p.model).to("meta")
    with pytest.raises(PlanError, match="runs on cpu but the model's parameters are on meta"):
        PlannedSteps(elsewhere, adam(list(elsewhere.parameters())), choice, p.workload)
