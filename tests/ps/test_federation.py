"""Placement (a) end to end: a small in-process simulation whose children keep their item rows in
their own distributed PS and federate only the dense shared encoder."""

from __future__ import annotations

import pytest

from fedenc.runtime.simulate import Scenario, run_scenario

BASE = Scenario(
    name="ps-a",
    children=2,
    rounds=2,
    hidden=8,
    synthetic_sessions=600,
    synthetic_items=120,
    evaluate_every=2,
)


@pytest.mark.parametrize("scoring", ["full", "sampled"])
def test_placement_a_federates_only_the_dense_encoder(scoring: str) -> None:
    plain = run_scenario(BASE.with_overrides(share="encoder")).result  # item table local
    with_ps = run_scenario(
        BASE.with_overrides(ps="local", ps_exchange_every=200, ps_scoring=scoring, ps_capacity=500)
    ).result
    # The same tensors travel: the PS changes where the rows live, not what is federated.
    assert with_ps["shared_parameters"] == plain["shared_parameters"]
    assert not any(name.startswith("embedding.") for name in with_ps["shared_parameters"])
    for result in (plain, with_ps):
        assert [len(r["participants"]) for r in result["rounds"]] == [2, 2]
    last = with_ps["rounds"][-1]
    assert last["bytes_received"] == plain["rounds"][-1]["bytes_received"]
    # It learns (the heads start from the PS's rows, not the job seed's, so the figures differ
    # from the run without a PS; exactness is tested in test_trainer.py).
    assert with_ps["final_metrics"]["test_recall@20"] > 5.0


def test_unknown_placement_is_refused_before_anything_runs() -> None:
    with pytest.raises(ValueError, match="ps must be one of"):
        BASE.with_overrides(ps="elsewhere").check()
