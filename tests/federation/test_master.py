"""The master protocol over a grid: message order (no parameters before a confirmation, none for
decliners), exclusion of decliners, failing, late and malformed replies with renormalised weights,
seeded partial participation, stop rules and the saved encoder.

Most tests drive :func:`run_master` against scripted children (echo clients, exact arithmetic,
no training); one runs the real child app on tiny synthetic data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch._dynamo  # the first optimizer step imports it: pay that at collection
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from fedenc.federation import records
from fedenc.federation.checkpoint import read_master_state
from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.fusion.weighted_sum import WeightedSum
from fedenc.federation.master import (
    MasterConfig,
    MasterResult,
    NotEnoughChildrenError,
    resumable,
    round_listener,
    run_master,
    shared_names,
)
from fedenc.federation.parameters import Parameters
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.inprocess import InProcessGrid, new_run_id
from fedenc.training.checkpoint import load_checkpoint
from fedenc.training.config import TrainConfig

TINY_DATA = {"synthetic-sessions": 400, "synthetic-items": 60, "seed": 0}
Client = Callable[[Message, Context], Message]


def tiny_config(**overrides: Any) -> MasterConfig:
    values: dict[str, Any] = {
        "num_items": 60,
        "encoder_options": {"hidden": 8},
        "train": TrainConfig(epochs=1, batch_size=50),
        "rounds": 2,
        "seed": 0,
    }
    values.update(overrides)
    return MasterConfig(**values)


# -- scripted children ----------------------------------------------------------------------------


def samples_of(pid: int) -> int:
    return 10 * (pid + 1)


def offset_of(pid: int) -> float:
    return float(pid + 1)


@dataclass
class Script:
    """How each partition behaves: decline / raise / stall / corrupt; else echo + offset."""

    decline: set[int] = field(default_factory=set)
    raise_on_train: set[int] = field(default_factory=set)
    stall_s: dict[int, float] = field(default_factory=dict)
    corrupt: dict[int, Callable[[Parameters], Parameters]] = field(default_factory=dict)
    train_examples: dict[int, int] = field(default_factory=dict)  # num-examples it reports
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    mislabel_train: set[int] = field(default_factory=set)  # its train reply says "evaluate"
    fail_query: set[int] = field(default_factory=set)  # lost before it answers the query
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # added to replies
    other_job: set[int] = field(default_factory=set)  # confirms another job's id
    valid_examples: dict[int, int] = field(default_factory=dict)  # declared in its confirmation


def echo_client(script: Script) -> Client:
    """A child without training: confirms with 10 * (pid + 1) samples and returns the received
    parameters plus (pid + 1), so the fused target is known exactly."""

    def client(msg: Message, ctx: Context) -> Message:
        pid = int(ctx.node_config["partition-id"])
        kind = msg.metadata.message_type
        if kind == "query":
            if pid in script.fail_query:
                raise RuntimeError(f"child {pid} is gone")
            record = msg.content.config_records[records.FEDENC_KEY]
            job = records.instruction_from_bytes(record[records.INSTRUCTION]).job_id
            if pid in script.other_job:
                job = "an-earlier-job"
            if pid in script.decline:
                conf = fpb.Confirmation(job_id=job, accepted=False, decline_reason="no data here")
            else:
                conf = fpb.Confirmation(
                    job_id=job,
                    accepted=True,
                    num_samples=samples_of(pid),
                    num_valid_examples=script.valid_examples.get(pid, 0),
                )
            return Message(records.confirmation_content(conf, f"child-{pid}"), reply_to=msg)
        if kind == "train":
            if pid in script.raise_on_train:
                raise RuntimeError(f"boom in child {pid}")
            if pid in script.stall_s:
                time.sleep(script.stall_s[pid])
            params = records.record_to_params(msg.content["arrays"], "master")
            params = {k: v + offset_of(pid) for k, v in params.items()}
            if pid in script.corrupt:
                params = script.corrupt[pid](params)
            n = script.train_examples.get(pid, samples_of(pid))
            metrics = {records.NUM_EXAMPLES: n, "train_loss": float(pid)}
            metrics.update(script.train_metrics.get(pid, {}))
            content = records.metrics_content(metrics, records.params_to_record(params))
            reply = Message(content, reply_to=msg)
            if pid in script.mislabel_train:
                reply.metadata.message_type = "evaluate"
            return reply
        if kind == "evaluate":
            metrics = {records.NUM_EXAMPLES: samples_of(pid), "recall@20": 10.0 * pid}
            metrics.update(script.eval_metrics.get(pid, {}))
            return Message(records.metrics_content(metrics), reply_to=msg)
        return Message(records.metrics_content({"ok": 1}), reply_to=msg)

    return client


@dataclass
class Event:
    direction: str  # "out" | "in"
    node: int
    kind: str
    has_arrays: bool
    accepted: bool | None = None


class RecordingGrid(Grid):
    """Wraps a grid; records every message out and every reply in, in order."""

    def __init__(self, inner: InProcessGrid) -> None:
        self.inner = inner
        self.events: list[Event] = []
        self.offline: set[int] = set()  # nodes get_node_ids() does not list (yet)

    def set_run(self, run: fc.Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> fc.Run:
        return self.inner.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> list[int]:
        return [nid for nid in self.inner.get_node_ids() if nid not in self.offline]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        for m in messages:
            has_arrays = m.has_content() and bool(m.content.array_records)
            self.events.append(
                Event("out", m.metadata.dst_node_id, m.metadata.message_type, has_arrays)
            )
        return self.inner.push_messages(messages)

    def _record(self, replies: Iterable[Message]) -> Iterator[Message]:
        for r in replies:
            accepted = None
            if r.metadata.message_type == "query" and r.has_content():
                accepted = records.read_confirmation(r.content)[0].accepted
            has_arrays = r.has_content() and bool(r.content.array_records)
            self.events.append(
                Event("in", r.metadata.src_node_id, r.metadata.message_type, has_arrays, accepted)
            )
            yield r

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return list(self._record(self.inner.pull_messages(message_ids)))

    def receive(self, message_ids: Sequence[str], timeout: float | None) -> Iterator[Message]:
        return self._record(self.inner.receive(message_ids, timeout))

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        raise AssertionError("the master streams replies (push_messages + receive)")


class PollingGrid(RecordingGrid):
    """A grid without ``receive``: the master falls back to polling ``pull_messages``."""

    receive = None  # type: ignore[assignment]


def run_job(
    client: Client,
    k: int,
    config: MasterConfig,
    run_config: dict[str, Any] | None = None,
    concurrency: int = 1,
    grid_type: type[RecordingGrid] = RecordingGrid,
) -> tuple[MasterResult, RecordingGrid]:
    rid = new_run_id()
    configs = [{"partition-id": i, "num-partitions": k} for i in range(k)]
    with InProcessGrid(client, configs, rid, run_config, concurrency=concurrency) as inner:
        grid = grid_type(inner)
        with fc.task_identity(rid):
            result = run_master(grid, config)
    return result, grid


def node_of(grid: RecordingGrid, pid: int) -> int:
    for nid, node in grid.inner.nodes.items():
        if node.context.node_config["partition-id"] == pid:
            return nid
    raise KeyError(pid)


def initial_target(config: MasterConfig) -> Parameters:
    from fedenc.encoders.registry import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_encoder(config.encoder, config.num_items, **config.encoder_options)
        model.reset_parameters()
    state = model.state_dict()
    return {n: state[n].clone() for n in shared_names(model, config.share)}


# -- message order --------------------------------------------------------------------------------


def test_no_parameters_before_confirmation_and_none_for_decliners() -> None:
    script = Script(decline={1})
    result, grid = run_job(echo_client(script), 4, tiny_config(rounds=2))
    confirmed_at: dict[int, int] = {}
    for index, event in enumerate(grid.events):
        if event.direction == "in" and event.kind == "query" and event.accepted:
            confirmed_at.setdefault(event.node, index)
        if event.direction == "out" and event.has_arrays:
            assert event.node in confirmed_at, f"parameters sent to node {event.node} unconfirmed"
            assert confirmed_at[event.node] < index
    decliner = node_of(grid, 1)
    assert [e.kind for e in grid.events if e.direction == "out" and e.node == decliner] == ["query"]
    # The very first message each node got was the instruction.
    for nid in grid.inner.nodes:
        first = next(e for e in grid.events if e.direction == "out" and e.node == nid)
        assert first.kind == "query" and not first.has_arrays
    declined = {c.name: c.reason for c in result.children if not c.accepted}
    assert declined == {"child-1": "no data here"}
    for r in result.rounds:
        assert r.participants == ["child-0", "child-2", "child-3"]
        assert "child-1" not in r.sampled


def test_a_confirmation_for_another_job_leaves_that_child_out_with_the_reason() -> None:
    result, grid = run_job(echo_client(Script(other_job={2})), 3, tiny_config(rounds=1))
    left_out = {c.name: c.reason for c in result.children if not c.accepted}
    assert left_out == {"child-2": "confirmation for job 'an-earlier-job'"}
    stray = node_of(grid, 2)
    assert not any(e.has_arrays for e in grid.events if e.direction == "out" and e.node == stray)
    assert result.rounds[0].participants == ["child-0", "child-1"]


def test_fused_target_is_the_sample_weighted_sum_over_responders() -> None:
    config = tiny_config(rounds=1, final_test=False)
    script = Script(decline={1}, raise_on_train={2})
    result, _ = run_job(echo_client(script), 4, config)
    (r,) = result.rounds
    assert r.participants == ["child-0", "child-3"]
    assert "boom in child 2" in r.excluded["child-2"]
    n0, n3 = samples_of(0), samples_of(3)
    assert r.weights == pytest.approx({"child-0": n0 / (n0 + n3), "child-3": n3 / (n0 + n3)})
    assert sum(r.weights.values()) == pytest.approx(1.0)
    assert r.num_samples == n0 + n3
    shift = (n0 * offset_of(0) + n3 * offset_of(3)) / (n0 + n3)  # not shrunk by 1/K
    start = initial_target(config)
    assert list(result.target) == list(start)  # the encoder's order
    for name, tensor in result.target.items():
        torch.testing.assert_close(tensor, start[name] + shift, rtol=0, atol=1e-5)
        assert tensor.dtype == start[name].dtype


def test_evaluation_is_the_example_weighted_mean() -> None:
    result, _ = run_job(echo_client(Script(decline={0})), 3, tiny_config(rounds=1))
    (r,) = result.rounds
    n1, n2 = samples_of(1), samples_of(2)
    assert r.recall_at_20 == pytest.approx((10.0 * n1 + 20.0 * n2) / (n1 + n2))
    assert r.evaluated == ["child-1", "child-2"]
    assert r.loss == pytest.approx((1.0 * n1 + 2.0 * n2) / (n1 + n2))


# -- bad replies ----------------------------------------------------------------------------------


def _nan(params: Parameters) -> Parameters:
    name = next(iter(params))
    bad = params[name].clone()
    bad.view(-1)[0] = float("nan")
    return {**params, name: bad}


def _wrong_shape(params: Parameters) -> Parameters:
    name = next(iter(params))
    return {**params, name: torch.zeros(3, 3, dtype=params[name].dtype)}


def _missing(params: Parameters) -> Parameters:
    return dict(list(params.items())[1:])


def _extra(params: Parameters) -> Parameters:
    return {**params, "intruder.weight": torch.zeros(2)}


def _wrong_dtype(params: Parameters) -> Parameters:
    return {k: v.double() for k, v in params.items()}


def test_bad_replies_are_rejected_with_a_logged_reason(caplog: pytest.LogCaptureFixture) -> None:
    corrupt = {1: _nan, 2: _wrong_shape, 3: _missing, 4: _extra, 5: _wrong_dtype}
    config = tiny_config(rounds=1, final_test=False)
    with caplog.at_level(logging.WARNING, logger="fedenc.federation.master"):
        result, _ = run_job(echo_client(Script(corrupt=corrupt)), 6, config)
    (r,) = result.rounds
    assert r.participants == ["child-0"] and r.skipped is None
    assert "NaN/Inf" in r.excluded["child-1"]
    assert "shape" in r.excluded["child-2"]
    assert "missing tensor" in r.excluded["child-3"]
    assert "unexpected tensor" in r.excluded["child-4"]
    assert "dtype" in r.excluded["child-5"]
    for pid in corrupt:
        assert f"rejected update from child 'child-{pid}'" in caplog.text
    # The round is not poisoned: the target is child 0's update alone.
    start = initial_target(config)
    for name, tensor in result.target.items():
        torch.testing.assert_close(tensor, start[name] + offset_of(0), rtol=0, atol=1e-6)
        assert torch.isfinite(tensor).all()


def test_a_reason_quoting_a_childs_huge_tensor_name_is_clipped() -> None:
    # The refusal quotes the unexpected name: 3 MB of it went into results.json and the log.
    huge = "w" * 3_000_000
    script = Script(corrupt={1: lambda p: {**p, huge: torch.zeros(1)}})
    result, _ = run_job(echo_client(script), 2, tiny_config(rounds=1))
    reason = result.rounds[0].excluded["child-1"]
    assert "unexpected tensor" in reason and len(reason) < 1000


def test_counts_above_the_confirmed_one_and_impossible_metrics_are_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Child 1 confirmed 20 samples, then claims 10**12 to take the whole weight; children 2 and
    # 3 report evaluation metrics no ranking can give; child 4 labels its update an evaluation.
    script = Script(
        train_examples={1: 10**12},
        mislabel_train={4},
        eval_metrics={2: {"recall@20": 1e9}, 3: {"mrr@20": float("nan")}},
    )
    config = tiny_config(rounds=1, final_test=False, evaluate_every=1)
    with caplog.at_level(logging.WARNING, logger="fedenc.federation.master"):
        result, _ = run_job(echo_client(script), 5, config)
    (r,) = result.rounds
    assert (
        r.excluded["child-1"] == "reply counts 1000000000000 examples, but the child confirmed 20"
    )
    assert r.excluded["child-4"] == "a 'evaluate' reply to a 'train' message"
    assert sorted(r.participants) == ["child-0", "child-2", "child-3"]
    assert "child-2's valid metrics left out: recall@20 = 1000000000.0 is outside [0, 100]" in (
        caplog.text
    )
    assert "child-3's valid metrics left out: mrr@20 is nan" in caplog.text
    # Children 0 (recall 0, 10 examples), 1 (10.0, 20) and 4 (40.0, 50) are the ones averaged.
    assert r.metrics["valid_recall@20"] == pytest.approx((10 * 20 + 40 * 50) / 80)
    assert r.metrics["valid_examples"] == 30 + samples_of(4)


def test_a_round_below_min_children_keeps_the_target() -> None:
    # Child 1 fails round 1 only: the round is skipped (target unchanged), round 2 trains.
    failures: list[int] = []
    script = Script(raise_on_train={1})
    client = echo_client(script)

    def once(msg: Message, ctx: Context) -> Message:
        if msg.metadata.message_type == "train" and int(ctx.node_config["partition-id"]) == 1:
            failures.append(1)
            if len(failures) > 1:
                script.raise_on_train.clear()
        return client(msg, ctx)

    config = tiny_config(rounds=2, min_children=2, final_test=False)
    result, _ = run_job(once, 2, config)
    first, second = result.rounds
    assert first.skipped is not None and "needs 2" in first.skipped
    assert first.param_change is None and second.skipped is None
    start = initial_target(config)
    # Round 2 alone moved it: offsets 1 and 2 weighted by 10 and 20 samples.
    for name, tensor in result.target.items():
        torch.testing.assert_close(tensor, start[name] + 5 / 3, rtol=0, atol=1e-6)


def test_a_job_whose_rounds_were_all_skipped_publishes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "encoder"
    config = tiny_config(rounds=2, min_children=2, final_test=False, checkpoint_dir=out)
    with pytest.raises(NotEnoughChildrenError, match=r"no round of job .* trained: all 2 were"):
        run_job(echo_client(Script(raise_on_train={1})), 2, config)
    assert not out.exists()


def test_too_few_confirmations_fail_the_job() -> None:
    with pytest.raises(NotEnoughChildrenError, match="1 child"):
        run_job(echo_client(Script(decline={0, 1})), 3, tiny_config(min_children=2))


# -- partial participation ------------------------------------------------------------------------


def test_a_late_child_is_left_out_of_the_round() -> None:
    config = tiny_config(rounds=1, round_timeout=1.0, final_test=False, evaluate_every=0)
    script = Script(stall_s={2: 2.0})
    result, _ = run_job(echo_client(script), 3, config, concurrency=3)
    (r,) = result.rounds
    assert r.participants == ["child-0", "child-1"]
    assert "within 1 s" in r.excluded["child-2"]


def test_fraction_samples_are_seeded_and_respect_min_children() -> None:
    config = dict(rounds=3, fraction=0.4, min_children=2, final_test=False, evaluate_every=0)
    first, _ = run_job(echo_client(Script()), 5, tiny_config(**config))
    again, _ = run_job(echo_client(Script()), 5, tiny_config(**config))
    samples = [r.sampled for r in first.rounds]
    assert samples == [r.sampled for r in again.rounds]
    assert all(len(s) == 2 for s in samples)  # ceil(0.4 * 5) = 2 = min_children
    assert len({tuple(s) for s in samples}) > 1  # rounds draw afresh
    assert [r.participants for r in first.rounds] == samples


def test_cyclic_sampling_visits_the_children_in_turn() -> None:
    config = dict(rounds=7, fraction=0.2, sampling="cyclic", final_test=False, evaluate_every=0)
    result, _ = run_job(echo_client(Script()), 5, tiny_config(**config))
    names = [r.sampled for r in result.rounds]
    assert names == [[f"child-{i % 5}"] for i in range(7)]  # one per round, wrapping around
    pairs = dict(rounds=3, fraction=0.4, sampling="cyclic", final_test=False, evaluate_every=0)
    result, _ = run_job(echo_client(Script()), 5, tiny_config(**pairs))
    assert [r.sampled for r in result.rounds] == [
        ["child-0", "child-1"],
        ["child-2", "child-3"],
        ["child-0", "child-4"],  # wraps: child-4 then child-0, fused in name order
    ]


def test_unknown_sampling_is_refused() -> None:
    with pytest.raises(ValueError, match="sampling must be 'random' or 'cyclic'"):
        tiny_config(sampling="round-robin")


class LateJoinGrid(RecordingGrid):
    """The last node comes online after the first train round."""

    def __init__(self, inner: InProcessGrid) -> None:
        super().__init__(inner)
        self.offline = {max(inner.nodes)}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        ids = super().push_messages(messages)
        if any(m.metadata.message_type == "train" for m in messages):
            self.offline = set()
        return ids


def test_a_child_that_comes_online_later_joins_through_its_confirmation() -> None:
    config = tiny_config(rounds=2, final_test=False)
    result, grid = run_job(echo_client(Script()), 3, config, grid_type=LateJoinGrid)
    assert [r.participants for r in result.rounds] == [
        ["child-0", "child-1"],
        ["child-0", "child-1", "child-2"],
    ]
    late = next(c for c in result.children if c.name == "child-2")
    assert late.accepted and late.joined_round == 2
    node = node_of(grid, 2)
    kinds = [(e.direction, e.kind) for e in grid.events if e.node == node]
    assert kinds[:3] == [("out", "query"), ("in", "query"), ("out", "train")]


class LateQueryGrid(RecordingGrid):
    """The last node comes online once the first queries are out (a child restarting)."""

    def __init__(self, inner: InProcessGrid) -> None:
        super().__init__(inner)
        self.offline = {max(inner.nodes)}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = super().push_messages(messages)
        self.offline = set()
        return ids


def test_a_child_lost_before_confirming_is_waited_for_and_one_that_declines_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = tiny_config(rounds=1, final_test=False, min_children=2, wait_timeout=30.0)
    with caplog.at_level(logging.WARNING, logger="fedenc.federation.master"):
        result, _ = run_job(echo_client(Script(fail_query={1})), 3, config, grid_type=LateQueryGrid)
    assert "1 of 2 child(ren) confirmed (no confirmation from: node-" in caplog.text
    assert "child 1 is gone" in caplog.text  # its app's error, not a guess that it was lost
    assert result.rounds[0].participants == ["child-0", "child-2"]
    # A child that declines is an answer: no waiting, the job fails at once.
    config = tiny_config(rounds=1, final_test=False, min_children=2, wait_timeout=30.0)
    t0 = time.monotonic()
    with pytest.raises(NotEnoughChildrenError, match="1 child\\(ren\\) confirmed"):
        run_job(echo_client(Script(decline={1})), 2, config)
    assert time.monotonic() - t0 < 10


def test_children_that_all_left_stop_the_job_after_its_last_round_with_their_state(
    tmp_path: Path,
) -> None:
    seen: list[Event] = []

    class VanishingGrid(RecordingGrid):
        """Every child disconnects once the first round's train replies are in."""

        def __init__(self, inner: InProcessGrid) -> None:
            super().__init__(inner)
            self.events = seen

        def receive(self, message_ids: Sequence[str], timeout: float | None) -> Iterator[Message]:
            yield from super().receive(message_ids, timeout)
            if any(e.direction == "in" and e.kind == "train" for e in self.events):
                self.offline = set(self.inner.get_node_ids())

    state = tmp_path / "state"
    config = tiny_config(rounds=10, wait_timeout=0.5, state_dir=state, final_test=False)
    t0 = time.monotonic()
    with pytest.raises(
        NotEnoughChildrenError,
        match=r"round 2: 0 confirmed child\(ren\) connected, the job needs 1 "
        r"\(gone: child-0, child-1\); none came back within 0 s",
    ):
        run_job(echo_client(Script()), 2, config, grid_type=VanishingGrid)
    assert time.monotonic() - t0 < 10  # the wait, not nine rounds nobody trains
    assert read_master_state(state).round == 1  # what --resume continues from
    # Stopped, not finished: a child that is still alive keeps its job state for the resume.
    assert not any(e.kind == records.FINISH_ACTION for e in seen)
    assert [e.kind for e in seen if e.direction == "out"].count("train") == 2


