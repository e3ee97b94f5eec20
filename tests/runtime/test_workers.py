"""The worker-process pool of the in-process runtime: the children's state stays in their worker
across rounds, two pool runs give bit-identical targets, a pool run matches the single-process
run, a dead worker turns into error replies for its children only, and bad references fail early."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_job import TINY_JOB

from fedenc.runtime import flower_compat as fc
from fedenc.runtime.inprocess import InProcessGrid, new_run_id, run_inprocess
from fedenc.runtime.workers import WorkerPool

TINY = {**TINY_JOB, "seed": 5}
CHILD = "nodes.child:app"


def _target(run: Any) -> dict[str, torch.Tensor]:
    from nodes.master import TARGET_KEY

    record = run.server_context.state[TARGET_KEY]
    return {name: torch.from_numpy(record[name].numpy()) for name in record}


def _rounds(run: Any) -> list[dict[str, Any]]:
    from nodes.master import RESULT_KEY

    return list(json.loads(run.server_context.state[RESULT_KEY]["json"])["rounds"])


def test_pool_runs_are_bit_identical_and_match_the_single_process_run() -> None:
    from nodes.master import app as master_app

    first = run_inprocess(master_app, CHILD, 3, TINY, workers=2, threads=1)
    second = run_inprocess(master_app, CHILD, 3, TINY, workers=2, threads=1)
    a, b = _target(first), _target(second)
    assert list(a) == list(b) and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # Every child kept its state in its worker: one query, two trains, two evaluations, finish.
    assert sorted(first.messages_handled.values()) == [6, 6, 6]
    from nodes.child import app as child_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count
    try:
        local = run_inprocess(master_app, child_app, 3, TINY)
    finally:
        torch.set_num_threads(threads)
    c = _target(local)
    for name in a:
        torch.testing.assert_close(a[name], c[name], rtol=1e-5, atol=1e-6)
    assert [r["participants"] for r in _rounds(first)] == [
        r["participants"] for r in _rounds(local)
    ]


def test_a_dead_worker_is_started_again_and_the_run_goes_on_bit_for_bit(tmp_path: Path) -> None:
    import multiprocessing

    from fedenc.runtime.simulate import Scenario, run_scenario
    from fedenc.training.checkpoint import load_checkpoint

    scenario = Scenario(
        children=4, workers=2, threads=1, rounds=3, hidden=8, synthetic_sessions=400,
        synthetic_items=60, batch_size=50, seed=5,
    )  # fmt: skip

    def kill_worker_1_after_round_1(result: Any) -> None:
        if result.round == 1:
            (victim,) = [
                p for p in multiprocessing.active_children() if p.name == "fedenc-worker-1"
            ]
            victim.kill()
            victim.join(10)

    killed = run_scenario(scenario, tmp_path / "killed", on_round=kill_worker_1_after_round_1)
    whole = run_scenario(scenario, tmp_path / "whole")
    assert [len(r["participants"]) for r in killed.result["rounds"]] == [4, 4, 4]
    a, _ = load_checkpoint(killed.files["checkpoint"])
    b, _ = load_checkpoint(whole.files["checkpoint"])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_worker_that_dies_past_the_restarts_leaves_only_its_children_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedenc.federation.master import MasterConfig, run_master
    from fedenc.runtime import workers
    from fedenc.training.config import TrainConfig

    monkeypatch.setattr(workers, "MAX_RESTARTS", 0)

    configs = [{"partition-id": i, "num-partitions": 4, **TINY} for i in range(4)]
    rid = new_run_id()
    with InProcessGrid(CHILD, configs, rid, TINY, workers=2, threads=1) as grid:
        assert grid.pool is not None
        victim = grid.pool.processes()[1]
        doomed = sorted(n for n in grid.nodes if grid.pool.worker_of(n) == 1)

        def kill_after_round_one(result: Any) -> None:
            if result.round == 1:
                victim.kill()
                victim.join(10)

        config = MasterConfig(
            num_items=60,
            encoder_options={"hidden": 8},
            train=TrainConfig(epochs=1, batch_size=50),
            rounds=2,
            final_test=False,
            seed=5,
        )
        with fc.task_identity(rid):
            result = run_master(grid, config, on_round=kill_after_round_one)
    first, second = result.rounds
    assert len(first.participants) == 4
    assert len(second.participants) == 2
    assert len(second.excluded) == len(doomed) == 2
    assert all("worker process 1 is gone" in reason for reason in second.excluded.values())


def test_the_app_must_be_given_by_reference_and_importable() -> None:
    from nodes.child import app as child_app

    configs = [{"partition-id": 0, "num-partitions": 1}]
    with pytest.raises(ValueError, match="by reference"):
        InProcessGrid(child_app, configs, new_run_id(), workers=1)
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        InProcessGrid("no_such_module:app", configs, new_run_id(), workers=1)
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        InProcessGrid("nodes.child:nope", configs, new_run_id(), workers=1)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        WorkerPool(CHILD, {2: {}}, new_run_id(), {}, workers=0)
