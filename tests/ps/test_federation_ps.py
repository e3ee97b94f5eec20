"""Placement (b): the federation-level PS. Row-wise fusion on literal examples, the round view a
child trains through, bad sparse replies, padding, and the placement end to end in a small
in-process simulation against the dense federation of the item table."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message

from fedenc.federation import records
from fedenc.federation.master import MasterConfig
from fedenc.federation.parameters import BadUpdateError
from fedenc.ps.client import ShardedClient
from fedenc.ps.federation import FederationTable, RoundView, federation_remote
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.sparse import RowFusion, SparseRows, pad_rows, rows_from_record
from fedenc.ps.table import PSError, ShardTable, TableSpec
from fedenc.runtime.inprocess import run_inprocess
from fedenc.runtime.simulate import Scenario, run_scenario
from nodes.child import app as child_app
from nodes.master import RESULT_KEY
from nodes.master import app as master_app

StartShards = Callable[[TableSpec], tuple[ShardedClient, list[ShardTable]]]  # conftest's


def rows(keys: list[int], deltas: list[list[float]], counts: list[int]) -> SparseRows:
    return SparseRows(
        np.asarray(keys, np.int64), torch.tensor(deltas), np.asarray(counts, np.int64)
    )


A = rows([1, 3], [[1.0, 0.0], [2.0, 2.0]], [1, 3])
B = rows([3, 5], [[4.0, 0.0], [1.0, 1.0]], [1, 2])


def fuse(rule: str, *parts: tuple[str, SparseRows]) -> dict[int, list[float]]:
    fusion = RowFusion(rule)
    fusion.begin()
    for child, part in parts:
        fusion.add(child, part)
    keys, deltas = fusion.result()
    return {int(k): d.tolist() for k, d in zip(keys, deltas, strict=True)}


# -- row-wise fusion ---------------------------------------------------------------------------


def test_weighted_sum_weighs_each_row_by_the_samples_that_touched_it() -> None:
    fused = fuse("weighted_sum", ("a", A), ("b", B))
    # Row 3: (3 * [2, 2] + 1 * [4, 0]) / (3 + 1); rows 1 and 5: the one child that touched each;
    # rows 2 and 4: touched by nobody, not in the result.
    assert fused == {1: [1.0, 0.0], 3: [2.5, 1.5], 5: [1.0, 1.0]}
    # Arrival order does not matter, and fedavg is the same rule.
    assert fuse("fedavg", ("b", B), ("a", A)) == fused


def test_mean_weighs_every_child_that_touched_a_row_the_same() -> None:
    assert fuse("mean", ("a", A), ("b", B)) == {1: [1.0, 0.0], 3: [3.0, 1.0], 5: [1.0, 1.0]}


def test_fused_rows_are_added_to_the_table_and_untouched_rows_keep_their_values() -> None:
    table = FederationTable("test-apply", num_keys=7, width=2, seed=3)
    try:
        before = table.rows()
        fusion = RowFusion("weighted_sum")
        fusion.begin()
        fusion.add("a", A)
        fusion.add("b", B)
        assert table.apply(*fusion.result()) == 3
        after = table.rows()
        expected = before.clone()
        expected[[1, 3, 5]] += torch.tensor([[1.0, 0.0], [2.5, 1.5], [1.0, 1.0]])
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
        assert torch.equal(after[[0, 2, 4, 6]], before[[0, 2, 4, 6]])
    finally:
        table.close()


def test_zero_delta_padding_is_fusion_neutral_and_looks_like_real_rows() -> None:
    padded = pad_rows(B, 3, num_keys=50, rng=np.random.default_rng(0))
    assert len(padded) == len(B) + 3
    assert np.all(np.diff(padded.keys) > 0) and set(B.keys) <= set(padded.keys.tolist())
    extra = ~np.isin(padded.keys, B.keys)
    assert torch.count_nonzero(padded.deltas[torch.from_numpy(extra)]) == 0
    assert set(padded.counts[extra].tolist()) <= set(B.counts.tolist())  # plausible counts
    # Padding key 1 (which A touched) must not dilute A's delta there.
    pad_on_1 = rows([1, 3, 5], [[0.0, 0.0], [4.0, 0.0], [1.0, 1.0]], [5, 1, 2])
    assert fuse("weighted_sum", ("a", A), ("b", pad_on_1)) == fuse(
        "weighted_sum", ("a", A), ("b", B)
    )
    assert pad_rows(B, 100, num_keys=6, rng=np.random.default_rng(0)).keys.tolist() == [
        1,
        2,
        3,
        4,
        5,
    ]


def test_rules_without_a_row_wise_form_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="no row-wise form"):
        RowFusion("median")
    with pytest.raises(ValueError, match="no row-wise form"):
        MasterConfig(num_items=10, ps="federation", share="encoder", rule="krum")
    with pytest.raises(ValueError, match="share must be 'encoder'"):
        MasterConfig(num_items=10, ps="federation", share="all")


# -- what a child trains through ---------------------------------------------------------------


def test_round_view_reads_table_plus_own_deltas_and_never_changes_the_table() -> None:
    base = InProcessPS(TableSpec(10, 2, num_shards=2, seed=1))
    start = base.pull(np.arange(10))
    view = RoundView(base)
    view.push(np.array([2, 7]), torch.tensor([[1.0, 1.0], [0.5, 0.0]]))
    view.count(np.array([2, 7]), np.array([4, 1]))
    view.push(np.array([7]), torch.tensor([[0.5, 2.0]]))
    view.count(np.array([7]), np.array([2]))
    assert torch.equal(base.pull(np.arange(10)), start)  # the table is untouched
    got = view.pull(np.array([7, 3, 2, 7]))
    torch.testing.assert_close(got[0], start[7] + torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(got[1], start[3])
    torch.testing.assert_close(got[2], start[2] + 1.0)
    taken = view.take()
    assert taken.keys.tolist() == [2, 7] and taken.counts.tolist() == [4, 3]
    torch.testing.assert_close(taken.deltas, torch.tensor([[1.0, 1.0], [1.0, 2.0]]))
    assert len(view.take()) == 0 and torch.equal(view.pull(np.array([7])), start[[7]])
    with pytest.raises(PSError, match="NaN"):
        view.push(np.array([1]), torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(PSError, match="overwrite"):
        view.push(np.array([1]), torch.zeros(1, 2), overwrite=True)


def test_children_reach_a_table_on_grpc_shards(grpc_shards: StartShards) -> None:
    client, _ = grpc_shards(TableSpec(20, 4, num_shards=2))
    address = ",".join(client.addresses)
    table = FederationTable("grpc", 20, 4, seed=0, addresses=address)
    view = RoundView(federation_remote({"ps-addresses": address}, "grpc", 20, 4))
    try:
        before = view.pull(np.array([3, 11]))
        table.apply(np.array([3, 11]), torch.ones(2, 4))
        torch.testing.assert_close(view.pull(np.array([3, 11])), before + 1.0)
        with pytest.raises(ValueError, match="not in this process"):
            federation_remote({}, "grpc", 20, 4)
    finally:
        view.close()
        table.close()


# -- bad sparse replies ------------------------------------------------------------------------


def record(keys: Any, deltas: Any, counts: Any) -> ArrayRecord:
    return ArrayRecord(
        {"keys": Array(np.asarray(keys)), "deltas": Array(deltas), "counts": Array(counts)}
    )


GOOD_D = np.ones((2, 4), np.float32)
GOOD_C = np.array([1, 2], np.int32)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (record(np.array([2, 20], np.int32), GOOD_D, GOOD_C), "unknown key 20"),
        (record(np.array([0, 2], np.int32), GOOD_D, GOOD_C), "unknown key 0"),
        (record(np.array([2, 2], np.int32), GOOD_D, GOOD_C), "appears twice"),
        (record(np.array([2, 3], np.int32), np.ones((2, 5), np.float32), GOOD_C), "4 wide"),
        (record(np.array([2, 3], np.int32), np.ones((2, 4)), GOOD_C), "float32"),
        (
            record(
                np.array([2, 3], np.int32), np.array([[np.nan] * 4, [0] * 4], np.float32), GOOD_C
            ),
            "NaN",
        ),
        (record(np.array([2, 3], np.int32), GOOD_D, np.array([0, 1], np.int32)), ">= 1"),
        (record(np.array([2, 3, 4], np.int32), GOOD_D, GOOD_C), "3 keys, 2 delta rows"),
        (ArrayRecord({"keys": Array(np.array([2], np.int32))}), "need arrays"),
    ],
)
def test_bad_sparse_rows_are_refused_with_a_reason(bad: ArrayRecord, reason: str) -> None:
    with pytest.raises(BadUpdateError, match=reason) as err:
        rows_from_record(bad, "child-9", num_keys=20, width=4)
    assert err.value.child == "child-9"


def test_good_sparse_rows_round_trip_through_the_wire() -> None:
    back = rows_from_record(B.to_record(), "b", num_keys=6, width=2)
    assert back.keys.tolist() == [3, 5] and back.counts.tolist() == [1, 2]
    assert torch.equal(back.deltas, B.deltas)
    assert B.to_record()["keys"].numpy().dtype == np.int32  # keys and counts as int32


# -- end to end --------------------------------------------------------------------------------

# Non-IID children (a few item groups each), so that a child touches part of the catalog, as
# shops of one marketplace do.
BASE = Scenario(
    name="ps-b",
    children=3,
    rounds=2,
    hidden=8,
    synthetic_sessions=400,
    synthetic_items=60,
    partition="dirichlet",
    alpha=0.1,
    evaluate_every=2,
)
PLACEMENT_B = BASE.with_overrides(
    ps="federation", ps_scoring="sampled", ps_negatives=0, ps_capacity=200
)


def test_placement_b_moves_fewer_bytes_than_the_dense_table_and_learns() -> None:
    dense = run_scenario(BASE.with_overrides(share="all")).result
    sparse = run_scenario(PLACEMENT_B).result
    table_nbytes = (BASE.synthetic_items + 1) * BASE.hidden * 4
    assert "embedding.weight" in dense["shared_parameters"]
    assert not any(n.startswith("embedding.") for n in sparse["shared_parameters"])
    for d, s in zip(dense["rounds"], sparse["rounds"], strict=True):
        assert len(s["participants"]) == 3 and not s["excluded"]
        # The table down to and back from every child, against the sparse rows and the rows
        # the children pulled while training; and in total the whole training exchange.
        assert 0 < s["table_bytes"] < 2 * 3 * table_nbytes
        assert s["train_bytes"] < d["train_bytes"]
        received = s["metrics"]["ps_rows_received"]
        assert s["metrics"]["ps_rows_fused"] <= BASE.synthetic_items < received
    assert sparse["ps_table"]["rows_applied"] > 0
    for result in (dense, sparse):
        final = result["final_metrics"]
        assert 30.0 < final["test_recall@20"] <= 100.0
        assert 0.0 < final["test_mrr@20"] <= final["test_recall@20"]
    gap = abs(sparse["final_metrics"]["test_recall@20"] - dense["final_metrics"]["test_recall@20"])
    assert gap < 10.0


def test_padding_hides_rows_in_the_replies_without_changing_the_model() -> None:
    plain = run_scenario(PLACEMENT_B.with_overrides(rounds=1, evaluate_every=1)).result
    padded = run_scenario(
        PLACEMENT_B.with_overrides(rounds=1, evaluate_every=1, ps_pad_rows=5)
    ).result
    p, q = plain["rounds"][0], padded["rounds"][0]
    assert q["metrics"]["ps_rows_received"] == p["metrics"]["ps_rows_received"] + 3 * 5
    assert q["metrics"]["ps_rows_fused"] == p["metrics"]["ps_rows_fused"]
    assert padded["final_metrics"] == plain["final_metrics"]


def corrupting(partition: int, corrupt: Callable[[ArrayRecord], ArrayRecord]) -> Any:
    """The real child app, except that one child's train replies carry corrupted rows."""

    def app(message: Message, context: Context) -> Message:
        reply: Message = child_app(message, context)
        is_train = message.metadata.message_type == "train"
        if is_train and context.node_config["partition-id"] == partition and reply.has_content():
            reply.content[records.ROWS_KEY] = corrupt(reply.content[records.ROWS_KEY])
        return reply

    return app


