"""Cost-balanced local work: the balancer's arithmetic and a straggler scenario end to end."""

from __future__ import annotations

import pytest

from fedenc.planner.balance import WorkBalancer
from fedenc.runtime.simulate import Scenario, run_scenario


def test_equal_finish_times_and_unchanged_total_work() -> None:
    b = WorkBalancer(smoothing=1.0)
    costs = {1: 0.001, 2: 0.001, 3: 0.004}
    for node, cost in costs.items():
        b.observe(node, seconds=cost * 1000, examples=1000)
    work = b.assign({1: 300, 2: 300, 3: 300}, limit={1: 5000, 2: 5000, 3: 5000})
    assert sum(work.values()) == pytest.approx(900, abs=2)
    # the slow child gets a quarter of a fast one's work, so all finish together
    assert work[1] == work[2] == 400 and work[3] == 100
    times = [work[n] * c for n, c in costs.items()]
    assert max(times) - min(times) < 1e-9
    # a fast child with little data is capped; the other fast one takes the remainder
    capped = b.assign({1: 300, 2: 300, 3: 300}, limit={1: 300, 2: 5000, 3: 5000})
    assert capped[1] == 300 and capped[2] > 400 and sum(capped.values()) == pytest.approx(900, 2)
    # no headroom (uniform work = all data): nothing can move
    assert b.assign({1: 300, 2: 300, 3: 300}) == {1: 300, 2: 300, 3: 300}


def test_deadline_and_caps() -> None:
    b = WorkBalancer(deadline=2.0, smoothing=1.0)
    b.observe(1, 1.0, 100)  # 0.01 s per example
    b.observe(2, 1.0, 1000)  # 0.001 s per example
    assert b.assign({1: 500, 2: 500}, {1: 900, 2: 900}) == {1: 200, 2: 900}
    assert b.assign({1: 500, 3: 500}) == {}  # node 3 never measured: uniform work for all
    b.observe(4, float("nan"), 10)
    b.observe(5, 1.0, 0)
    assert 4 not in b.cost and 5 not in b.cost
    with pytest.raises(ValueError, match="deadline"):
        WorkBalancer(deadline=-1)


def test_straggler_scenario_gives_the_slow_child_less_work() -> None:
    base = Scenario(
        name="straggler",
        children=3,
        rounds=2,
        hidden=8,
        synthetic_sessions=600,
        synthetic_items=100,
        evaluate_every=0,
        concurrency=3,
        max_examples_per_epoch=120,  # headroom: fast children can take over work
        slowdown=(1.0, 1.0, 8.0),  # 4x gave 0.53 of a fast child's work on a loaded CI machine
    )
    uniform = run_scenario(base).result["rounds"]
    balanced = run_scenario(base.with_overrides(balance_work=True)).result["rounds"]
    assert all(not r["work"] for r in uniform)
    assert not balanced[0]["work"]  # round 1: nothing measured yet
    work = balanced[1]["work"]
    assert set(work) == {"child-0", "child-1", "child-2"}
    # 8x slower (the sleep dominates on this tiny model): well under half a fast child's work
    assert work["child-2"] < 0.5 * min(work["child-0"], work["child-1"])
    with pytest.raises(ValueError, match="slowdown"):
        Scenario(children=2, slowdown=(1.0, 0.5))