def test_an_error_reply_from_the_superlink_for_an_unreachable_child_is_its_reason() -> None:
    # Flower's SuperLink answers for a node it cannot reach with an error reply from the link
    # (node id 1): the child is left out with that reason at once, not after the round timeout.
    from flwr.common.constant import SUPERLINK_NODE_ID

    class LinkAnswers(RecordingGrid):
        def receive(self, message_ids: Sequence[str], timeout: float | None) -> Iterator[Message]:
            for reply in super().receive(message_ids, timeout):
                if reply.metadata.message_type == "train" and reply.metadata.src_node_id == 3:
                    error = fc.error_reply(reply, 3, "NODE_UNAVAILABLE: node 3 is offline")
                    error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                    error.metadata.__dict__["_reply_to_message_id"] = (
                        reply.metadata.reply_to_message_id
                    )
                    reply = error
                yield reply

    result, _ = run_job(echo_client(Script()), 2, tiny_config(rounds=1), grid_type=LinkAnswers)
    (r,) = result.rounds
    assert r.participants == ["child-0"]
    assert "node 3 is offline" in r.excluded["child-1"]


def test_messages_live_as_long_as_the_master_waits_for_them() -> None:
    # With a round timeout, a SuperLink may drop a message the master no longer waits for
    # (Flower's default TTL is 12 h: a slow node would work through stale rounds first).
    sent: list[tuple[str, float]] = []

    class TtlGrid(RecordingGrid):
        def push_messages(self, messages: Iterable[Message]) -> list[str]:
            messages = list(messages)
            sent.extend((m.metadata.message_type, m.metadata.ttl) for m in messages)
            return super().push_messages(messages)

    run_job(echo_client(Script()), 1, tiny_config(rounds=1, round_timeout=20.0), grid_type=TtlGrid)
    assert ("train", 80.0) in sent and ("evaluate", 80.0) in sent


