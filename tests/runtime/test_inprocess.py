"""The in-process runtime: Flower's Grid contract (ids, reply linkage, error replies, timeouts),
a copy per destination (the strategies' shared-RecordDict hazard), unchanged Flower strategies on
it, and bit-identical targets from two runs of the real apps with the same seed."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo  # the first optimizer step imports it: pay that at collection
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from tiny_job import TINY_JOB

from fedenc.runtime import flower_compat as fc
from fedenc.runtime.inprocess import InProcessGrid, new_run_id, run_inprocess

TINY = dict(TINY_JOB)


def grid_with(client: Any, k: int = 3, concurrency: int = 1) -> InProcessGrid:
    configs = [{"partition-id": i, "num-partitions": k} for i in range(k)]
    return InProcessGrid(client, configs, new_run_id(), concurrency=concurrency)


def mutating_echo(msg: Message, ctx: Context) -> Message:
    """Reports the value it received, then scribbles over its input in place."""
    arrays = msg.content["arrays"]
    seen = float(arrays["w"].numpy()[0])
    msg.content["arrays"] = ArrayRecord({"w": Array(np.full(2, -1.0, dtype=np.float32))})
    msg.content["config"]["extra"] = "scribbled"
    pid = int(ctx.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"seen": seen, "pid": pid})}), reply_to=msg)


def test_each_destination_gets_its_own_copy_of_a_shared_content() -> None:
    with grid_with(mutating_echo) as grid, fc.task_identity(grid.run.run_id):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.ones(2, dtype=np.float32))}),
                "config": ConfigRecord({"x": 1}),
            }
        )
        nodes = grid.get_node_ids()
        msgs = [Message(content, nid, "train") for nid in nodes]  # one RecordDict for all
        replies = grid.send_and_receive(msgs)
    assert sorted(r.content["metrics"]["seen"] for r in replies) == [1.0, 1.0, 1.0]
    assert float(content["arrays"]["w"].numpy()[0]) == 1.0 and "extra" not in content["config"]
    ids = {m.metadata.message_id for m in msgs}
    assert len(ids) == 3 and "" not in ids
    assert {r.metadata.reply_to_message_id for r in replies} == ids
    for reply in replies:
        sent = next(m for m in msgs if m.metadata.message_id == reply.metadata.reply_to_message_id)
        assert reply.metadata.src_node_id == sent.metadata.dst_node_id
        assert reply.metadata.dst_node_id == fc.SUPERLINK_NODE_ID
        assert reply.metadata.run_id == grid.run.run_id
    assert grid.bytes_sent > 0 and grid.bytes_received > 0


def test_raising_client_and_unknown_node_give_flower_error_replies() -> None:
    def boom(msg: Message, ctx: Context) -> Message:
        raise ValueError("kaput")

    with grid_with(boom, k=1) as grid, fc.task_identity(grid.run.run_id):
        content = RecordDict({"config": ConfigRecord({"x": 1})})
        raised, unknown = grid.send_and_receive(
            [Message(content, grid.get_node_ids()[0], "query"), Message(content, 999, "query")]
        )
    if raised.metadata.src_node_id == 999:
        raised, unknown = unknown, raised
    assert raised.has_error() and raised.error.code == fc.CLIENT_APP_RAISED_EXCEPTION
    assert "kaput" in raised.error.reason
    assert unknown.has_error() and unknown.error.code == fc.NODE_UNAVAILABLE


def test_timeout_returns_partial_results_and_drops_late_replies() -> None:
    def slow_for_partition_0(msg: Message, ctx: Context) -> Message:
        if ctx.node_config["partition-id"] == 0:
            time.sleep(2.5)  # against a 0.3 s timeout: a margin a loaded machine keeps
        return Message(RecordDict({"metrics": MetricRecord({"ok": 1})}), reply_to=msg)

    with grid_with(slow_for_partition_0, k=3, concurrency=3) as grid:
        with fc.task_identity(grid.run.run_id):
            content = RecordDict({"config": ConfigRecord({"x": 1})})
            msgs = [Message(content, nid, "query") for nid in grid.get_node_ids()]
        t0 = time.monotonic()
        replies = grid.send_and_receive(msgs, timeout=0.3)
        assert time.monotonic() - t0 < 2.0
        assert len(replies) == 2
        time.sleep(2.5)
        assert grid.pull_messages([m.metadata.message_id for m in msgs]) == []


def test_nodes_keep_their_context_across_messages() -> None:
    def count(msg: Message, ctx: Context) -> Message:
        record = ctx.state.config_records.get("n") or ConfigRecord({"n": 0})
        record["n"] = int(record["n"]) + 1
        ctx.state["n"] = record
        return Message(RecordDict({"metrics": MetricRecord({"n": record["n"]})}), reply_to=msg)

    with grid_with(count, k=2) as grid, fc.task_identity(grid.run.run_id):
        for expected in (1, 2, 3):
            content = RecordDict({"config": ConfigRecord({"x": 1})})
            replies = grid.send_and_receive(
                [Message(content, nid, "query") for nid in grid.get_node_ids()]
            )
            assert [r.content["metrics"]["n"] for r in replies] == [expected, expected]


def test_flower_fedavg_runs_unchanged_on_the_grid() -> None:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))}),
            num_rounds=2,
        )
        context.state["w"] = result.arrays

    def client(msg: Message, ctx: Context) -> Message:
        pid = int(ctx.node_config["partition-id"])
        n = pid + 1
        metrics = MetricRecord({"num-examples": n})
        if msg.metadata.message_type == "train":
            w = msg.content["arrays"]["w"].numpy() + float(pid)
            content = RecordDict({"arrays": ArrayRecord({"w": Array(w)}), "metrics": metrics})
        else:
            content = RecordDict({"metrics": metrics})
        return Message(content, reply_to=msg)

    run = run_inprocess(server, client, 3)
    w = run.server_context.state["w"]["w"].numpy()
    # Each round adds the sample-weighted mean of the offsets 0, 1, 2 (weights 1, 2, 3).
    np.testing.assert_allclose(w, np.full(2, 2 * (0 * 1 + 1 * 2 + 2 * 3) / 6), rtol=1e-6)


def test_task_identity_is_restored_after_a_run() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    before = TaskIdentity._run_id
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        assert TaskIdentity.run_id == context.run_id

    run_inprocess(server, lambda m, c: m, 1)
    assert TaskIdentity._run_id == before


def _target(run: Any) -> dict[str, torch.Tensor]:
    from nodes.master import TARGET_KEY

    return dict(run.server_context.state[TARGET_KEY].to_torch_state_dict())


def test_same_seed_gives_bit_identical_targets_across_two_runs() -> None:
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {**TINY, "seed": 3}
    first = run_inprocess(master_app, child_app, 3, config)
    second = run_inprocess(master_app, child_app, 3, config, concurrency=3)
    a, b = _target(first), _target(second)
    assert list(a) == list(b) and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    metrics = [
        [r["metrics"] for r in json.loads(run.server_context.state[RESULT_KEY]["json"])["rounds"]]
        for run in (first, second)
    ]
    assert metrics[0] == metrics[1]
    other = _target(run_inprocess(master_app, child_app, 3, {**config, "seed": 4}))
    assert any(not torch.equal(a[name], other[name]) for name in a)


def test_node_configs_are_completed_and_checked() -> None:
    seen: list[dict[str, Any]] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        content = RecordDict({"config": ConfigRecord({"x": 1})})
        grid.send_and_receive([Message(content, nid, "query") for nid in grid.get_node_ids()])

    def client(msg: Message, ctx: Context) -> Message:
        seen.append(dict(ctx.node_config))
        return Message(RecordDict(), reply_to=msg)

    run_inprocess(server, client, 2, node_configs=[{"data": "/x"}, {}])
    assert sorted(seen, key=lambda c: c["partition-id"]) == [
        {"data": "/x", "partition-id": 0, "num-partitions": 2},
        {"partition-id": 1, "num-partitions": 2},
    ]
    with pytest.raises(ValueError, match="node_configs"):
        run_inprocess(server, client, 3, node_configs=[{}])


def test_cyclic_weight_transfer_with_row_weighting_off_hands_the_encoder_on() -> None:
    """One child a round, in turn, the table shared but not row-weighted: every reply is accepted
    (the children's row weights are ignored, not refused) and the target is the child's set."""
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {
        **TINY,
        "num-server-rounds": 4,
        "fraction": 1 / 3,
        "sampling": "cyclic",
        "row-weighting": False,
    }
    run = run_inprocess(master_app, child_app, 3, config)
    rounds = json.loads(run.server_context.state[RESULT_KEY]["json"])["rounds"]
    assert [r["participants"] for r in rounds] == [
        ["child-0"],
        ["child-1"],
        ["child-2"],
        ["child-0"],
    ]
    assert all(not r["excluded"] for r in rounds)


@pytest.mark.parametrize("balance", [False, True])
def test_carried_optimizer_moments_travel_from_child_to_child(balance: bool) -> None:
    """Cyclic, one child a round, carry-optimizer: every reply carries its Adam moments and is
    accepted, and handing them on changes the training (the exact hand-over is tested in
    tests/federation/test_optimizer_state.py). With balanced work, from round 2 each child gets
    a message of its own: it must carry the moments as well."""
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {
        **TINY,
        "num-server-rounds": 3,
        "fraction": 1 / 3,
        "sampling": "cyclic",
        "row-weighting": False,
        "carry-optimizer": True,
        "balance-work": balance,
    }
    run = run_inprocess(master_app, child_app, 3, config)
    rounds = json.loads(run.server_context.state[RESULT_KEY]["json"])["rounds"]
    assert [r["participants"] for r in rounds] == [["child-0"], ["child-1"], ["child-2"]]
    assert all(not r["excluded"] for r in rounds)
    without = run_inprocess(master_app, child_app, 3, {**config, "carry-optimizer": False})
    a, b = _target(run), _target(without)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the moments change the training


def test_carrying_the_optimizer_needs_cyclic_sampling() -> None:
    from fedenc.federation.master import MasterConfig

    with pytest.raises(ValueError, match="carry_optimizer needs sampling = 'cyclic'"):
        MasterConfig(num_items=10, carry_optimizer=True)


def _new_process_per_message(app: Any) -> Any:
    """The child app as Flower's deployment runtime hosts it: every message in a process that
    has never seen the node (so only the node's Context.state carries anything over)."""
    from fedenc.federation import child
    from fedenc.runtime.clientapp import persistent_host

    def host(message: Any, context: Any) -> Any:
        token = persistent_host.set(False)
        try:
            child.forget()
            return app(message, context)
        finally:
            persistent_host.reset(token)

    return host


@pytest.mark.parametrize("share", ["all", "encoder"])
def test_a_child_run_in_a_new_process_per_message_trains_as_one_kept_alive(share: str) -> None:
    """Under Flower's deployment runtime each message runs in a new process: the child must
    take its model, optimizer, schedule and head up from the node's context, and give the same
    encoder and metrics, bit for bit, as a child kept in memory (share = encoder: the local item
    table used to restart from its seed every message)."""
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {**TINY, "num-server-rounds": 3, "share": share, "lr-decay-step": 1}
    kept = run_inprocess(master_app, child_app, 2, config)
    fresh = run_inprocess(master_app, _new_process_per_message(child_app), 2, config)
    a, b = _target(kept), _target(fresh)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rounds = [
        json.loads(r.server_context.state[RESULT_KEY]["json"])["rounds"] for r in (kept, fresh)
    ]
    assert [r["metrics"] for r in rounds[0]] == [r["metrics"] for r in rounds[1]]


def test_an_actor_hosting_many_nodes_keeps_only_the_last_few_states(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flower's simulation gives one actor process the messages of many nodes, whose states
    travel in their contexts: the process keeps only the last TRAVELLED_STATES_KEPT of them
    (memory grew with the nodes), and the others take theirs up again, bit for bit."""
    from fedenc.federation import child
    from fedenc.runtime.clientapp import persistent_host
    from nodes.child import app as child_app
    from nodes.master import app as master_app

    monkeypatch.setattr(child, "TRAVELLED_STATES_KEPT", 1)
    held: list[int] = []

    def actor(message: Any, context: Any) -> Any:
        token = persistent_host.set(False)
        try:
            return child_app(message, context)
        finally:
            held.append(len(child.live_states()))
            persistent_host.reset(token)

    config = {**TINY, "num-server-rounds": 2}
    kept = run_inprocess(master_app, child_app, 3, config)
    child.forget()
    shared = run_inprocess(master_app, actor, 3, config)
    a, b = _target(kept), _target(shared)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert held and max(held) <= 2, held  # the one kept, and the one a message has just rebuilt


def test_a_ps_child_whose_state_cannot_travel_fails_its_round_with_the_fix() -> None:
    # The two-level PS keeps rows outside the model: such a child cannot carry its state in the
    # context, and says so instead of training round 2 from a forgotten table.
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {**TINY, "share": "encoder", "ps": "local"}
    run = run_inprocess(master_app, _new_process_per_message(child_app), 1, config)
    rounds = json.loads(run.server_context.state[RESULT_KEY]["json"])["rounds"]
    assert rounds[0]["participants"] == ["child-0"]
    reason = rounds[1]["excluded"]["child-0"]
    assert "ChildStateLostError" in reason and "fedenc's runtimes (`fedenc child`" in reason


def test_a_damaged_state_in_the_context_fails_the_round_with_a_clear_reason() -> None:
    # A host that damages the node's context on its way between processes: the child says its
    # state cannot be read (not torch's advice to load with weights_only=False).
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedenc.federation.child import CONTEXT_STATE
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    fresh = _new_process_per_message(child_app)

    def damaging(message: Any, context: Any) -> Any:
        if CONTEXT_STATE in context.state:
            junk = np.frombuffer(b"not a torch file" * 4, dtype=np.uint8)
            context.state[CONTEXT_STATE] = ArrayRecord({"payload": Array(junk)})
        return fresh(message, context)

    run = run_inprocess(master_app, damaging, 1, {**TINY, "num-server-rounds": 2})
    rounds = json.loads(run.server_context.state[RESULT_KEY]["json"])["rounds"]
    assert rounds[0]["participants"] == ["child-0"]
    reason = rounds[1]["excluded"]["child-0"]
    assert "ChildStateLostError" in reason and "cannot be read" in reason, reason
    assert "weights_only" not in reason


def test_the_wait_for_children_says_how_many_are_there_and_how_long_it_waits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A master that expects more children than come logs the wait at once (a silent wait
    # looked like a hang), then starts with the children it has.
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {**TINY, "num-server-rounds": 1, "expect-children": 3, "wait-timeout": 0.5}
    with caplog.at_level("INFO", logger="fedenc"):
        run = run_inprocess(master_app, child_app, 2, config)
    text = caplog.text
    assert "2 of 3 children connected; waiting up to" in text, text
    assert "2 of 3 expected children connected after 0.5 s: starting with them" in text
    rounds = json.loads(run.server_context.state[RESULT_KEY]["json"])["rounds"]
    assert sorted(rounds[0]["participants"]) == ["child-0", "child-1"]


def test_each_childs_own_metrics_are_kept_and_weigh_up_to_the_rounds() -> None:
    # Client variance and fairness are read from the children's own metrics: the round's
    # metric is their example-weighted mean, and the final test keeps them too.
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {**TINY, "num-server-rounds": 1, "final-test": True, "partition": "dirichlet"}
    run = run_inprocess(master_app, child_app, 3, config)
    result = json.loads(run.server_context.state[RESULT_KEY]["json"])
    round_ = result["rounds"][0]
    by_child = round_["child_metrics"]
    assert sorted(by_child) == sorted(round_["evaluated"]) == ["child-0", "child-1", "child-2"]
    n = {c: m["valid_examples"] for c, m in by_child.items()}
    assert sum(n.values()) == round_["metrics"]["valid_examples"]
    mean = sum(m["valid_recall@20"] * n[c] for c, m in by_child.items()) / sum(n.values())
    assert mean == pytest.approx(round_["metrics"]["valid_recall@20"])
    final = result["final_child_metrics"]
    assert sorted(final) == sorted(by_child) and all("test_mrr@20" in m for m in final.values())
    # and each one's training time (who is slow), not only the maximum and the sum
    times = round_["child_seconds"]
    assert sorted(times) == sorted(by_child) and max(times.values()) == round_["child_seconds_max"]


def test_publish_best_publishes_and_tests_the_best_validation_round() -> None:
    # As centralized training keeps its best epoch: the published (and tested) target is the
    # round with the highest validation Recall@20, which a run stopped at that round gives.
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    # A large lr overshoots before the last round. Which round peaks moves with float rounding
    # (the loss path, the thread count): the first lr whose best round is not the last serves.
    tried = []
    for lr in (1.0, 3.0, 10.0):
        config = {**TINY, "num-server-rounds": 4, "final-test": True, "lr": lr, "publish": "best"}
        run = run_inprocess(master_app, child_app, 2, config)
        result = json.loads(run.server_context.state[RESULT_KEY]["json"])
        recall = [r["metrics"]["valid_recall@20"] for r in result["rounds"]]
        best = recall.index(max(recall)) + 1
        assert result["published_round"] == best, recall
        tried.append((lr, recall))
        if best < 4:
            break
    assert best < 4, f"every lr peaked in the last round: {tried}"
    short = run_inprocess(master_app, child_app, 2, {**config, "num-server-rounds": best})
    a, b = _target(run), _target(short)
    assert all(torch.equal(a[n], b[n]) for n in a)
    short_result = json.loads(short.server_context.state[RESULT_KEY]["json"])
    assert result["final_metrics"] == short_result["final_metrics"]


def test_keep_if_best_keeps_the_first_of_equal_rounds_and_skips_skipped_ones() -> None:
    from types import SimpleNamespace

    from fedenc.federation.master import MasterConfig, RoundResult, _Job

    job: Any = SimpleNamespace(
        config=MasterConfig(num_items=10, publish="best"),
        select_metric="valid_recall@20",
        best={},
        target={"w": torch.zeros(1)},
    )

    def round_(r: int, value: float, skipped: str | None = None) -> RoundResult:
        job.target = {"w": torch.full((1,), float(r))}
        return RoundResult(r, [], [], {}, 0, {}, None, None, None,
                           {"valid_recall@20": value}, [], 0, 0, 0.0, None, skipped)  # fmt: skip

    for r, value, skipped in [(1, 5.0, None), (2, 9.0, None), (3, 9.0, None), (4, 99.0, "x")]:
        _Job.keep_if_best(job, round_(r, value, skipped))
    assert job.best["round"] == 2 and float(job.best["target"]["w"]) == 2.0
    assert _Job.take_best(job, 4) == 2 and float(job.target["w"]) == 2.0
    with pytest.raises(ValueError, match="publish must be 'last' or 'best'"):
        MasterConfig(num_items=10, publish="first")  # type: ignore[arg-type]


def test_an_evaluation_weighing_more_than_its_child_declared_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One child claiming 10^12 evaluation examples set the federation's published metrics
    # alone; its confirmation now declares its held-out sizes, and the master holds it to them.
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    def inflating(message: Any, context: Any) -> Any:
        reply = child_app(message, context)
        if message.metadata.message_type == "evaluate" and context.node_config["partition-id"] == 0:
            metrics = reply.content.metric_records["metrics"]
            metrics["num-examples"] = 10**12
            metrics["recall@20"] = 99.0
        elif message.metadata.message_type == "evaluate":  # a metric no check knows
            reply.content.metric_records["metrics"]["ndcg@20"] = 1e300
        return reply

    config = {**TINY, "num-server-rounds": 1, "final-test": True}
    honest = run_inprocess(master_app, child_app, 2, config)
    with caplog.at_level("WARNING", logger="fedenc"):
        run = run_inprocess(master_app, inflating, 2, config)
    result = json.loads(run.server_context.state[RESULT_KEY]["json"])
    assert result["rounds"][0]["evaluated"] == ["child-1"]
    assert "num-examples = 1e+12 exceeds the valid examples it confirmed" in caplog.text
    assert result["final_metrics"]["test_examples"] < 10**6
    assert "test_ndcg@20" not in result["final_metrics"]  # only ranking metrics are averaged
    fair = json.loads(honest.server_context.state[RESULT_KEY]["json"])["final_child_metrics"]
    assert result["final_metrics"]["test_recall@20"] == fair["child-1"]["test_recall@20"]


def test_a_child_with_fewer_samples_than_min_samples_is_left_out() -> None:
    # An update from a handful of sessions tells too much about them: min-samples sets a floor.
    from fedenc.federation.master import NotEnoughChildrenError
    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    config = {**TINY, "num-server-rounds": 1, "partition": "dirichlet", "alpha": 0.3}
    first = json.loads(
        run_inprocess(master_app, child_app, 2, config).server_context.state[RESULT_KEY]["json"]
    )
    counts = {c["name"]: c["num_samples"] for c in first["children"]}
    small, large = sorted(counts, key=counts.__getitem__)
    assert counts[small] < counts[large]
    floor = {**config, "min-samples": counts[small] + 1}
    result = json.loads(
        run_inprocess(master_app, child_app, 2, floor).server_context.state[RESULT_KEY]["json"]
    )
    assert result["rounds"][0]["participants"] == [large]
    left = {c["name"]: c for c in result["children"]}[small]
    assert not left["accepted"] and "the job needs at least" in left["reason"]
    # Told so, it dropped the job's state (the end-of-job message reaches confirmed ones only).
    from fedenc.federation import child

    assert not [key for key in child.live_states() if key[2] == result["job_id"]]
    with pytest.raises(NotEnoughChildrenError, match="min-samples"):
        run_inprocess(master_app, child_app, 2, {**config, "min-samples": 10**9})


def test_a_child_whose_update_is_refused_is_told_why(caplog: pytest.LogCaptureFixture) -> None:
    # The reason was only in the master's log and results.json: the site saw silence.
    from flwr.app import Array, ArrayRecord

    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    def poisoning(message: Any, context: Any) -> Any:
        reply = child_app(message, context)
        if message.metadata.message_type == "train" and context.node_config["partition-id"] == 0:
            arrays = reply.content.array_records["arrays"]
            name = next(iter(arrays))
            bad = arrays[name].numpy().copy()
            bad.flat[0] = np.nan
            arrays[name] = Array(bad)
            reply.content["arrays"] = ArrayRecord(dict(arrays.items()))
        return reply

    with caplog.at_level("WARNING", logger="fedenc"):
        run = run_inprocess(master_app, poisoning, 2, {**TINY, "num-server-rounds": 1})
    result = json.loads(run.server_context.state[RESULT_KEY]["json"])
    assert "child-0" in result["rounds"][0]["excluded"]
    told = [r.getMessage() for r in caplog.records if "left this child out" in r.getMessage()]
    assert len(told) == 1 and told[0].startswith("child-0: the master left this child out of")
    assert "NaN" in told[0]
