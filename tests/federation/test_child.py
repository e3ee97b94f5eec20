"""The child's handlers: declines with reasons, state kept across rounds, only shared tensors
leave, bad parameters refused, the state dropped at the end of the job; and the data partition is
the same for the same settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo  # the first optimizer step imports it: pay that at collection
from flwr.app import Context, Message, RecordDict

from fedenc.encoders.registry import build_encoder
from fedenc.federation import child, records
from fedenc.federation.child_data import ChildDataConfig, load_child_data
from fedenc.planner.cost import CACHE_ENV
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.runtime import flower_compat as fc
from fedenc.training.config import TrainConfig

RUN_CONFIG = {"synthetic-sessions": 400, "synthetic-items": 60, "seed": 0}


def context(pid: int = 0, k: int = 2, run_id: int = 77, **run_config: Any) -> Context:
    return Context(
        run_id=run_id,
        node_id=pid + 2,
        node_config={"partition-id": pid, "num-partitions": k},
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run_config},
    )


def instruction(encoder: str = "srgnn", num_items: int = 60, job: str = "job-1") -> Any:
    model = build_encoder("srgnn", num_items, hidden=8)
    state = model.state_dict()
    shared = {n: state[n] for n in model.shared_parameter_names()}
    spec = records.encoder_spec("srgnn", model.config, shared)
    spec.type = encoder
    return fpb.TrainingInstruction(
        job_id=job,
        encoder=spec,
        training=records.training_config_to_proto(TrainConfig(epochs=1, batch_size=50)),
        round_budget=3,
    ), shared


def send(content: RecordDict, kind: str, ctx: Context) -> Message:
    with fc.task_identity(ctx.run_id):
        msg = Message(content, ctx.node_id, kind)
    fc.set_message_id(msg, f"ins-{kind}")
    return fc.message_from_bytes(fc.message_to_bytes(msg))


def query(ctx: Context, ins: Any) -> fpb.Confirmation:
    reply = child.handle_query(send(records.query_content(ins), "query", ctx), ctx)
    return records.read_confirmation(reply.content)[0]


@pytest.fixture(autouse=True)
def _clean() -> Any:
    # An interrupted job elsewhere in this process keeps its children's states for --resume.
    child.forget()
    yield
    child.forget()


def test_unknown_encoder_type_and_small_catalog_are_declined_with_reasons() -> None:
    ins, _ = instruction(encoder="no_such_encoder")
    conf = query(context(), ins)
    assert not conf.accepted and "unknown encoder type 'no_such_encoder'" in conf.decline_reason
    ins, _ = instruction(num_items=30)
    conf = query(context(), ins)
    assert not conf.accepted and "catalog" in conf.decline_reason
    bad = context(**{"valid-fraction": 1.0})
    conf = query(bad, instruction()[0])
    assert not conf.accepted
    assert "bad data settings: valid-fraction must lie in [0, 1), got 1.0" in conf.decline_reason
    assert child.live_states() == []


def test_bad_data_files_are_declined_naming_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "clicks.csv"
    bad.write_text("sessionId;userId;itemId;timeframe;eventdate\n1;;x;0;2016-05-01\n")
    ins, _ = instruction()
    conf = query(context(data=str(bad)), ins)
    assert not conf.accepted
    assert conf.decline_reason.startswith("cannot read its data: ")
    assert "clicks.csv, line 2" in conf.decline_reason
    missing = tmp_path / "nowhere"
    conf = query(context(data=str(missing)), ins)
    assert not conf.accepted and "nowhere" in conf.decline_reason


def test_confirm_train_evaluate_finish_keeps_state_and_sends_only_shared_tensors() -> None:
    ctx = context()
    ins, shared = instruction()
    conf = query(ctx, ins)
    assert conf.accepted and conf.num_samples > 0 and conf.summary.num_sessions > 0
    (key,) = child.live_states()
    state = child._states[key]
    head_before = state.model.embedding.weight.detach().clone()
    trainer = state.trainer

    for round_ in (1, 2):
        content = records.round_content(records.params_to_record(shared), ins, round_)
        reply = child.handle_train(send(content, "train", ctx), ctx)
        sent = records.record_to_params(reply.content["arrays"], "child")
        assert list(sent) == list(shared)  # shared tensors only, in order: no embedding
        assert records.read_num_examples(reply.content, "child") == conf.num_samples
        assert records.read_metrics(reply.content)["train_loss"] > 0
    assert child._states[key].trainer is trainer and trainer.epochs_done == 2
    assert not torch.equal(state.model.embedding.weight, head_before)  # the head trains locally

    content = records.round_content(records.params_to_record(shared), ins, 2, split="test")
    reply = child.handle_evaluate(send(content, "evaluate", ctx), ctx)
    metrics = records.read_metrics(reply.content)
    assert metrics[records.NUM_EXAMPLES] > 0 and 0 <= metrics["mrr@20"] <= metrics["recall@20"]
    for name, tensor in shared.items():  # evaluation used the received parameters
        assert torch.equal(state.model.state_dict()[name], tensor)

    child.handle_finish(send(records.finish_content(ins.job_id), "query.finish", ctx), ctx)
    assert child.live_states() == []


def test_train_refuses_parameters_that_do_not_fit_the_model() -> None:
    ctx = context()
    ins, shared = instruction()
    assert query(ctx, ins).accepted
    name = next(iter(shared))
    bad = {**shared, name: torch.zeros(2, 2)}
    content = records.round_content(records.params_to_record(bad), ins, 1)
    with pytest.raises(ValueError, match="shape"):
        child.handle_train(send(content, "train", ctx), ctx)


def test_a_round_message_without_state_rebuilds_it_from_the_instruction() -> None:
    ctx = context(pid=1)
    ins, shared = instruction()
    content = records.round_content(records.params_to_record(shared), ins, 1)
    reply = child.handle_train(send(content, "train", ctx), ctx)
    assert records.read_num_examples(reply.content, "child") > 0
    assert len(child.live_states()) == 1


def test_same_settings_give_the_same_partition() -> None:
    cfg = ChildDataConfig(
        partition_id=1,
        num_partitions=3,
        scheme="dirichlet",
        alpha=0.5,
        seed=4,
        synthetic_sessions=400,
        synthetic_items=60,
    )
    a, b = load_child_data(cfg), load_child_data(cfg)
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, split).items, getattr(b, split).items)
    others = [
        load_child_data(ChildDataConfig(**{**cfg.__dict__, "partition_id": p})) for p in (0, 2)
    ]
    total = len(a.train) + sum(len(o.train) for o in others)
    assert total == 400 - len(a.test) - len(a.valid) - sum(
        len(o.test) + len(o.valid) for o in others
    )


def test_a_childs_own_plan_drives_its_training_and_named_plans_refuse_the_ps(
    caplog: pytest.LogCaptureFixture, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `fedenc child --plan auto` (its default): the plan is chosen on the child's machine before
    # the first round, logged with the reason, and kept; the master's instruction has no say.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # a fresh per-machine plan cache
    ctx = context()
    ctx.node_config["plan"] = "auto"
    ins, shared = instruction()
    assert query(ctx, ins).accepted
    (key,) = child.live_states()
    trainer = child._states[key].trainer
    assert trainer.config.plan == "auto" and trainer.plan is None
    with caplog.at_level("INFO", logger="fedenc.federation.child"):
        for round_ in (1, 2):
            content = records.round_content(records.params_to_record(shared), ins, round_)
            reply = child.handle_train(send(content, "train", ctx), ctx)
            assert records.read_metrics(reply.content)["train_loss"] > 0
    assert trainer.plan is not None
    assert sum("plan:" in r.getMessage() for r in caplog.records) == 1, caplog.text
    # A named plan cannot drive the two-level PS trainer: declined with the reason.
    ps = context(run_id=78, ps="local")
    ps.node_config["plan"] = "cpu-t1-c4096"
    conf = query(ps, ins)
    assert not conf.accepted and "cannot drive the two-level PS trainer" in conf.decline_reason


def test_a_master_cannot_make_a_child_save_its_state(tmp_path: Path) -> None:
    # child-state is the child's own setting (simulate gives it to its in-process children):
    # from the run config, i.e. from a master, it is ignored and nothing is written.
    ctx = context(**{"child-state": True, "out-dir": str(tmp_path)})
    ins, shared = instruction()
    assert query(ctx, ins).accepted
    content = records.round_content(records.params_to_record(shared), ins, 1)
    child.handle_train(send(content, "train", ctx), ctx)
    assert not list(tmp_path.rglob("*.pt"))
    own = context(pid=1, **{"out-dir": str(tmp_path)})
    own.node_config["child-state"] = True
    assert query(own, ins).accepted
    child.handle_train(send(content, "train", own), own)
    assert [p.name for p in tmp_path.rglob("*.pt")] == ["1.pt"]


def _planner_threads() -> int:
    import threading

    return sum(t.name.startswith("planner-") for t in threading.enumerate())


def test_a_dropped_or_replaced_state_stops_its_planned_trainers_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long-lived child (`fedenc child --stay`) runs job after job: each planned trainer's
    # worker threads must end with its job, when a new instruction replaces the state, and
    # when the state is forgotten.
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    before = _planner_threads()
    ctx = context()
    ctx.node_config["plan"] = "cpu-t1-c64-s2"
    ins, shared = instruction()
    for job in ("job-1", "job-2"):
        ins.job_id = job
        assert query(ctx, ins).accepted
        content = records.round_content(records.params_to_record(shared), ins, 1)
        child.handle_train(send(content, "train", ctx), ctx)
        assert _planner_threads() > before
        child.handle_finish(send(records.finish_content(job), "query.finish", ctx), ctx)
        assert child.live_states() == [] and _planner_threads() == before
    # Another instruction under the same job id replaces the state: the old trainer closes.
    assert query(ctx, ins).accepted
    child.handle_train(send(records.round_content(records.params_to_record(shared), ins, 1),
                            "train", ctx), ctx)  # fmt: skip
    running = _planner_threads()
    ins.round_budget = 4
    assert query(ctx, ins).accepted
    assert _planner_threads() < running
    child.forget()
    assert _planner_threads() == before


def test_an_unreadable_saved_state_restores_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A saved state whose model loads but whose optimizer does not must not leave a child with
    # the saved weights and a fresh optimizer: all of it starts afresh, as the log says.
    own = context(**{"out-dir": str(tmp_path)})
    own.node_config["child-state"] = True
    ins, shared = instruction()
    assert query(own, ins).accepted
    child.handle_train(
        send(records.round_content(records.params_to_record(shared), ins, 1), "train", own), own
    )
    (path,) = tmp_path.rglob("*.pt")
    payload = torch.load(path, weights_only=True)
    payload["after"]["optimizer"] = {"state": {}}  # no param_groups: load_state_dict fails
    torch.save(payload, path)
    child.forget()
    with caplog.at_level("WARNING", logger="fedenc.federation.child"):
        assert query(own, ins).accepted
    assert "starting afresh" in caplog.text
    (key,) = child.live_states()
    state = child._states[key]
    rebuilt = context(pid=0, run_id=79)
    assert query(rebuilt, ins).accepted
    other = next(child._states[k] for k in child.live_states() if k[0] == 79)
    for name, tensor in other.model.state_dict().items():  # the same fresh start
        assert torch.equal(state.model.state_dict()[name], tensor), name
    assert state.last_round == 0 and state.trainer.epochs_done == 0


def test_the_seed_drives_the_childrens_local_heads_and_dropout_too(tmp_path: Path) -> None:
    # With share = "encoder" each child draws its own item table, and dropout draws masks every
    # step: both from the job's seed, or the same seed would not give the same encoder.
    from fedenc.runtime.simulate import Scenario, run_scenario
    from fedenc.training.checkpoint import load_checkpoint

    def published(seed: int, out: str) -> dict[str, torch.Tensor]:
        scenario = Scenario(
            children=2, hidden=8, rounds=2, synthetic_sessions=400, synthetic_items=60,
            batch_size=50, share="encoder", encoder_options={"dropout": 0.3}, seed=seed,
        )  # fmt: skip
        outcome = run_scenario(scenario, tmp_path / out)
        model, meta = load_checkpoint(outcome.files["checkpoint"])
        return {n: model.state_dict()[n] for n in meta["shared_parameters"]}

    first, again, other = published(3, "a"), published(3, "b"), published(4, "c")
    assert list(first) == list(again) and "embedding.weight" not in first
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert any(not torch.equal(first[n], other[n]) for n in first)