class NanRule(WeightedSum):
    """weighted_sum whose result is NaN: the job fails in round 1, before any checkpoint.
    Registered only inside its test (a rule left registered joins the every-rule tests)."""

    name = "test_nan_in_round_1"

    def _fuse(self) -> Parameters:
        return {k: torch.full_like(v, math.nan) for k, v in super()._fuse().items()}


def test_a_job_that_fails_in_its_first_round_releases_its_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its state directory holds no checkpoint of this job: nothing will resume it. The end-of-
    # job message goes out once.
    from fedenc.federation.fusion import registry
    from fedenc.federation.fusion.base import FusionOutputError

    monkeypatch.setitem(registry._REGISTRY, NanRule.name, NanRule)
    config = tiny_config(rounds=3, state_dir=tmp_path / "state", rule=NanRule.name)
    grids: list[RecordingGrid] = []

    class Kept(RecordingGrid):
        def __init__(self, inner: InProcessGrid) -> None:
            super().__init__(inner)
            grids.append(self)

    with pytest.raises(FusionOutputError):
        run_job(echo_client(Script()), 2, config, grid_type=Kept)
    finish = [
        e for e in grids[0].events if e.direction == "out" and e.kind == records.FINISH_ACTION
    ]
    assert sorted(e.node for e in finish) == sorted(grids[0].inner.get_node_ids())