def nan_rows(good: ArrayRecord) -> ArrayRecord:
    deltas = good["deltas"].numpy().copy()
    deltas[0, 0] = np.nan
    return ArrayRecord({"keys": good["keys"], "deltas": Array(deltas), "counts": good["counts"]})


def unknown_keys(good: ArrayRecord) -> ArrayRecord:
    keys = good["keys"].numpy().copy()
    keys[-1] = 10_000
    return ArrayRecord({"keys": Array(keys), "deltas": good["deltas"], "counts": good["counts"]})


@pytest.mark.parametrize(("corrupt", "reason"), [(nan_rows, "NaN"), (unknown_keys, "unknown key")])
def test_a_bad_sparse_reply_is_left_out_and_does_not_poison_the_round(
    corrupt: Callable[[ArrayRecord], ArrayRecord], reason: str
) -> None:
    scenario = PLACEMENT_B.with_overrides(rounds=1, evaluate_every=1)
    run = run_inprocess(master_app, corrupting(1, corrupt), 3, scenario.run_config())
    result = json.loads(str(run.server_context.state[RESULT_KEY]["json"]))
    round_ = result["rounds"][0]
    assert round_["participants"] == ["child-0", "child-2"]
    assert reason in round_["excluded"]["child-1"]
    # Neither half of the bad reply was used: the dense weights and the rows renormalise over
    # the two good children, and the table stayed finite.
    assert set(round_["weights"]) == {"child-0", "child-2"}
    assert round_["metrics"]["ps_rows_fused"] > 0
    assert result["ps_table"]["finite"]
    assert 0.0 < result["final_metrics"]["test_recall@20"] <= 100.0