class _Stopped(Exception):
    pass


def _stop_after_round_1(result: Any) -> None:
    raise _Stopped(f"stopped after round {result.round}")  # as a Control cancel does


@pytest.mark.parametrize(
    ("with_state", "can_resume", "released"),
    [(False, True, True), (True, True, False), (True, False, True)],
)
def test_a_failed_job_releases_its_children_unless_it_can_be_resumed(
    tmp_path: Path, with_state: bool, can_resume: bool, released: bool
) -> None:
    # A job that fails with a checkpoint to resume from leaves the children's state for
    # --resume; one that nothing will resume (no state directory, or a Control job) tells them
    # to drop it, or a long-lived child keeps model, optimizer and data for good.
    config = tiny_config(rounds=3, state_dir=tmp_path / "state" if with_state else None)
    listener, no_resume = round_listener.set(_stop_after_round_1), resumable.set(can_resume)
    grids: list[RecordingGrid] = []

    class Kept(RecordingGrid):
        def __init__(self, inner: InProcessGrid) -> None:
            super().__init__(inner)
            grids.append(self)

    try:
        with pytest.raises(_Stopped):
            run_job(echo_client(Script()), 2, config, grid_type=Kept)
    finally:
        resumable.reset(no_resume)
        round_listener.reset(listener)
    finish = [e.node for e in grids[0].events if e.kind == records.FINISH_ACTION]
    assert len(finish) == (4 if released else 0)  # out and acknowledged, for both children


def test_a_job_that_fails_before_its_first_round_closes_its_federation_table() -> None:
    # The in-process table of ps = "federation" is registered under the job id: a job that
    # fails early must not hold it, so that the same id can run again in this process.
    from fedenc.ps import federation as psf

    config = tiny_config(ps="federation", share="encoder", job_id="early", wait_timeout=0.1)
    for _ in range(2):
        with pytest.raises(NotEnoughChildrenError, match="0 child"):
            run_job(echo_client(Script(decline={0})), 1, config)
        assert "early" not in psf._tables


def test_a_deadline_counts_from_the_start_of_the_job() -> None:
    # deadline_s covers the wait for the children too: with children that take longer than
    # the deadline to come online, the job stops after its first round, not a deadline later.
    class SlowToConnect(RecordingGrid):
        first = True

        def get_node_ids(self) -> list[int]:
            if self.first:
                self.first = False
                time.sleep(0.6)
            return super().get_node_ids()

    config = tiny_config(rounds=0, stop={"deadline_s": 0.5}, final_test=False)
    result, _ = run_job(echo_client(Script()), 2, config, grid_type=SlowToConnect)
    assert len(result.rounds) == 1 and result.stop_reason.startswith("deadline")


def _child_1_leaves_after(kind: str) -> type[RecordingGrid]:
    """A grid on which partition 1 goes offline once the first ``kind`` replies are in."""

    class LeavingGrid(RecordingGrid):
        def receive(self, message_ids: Sequence[str], timeout: float | None) -> Iterator[Message]:
            yield from super().receive(message_ids, timeout)
            if any(e.direction == "in" and e.kind == kind for e in self.events):
                self.offline = {node_of(self, 1)}

    return LeavingGrid