def test_placement_b_with_full_scoring_fuses_what_the_dense_table_fuses(tmp_path: Any) -> None:
    """Full scoring trains exactly as without a PS and every child weighs each row by the
    samples of its own data touching it, as the dense table's row-wise FedAvg does: the two
    placements of the table publish the same encoder (up to float rounding)."""
    from fedenc.training.checkpoint import load_checkpoint

    scenario = BASE.with_overrides(rounds=2, evaluate_every=0)
    models = []
    for name, sc in (
        ("dense", scenario.with_overrides(share="all")),
        ("b-full", scenario.with_overrides(ps="federation", ps_scoring="full")),
    ):
        out = run_scenario(sc, out_dir=tmp_path / name)
        models.append(load_checkpoint(out.files["checkpoint"])[0].state_dict())
    # Each child pulls the table once per round (its first round too), and sends the rows of
    # its own data: the same bytes every round.
    table_bytes = [r["table_bytes"] for r in out.result["rounds"]]
    assert table_bytes[0] > 0 and len(set(table_bytes)) == 1, table_bytes
    dense, placed = models
    assert list(dense) == list(placed)
    for key in dense:
        torch.testing.assert_close(placed[key], dense[key], rtol=1e-4, atol=1e-5, msg=key)


def test_a_scenario_names_grpc_shards_with_ps_addresses() -> None:
    from fedenc.runtime.simulate import Scenario

    scenario = Scenario.from_mapping(
        {"ps": "federation", "share": "encoder", "ps-addresses": "h1:7100,h2:7101"}
    )
    assert scenario.run_config()["ps-addresses"] == "h1:7100,h2:7101"


def test_the_childrens_ps_counters_in_a_rounds_metrics_are_that_rounds() -> None:
    # The built-in PS counts over the trainer's life; a round reports its own exchanges, so
    # equal rounds report about the same (they doubled, then tripled, as running totals).
    scenario = BASE.with_overrides(ps="local", ps_exchange_every=50, rounds=3, evaluate_every=0)
    rounds = run_scenario(scenario).result["rounds"]
    exchanges = [r["metrics"]["ps_exchanges"] for r in rounds]
    assert all(x > 0 for x in exchanges)
    assert max(exchanges) <= 1.5 * min(exchanges), exchanges