def test_a_child_that_left_is_not_sampled_while_the_others_train() -> None:
    config = tiny_config(rounds=3, final_test=False, evaluate_every=0)
    grid_type = _child_1_leaves_after("train")
    result, _ = run_job(echo_client(Script()), 3, config, grid_type=grid_type)
    assert [r.participants for r in result.rounds] == [
        ["child-0", "child-1", "child-2"],
        ["child-0", "child-2"],
        ["child-0", "child-2"],
    ]
    assert all(not r.excluded for r in result.rounds)  # never sent to, so never failed


def test_a_child_that_left_is_not_asked_to_evaluate() -> None:
    grid_type = _child_1_leaves_after("evaluate")
    result, grid = run_job(echo_client(Script()), 3, tiny_config(rounds=3), grid_type=grid_type)
    gone = node_of(grid, 1)
    asked = [e for e in grid.events if e.direction == "out" and e.kind == "evaluate"]
    assert sum(e.node == gone for e in asked) == 1  # round 1 only, then never again
    assert result.rounds[-1].evaluated == ["child-0", "child-2"]


def test_stop_rule_ends_the_job_before_the_budget() -> None:
    config = tiny_config(rounds=10, stop={"plateau": {"metric": "valid_recall@20", "patience": 2}})
    result, _ = run_job(echo_client(Script()), 2, config)
    # The scripted metric never changes: best at round 1, two stale rounds, stop after round 3.
    assert len(result.rounds) == 3
    assert result.stop_reason.startswith("plateau")
    assert result.rounds[-1].stop_reason == result.stop_reason


# -- the real child app ---------------------------------------------------------------------------


def test_real_children_with_a_decliner_and_a_failure_and_the_saved_encoder(tmp_path: Path) -> None:
    from nodes.child import app as child_app

    def client(msg: Message, ctx: Context) -> Message:
        pid = int(ctx.node_config["partition-id"])
        if pid == 1 and msg.metadata.message_type == "query":  # an encoder type it lacks
            instruction = records.instruction_from_bytes(
                msg.content.config_records[records.FEDENC_KEY][records.INSTRUCTION]
            )
            instruction.encoder.type = "no_such_encoder"
            forged = RecordDict({records.FEDENC_KEY: records.instruction_to_config(instruction)})
            return child_app(_with(msg, forged), ctx)
        if pid == 2 and msg.metadata.message_type == "train":
            raise RuntimeError("disk on fire")
        return child_app(msg, ctx)

    config = tiny_config(rounds=2, checkpoint_dir=tmp_path / "encoder")
    result, _ = run_job(client, 4, config, run_config=dict(TINY_DATA))
    children = {c.name: c for c in result.children}
    assert not children["child-1"].accepted
    assert "unknown encoder type 'no_such_encoder'" in children["child-1"].reason
    assert children["child-0"].num_samples > 0 and children["child-0"].summary["num_sessions"] > 0
    for r in result.rounds:
        assert r.participants == ["child-0", "child-3"]
        assert "disk on fire" in r.excluded["child-2"]
        n0, n3 = children["child-0"].num_samples, children["child-3"].num_samples
        assert r.weights["child-0"] == pytest.approx(n0 / (n0 + n3))
        assert r.loss is not None and r.recall_at_20 is not None and r.mrr_at_20 is not None
        assert 0.0 <= r.mrr_at_20 <= r.recall_at_20 <= 100.0
        assert r.bytes_sent > 0 and r.bytes_received > 0
    assert "test_recall@20" in result.final_metrics
    model, meta = load_checkpoint(tmp_path / "encoder")
    fed = meta["federation"]
    assert fed["job_id"] == result.job_id and fed["rule"] == "weighted_sum"
    assert fed["participants"] == {"1": ["child-0", "child-3"], "2": ["child-0", "child-3"]}
    assert fed["metrics"]["2"]["valid_recall@20"] == result.rounds[-1].recall_at_20
    state = model.state_dict()
    for name, tensor in result.target.items():
        assert torch.equal(state[name], tensor)
    # Children dropped their job state at the end (query.finish).
    from fedenc.federation import child

    assert not [k for k in child.live_states() if k[2] == result.job_id]


def _with(msg: Message, content: RecordDict) -> Message:
    """``msg`` with other content (same metadata), as if the master had sent that."""
    data = fc.message_to_bytes(msg)
    copy = fc.message_from_bytes(data)
    copy.content = content
    return copy


# -- streaming: replies are folded as they arrive ----------------------------------------------

FOLDS: list[tuple[str, float]] = []


@register_fusion_rule("test_spy_weighted_sum")
class SpyWeightedSum(WeightedSum):
    """weighted_sum that records who was folded in, and when."""

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        FOLDS.append((child, time.monotonic()))
        super()._add(child, params, num_samples)

    def _add_rows(
        self, child: str, params: Parameters, num_samples: int, rows: Mapping[str, Any]
    ) -> None:
        FOLDS.append((child, time.monotonic()))
        super()._add_rows(child, params, num_samples, rows)


REVERSED_ARRIVALS = Script(stall_s={0: 0.8, 1: 0.4})  # child-2 answers first, child-0 last


@pytest.mark.parametrize("grid_type", [RecordingGrid, PollingGrid])
def test_child_order_folding_is_bit_identical_whatever_the_arrival_order(
    grid_type: type[RecordingGrid],
) -> None:
    config = tiny_config(rounds=1, final_test=False, evaluate_every=0, rule="test_spy_weighted_sum")
    FOLDS.clear()
    in_order, _ = run_job(echo_client(Script()), 3, config, concurrency=1, grid_type=grid_type)
    assert [c for c, _ in FOLDS] == ["child-0", "child-1", "child-2"]
    FOLDS.clear()
    reversed_, _ = run_job(echo_client(REVERSED_ARRIVALS), 3, config, concurrency=3)
    assert [c for c, _ in FOLDS] == ["child-0", "child-1", "child-2"]
    assert reversed_.rounds[0].held_replies >= 1  # child-2 and child-1 waited for child-0
    for name, tensor in in_order.target.items():
        assert torch.equal(tensor, reversed_.target[name])


def test_arrival_order_folds_each_reply_the_moment_it_comes() -> None:
    config = tiny_config(
        rounds=1,
        final_test=False,
        evaluate_every=0,
        rule="test_spy_weighted_sum",
        fold_order="arrival",
    )
    FOLDS.clear()
    t0 = time.monotonic()
    result, _ = run_job(echo_client(REVERSED_ARRIVALS), 3, config, concurrency=3)
    assert [c for c, _ in FOLDS] == ["child-2", "child-1", "child-0"]
    first_fold = FOLDS[0][1] - t0
    assert first_fold < 0.6  # folded while child-0 (0.8 s) was still training
    assert result.rounds[0].held_replies == 0
    reference, _ = run_job(echo_client(Script()), 3, tiny_config(rounds=1, final_test=False))
    for name, tensor in reference.target.items():
        torch.testing.assert_close(result.target[name], tensor, rtol=1e-6, atol=1e-6)


def test_a_bad_fold_order_is_refused() -> None:
    with pytest.raises(ValueError, match="fold_order must be"):
        tiny_config(fold_order="random")


# -- what is shared ------------------------------------------------------------------------------


class RowSpy(SpyWeightedSum):
    """Records the row weights each child sent."""

    seen: ClassVar[dict[str, dict[str, torch.Tensor]]] = {}

    def _add_rows(
        self, child: str, params: Parameters, num_samples: int, rows: Mapping[str, Any]
    ) -> None:
        RowSpy.seen[child] = dict(rows)
        super()._add_rows(child, params, num_samples, rows)


register_fusion_rule("test_row_spy")(RowSpy)


def test_share_all_federates_the_item_table_row_weighted_by_the_childrens_data() -> None:
    from nodes.child import app as child_app

    RowSpy.seen.clear()
    config = tiny_config(rounds=1, final_test=False, rule="test_row_spy")
    result, _ = run_job(child_app, 2, config, run_config=dict(TINY_DATA))
    assert "embedding.weight" in result.target
    assert set(RowSpy.seen) == {"child-0", "child-1"}
    from fedenc.federation.child_data import ChildDataConfig, load_child_data

    for pid in (0, 1):
        counts = RowSpy.seen[f"child-{pid}"]["embedding.weight"]
        data = load_child_data(
            ChildDataConfig.from_configs(TINY_DATA, {"partition-id": pid, "num-partitions": 2})
        )
        expected = torch.bincount(torch.from_numpy(data.train.items), minlength=61)
        assert torch.equal(counts, expected.double())


def test_share_encoder_keeps_the_item_table_in_the_children() -> None:
    from nodes.child import app as child_app

    config = tiny_config(rounds=1, final_test=False, share="encoder")
    result, _ = run_job(child_app, 2, config, run_config=dict(TINY_DATA))
    assert result.target and not any(n.startswith("embedding.") for n in result.target)
    assert [r.participants for r in result.rounds] == [["child-0", "child-1"]]


def test_rounds_report_the_childrens_own_training_time() -> None:
    from nodes.child import app as child_app

    result, _ = run_job(child_app, 2, tiny_config(rounds=1, final_test=False), dict(TINY_DATA))
    (r,) = result.rounds
    assert r.child_seconds_max is not None and r.child_seconds_sum is not None
    assert 0 < r.child_seconds_max <= r.child_seconds_sum <= 2 * r.child_seconds_max
    assert "child_seconds_max" not in r.metrics  # timings stay out of the reproducible metrics


def test_a_long_wait_for_replies_says_whom_it_waits_for(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from fedenc.federation import master as master_module

    monkeypatch.setattr(master_module, "WAIT_LOG_S", 0.2)
    config = tiny_config(rounds=1, final_test=False)
    with caplog.at_level(logging.INFO, logger="fedenc.federation.master"):
        result, _ = run_job(echo_client(Script(stall_s={1: 1.0})), 2, config, concurrency=2)
    assert result.rounds[0].participants == ["child-0", "child-1"]
    assert "(no limit) for train replies from: child-1" in caplog.text
    assert "replies from: child-0" not in caplog.text


def test_childrens_elastic_and_ps_counters_are_totalled_in_the_rounds_metrics() -> None:
    counters = {
        0: {"elastic_batches": 12.0, "elastic_reassigned": 1.0, "ps_exchanges": 3.0},
        1: {"elastic_batches": 8.0, "ps_exchanges": 2.0, "other": 5.0},
    }
    config = tiny_config(rounds=1, final_test=False)
    result, _ = run_job(echo_client(Script(train_metrics=counters)), 2, config)
    metrics = result.rounds[0].metrics
    assert metrics["elastic_batches"] == 20 and metrics["elastic_reassigned"] == 1
    assert metrics["ps_exchanges"] == 5 and "other" not in metrics


def test_a_child_is_reported_under_its_connections_name_not_the_one_it_claims(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Under mutual TLS the Hello name is the certificate's: a confirmation claiming another
    # child's name made site-b's updates appear as site-a's (and site-a as "site-a#3").
    from types import SimpleNamespace

    from fedenc.federation.master import _Job

    def name(names: dict[int, str] | None, nid: int, claimed: str) -> str:
        grid = SimpleNamespace() if names is None else SimpleNamespace(node_name=names.get)
        job = SimpleNamespace(grid=grid)
        job._transport_name = lambda n: _Job._transport_name(job, n)  # type: ignore[arg-type]
        return _Job._child_name(job, nid, claimed)  # type: ignore[arg-type]

    with caplog.at_level("WARNING", logger="fedenc"):
        assert name({3: "site-b"}, 3, "site-a") == "site-b"
    assert "site-b claims the name 'site-a' in its confirmation" in caplog.text
    # Runtimes that know no names (in-process, Flower's) take the claim, if it is printable.
    assert name(None, 3, "site-a") == "site-a"
    assert name(None, 3, "x\n2026-11-28 INFO forged line") == "node-3"
    assert name(None, 3, "y" * 300) == "node-3"
    assert name({}, 4, "") == "node-4"


def test_evaluation_waits_for_the_round_timeout_or_a_bound_from_the_training_times() -> None:
    # Without a round timeout a child that kept its stream alive but never answered an
    # evaluation held the job forever (and the round's checkpoint with it).
    from types import SimpleNamespace

    from fedenc.federation.master import EVAL_WAIT_FLOOR_S, MasterConfig, _Job

    def timeout(round_timeout: float | None, seconds: dict[str, float]) -> float:
        config = MasterConfig(num_items=10, round_timeout=round_timeout)
        job = SimpleNamespace(config=config, child_seconds=seconds)
        return _Job._evaluation_timeout(job)  # type: ignore[arg-type]

    assert timeout(30.0, {"a": 500.0}) == 30.0
    assert timeout(None, {}) == EVAL_WAIT_FLOOR_S == 600.0
    assert timeout(None, {"a": 10.0, "b": 400.0}) == 1600.0


def test_a_childs_declared_held_out_size_cannot_lift_its_evaluation_weight_past_its_samples() -> (
    None
):
    # The declaration is the child's own word: declaring 10^12 and replying 10^12 must not work.
    from fedenc.federation.master import ChildInfo, _outweighs

    honest = ChildInfo(1, "a", True, num_samples=1000, held_out={"valid": 100})
    assert _outweighs(honest, "valid", 100) is None
    assert "exceeds the valid examples it confirmed (100)" in str(_outweighs(honest, "valid", 101))
    # Within its declaration a reply counts, and the caller weighs it at most by its samples.
    liar = ChildInfo(2, "b", True, num_samples=1000, held_out={"valid": 10**12})
    assert _outweighs(liar, "valid", 10**12) is None
    silent = ChildInfo(3, "c", True, num_samples=1000)  # declared nothing: its samples bound it
    assert "exceeds the training samples it confirmed (1000)" in str(
        _outweighs(silent, "valid", 1001)
    )


def test_a_small_child_with_more_held_out_than_training_samples_counts_capped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # child-0: 10 training samples and 30 declared valid examples (a small site). Its metrics
    # count, weighing its 10 samples (they were left out); child-1 weighs its 20 examples.
    script = Script(
        valid_examples={0: 30},
        eval_metrics={0: {"recall@20": 80.0, "num-examples": 30.0}},
    )
    with caplog.at_level(logging.INFO, logger="fedenc.federation.master"):
        result, _ = run_job(echo_client(script), 2, tiny_config(rounds=2, final_test=False))
    for r in result.rounds:
        assert r.evaluated == ["child-0", "child-1"]
        assert r.metrics["valid_recall@20"] == pytest.approx((80.0 * 10 + 10.0 * 20) / 30)
        assert r.metrics["valid_examples"] == 30
    assert caplog.text.count("child-0's valid metrics weigh 10, its training samples") == 1


def test_publish_best_never_selects_by_the_test_split() -> None:
    from fedenc.federation.master import MasterConfig

    with pytest.raises(ValueError, match="would choose the published round by the test split"):
        MasterConfig(num_items=10, publish="best", eval_split="test")
