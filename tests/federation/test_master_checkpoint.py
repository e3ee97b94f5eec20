"""The master's job checkpoint (fedenc.federation.checkpoint): atomic replacement, every fusion
rule's and stop rule's state through a write and a read, and refusals of a checkpoint that
belongs to another job or configuration."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from damage import flip_a_data_byte

from fedenc.federation.checkpoint import (
    SETTINGS_SINCE,
    MasterState,
    MasterStateError,
    capture_rng,
    check_resumable,
    config_fingerprint,
    read_master_state,
    restore_rng,
    state_path,
    write_master_state,
)
from fedenc.federation.fusion import available_fusion_rules, build_fusion_rule
from fedenc.federation.master import MasterConfig
from fedenc.federation.stopping import RoundReport, build_stop_rule


def params(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(6, 4, generator=g) * scale,
        "b": torch.randn(4, generator=g) * scale,
        "count": torch.tensor([seed % 5], dtype=torch.int64),
    }


def state(round_: int, **overrides: Any) -> MasterState:
    values: dict[str, Any] = {
        "job_id": "job-1",
        "run_id": 42,
        "round": round_,
        "config": config_fingerprint(MasterConfig(num_items=60, job_id="job-1")),
        "target": params(round_),
        "rule": {"rule": "weighted_sum"},
        "stop": {},
        **overrides,
    }
    return MasterState(**values)


def test_a_checkpoint_is_replaced_atomically_while_it_is_read(tmp_path: Path) -> None:
    write_master_state(tmp_path, state(0))
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            try:
                seen.append(read_master_state(tmp_path).round)
            except BaseException as err:  # a torn file would land here
                errors.append(err)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for round_ in range(1, 40):
            write_master_state(tmp_path, state(round_))
    finally:
        done.set()
        thread.join(30)
    assert errors == []
    assert seen and seen == sorted(seen)  # every read saw a whole checkpoint, never older ones
    assert read_master_state(tmp_path).round == 39
    assert [p.name for p in tmp_path.iterdir()] == ["master.pt"]  # no temporary file left


def test_a_torn_temporary_file_of_a_killed_writer_is_ignored(tmp_path: Path) -> None:
    write_master_state(tmp_path, state(3))
    whole = state_path(tmp_path).read_bytes()
    (tmp_path / ".master.pt.x1y2.tmp").write_bytes(whole[: len(whole) // 2])  # killed mid-write
    back = read_master_state(tmp_path)
    assert back.round == 3 and back.run_id == 42
    assert torch.equal(back.target["w"], params(3)["w"])
    assert back.target["count"].dtype == torch.int64


@pytest.mark.parametrize("name", available_fusion_rules())
def test_every_fusion_rule_continues_identically_after_a_write_and_a_read(
    name: str, tmp_path: Path
) -> None:
    rule = build_fusion_rule(name)
    target = params(0)

    def run_round(r: Any, round_: int, current: dict[str, torch.Tensor]) -> Any:
        r.begin(round_, current)
        for child in range(5):  # enough for krum / multi_krum / trimmed rules
            r.add(f"c{child}", params(100 * round_ + child, scale=0.5 + child / 10), 10 + child)
        return r.result()

    for round_ in (1, 2):
        target = run_round(rule, round_, target)
    write_master_state(tmp_path, state(2, target=target, rule=rule.state_dict()))
    back = read_master_state(tmp_path)
    resumed = build_fusion_rule(name)
    resumed.load_state_dict(back.rule)
    expected = run_round(rule, 3, target)
    got = run_round(resumed, 3, back.target)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), (name, key)
    if name in ("fedadam", "fedyogi", "fedavgm"):
        assert back.rule["steps"] == 2 and "m" in back.rule  # the moments did travel


def test_stop_rules_continue_identically_after_a_write_and_a_read(tmp_path: Path) -> None:
    spec = "max_rounds=50,plateau=valid_recall@20:3,relative_change=0.0001"
    rule = build_stop_rule(spec)

    def report(round_: int) -> RoundReport:
        recall = [10.0, 12.0, 12.5, 12.4, 12.3, 12.2, 12.1][round_ - 1]
        return RoundReport(
            round=round_,
            participants=["a"],
            num_samples=1,
            metrics={"valid_recall@20": recall},
            param_change=0.5,
            seconds=1.0,
        )

    for round_ in (1, 2, 3, 4):
        assert rule.update(report(round_)) is None
    write_master_state(tmp_path, state(4, stop=rule.state_dict()))
    resumed = build_stop_rule(spec)
    resumed.load_state_dict(read_master_state(tmp_path).stop)
    for round_ in (5, 6):
        assert resumed.update(report(round_)) == rule.update(report(round_))
    assert rule.update(report(7)) is not None  # the plateau did end it: the state mattered


def test_the_rng_state_of_the_master_process_round_trips(tmp_path: Path) -> None:
    import random

    import numpy as np

    write_master_state(tmp_path, state(1, rng=capture_rng()))
    expected = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    restore_rng(read_master_state(tmp_path).rng)
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all()
    assert expected[2] == got[2]


def test_a_checkpoint_of_another_job_or_configuration_is_refused(tmp_path: Path) -> None:
    base = MasterConfig(num_items=60, job_id="job-1", rule="fedadam", seed=3)
    write_master_state(tmp_path, state(2, config=config_fingerprint(base)))
    saved = read_master_state(tmp_path)
    check_resumable(saved, "job-1", config_fingerprint(base))
    check_resumable(saved, "", config_fingerprint(base))  # no job id given: take the saved one
    # Waiting and timeouts do not change the result: a resume may set them differently.
    patient = MasterConfig(
        num_items=60, job_id="job-1", rule="fedadam", seed=3, round_timeout=9, wait_timeout=1
    )
    check_resumable(saved, "job-1", config_fingerprint(patient))
    with pytest.raises(MasterStateError, match="checkpoint is of job 'job-1', not 'job-2'"):
        check_resumable(saved, "job-2", config_fingerprint(base))
    other = MasterConfig(num_items=60, job_id="job-1", rule="weighted_sum", seed=4)
    with pytest.raises(MasterStateError) as info:
        check_resumable(saved, "job-1", config_fingerprint(other))
    text = str(info.value)
    assert "another configuration" in text
    assert "rule: checkpoint 'fedadam', now 'weighted_sum'" in text
    assert "seed: checkpoint 3, now 4" in text
    lr = MasterConfig(num_items=60, job_id="job-1", rule="fedadam", seed=3)
    lr.train.lr = 0.5
    with pytest.raises(MasterStateError, match=r"train\.lr: checkpoint 0\.001, now 0\.5"):
        check_resumable(saved, "job-1", config_fingerprint(lr))


def test_missing_or_foreign_files_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MasterStateError, match=r"no master checkpoint in .*nothing to resume"):
        read_master_state(tmp_path)
    torch.save({"weights": torch.zeros(2)}, state_path(tmp_path))
    with pytest.raises(MasterStateError, match="not a fedenc master checkpoint"):
        read_master_state(tmp_path)
    state_path(tmp_path).write_bytes(b"garbage")
    with pytest.raises(MasterStateError, match="cannot read the master checkpoint"):
        read_master_state(tmp_path)
    # A pickle with code in it: refused in one line, without torch's advice to trust the file.
    torch.save({"format": print}, state_path(tmp_path))
    with pytest.raises(MasterStateError, match="corrupt, truncated or not one") as err:
        read_master_state(tmp_path)
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_master_checkpoint_is_refused_not_resumed_from(tmp_path: Path) -> None:
    # torch reads a flipped byte as a wrong weight, without an error: the CRCs must catch it.
    write_master_state(tmp_path, state(3))
    flip_a_data_byte(state_path(tmp_path))
    with pytest.raises(MasterStateError, match="is damaged"):
        read_master_state(tmp_path)


def test_resume_needs_a_state_directory() -> None:
    with pytest.raises(ValueError, match="resume needs a state directory"):
        MasterConfig(num_items=60, resume=True)
    resumed = MasterConfig(num_items=60, resume=True, state_dir=Path("s"))
    assert resumed.job_id == ""  # taken from the checkpoint when the job resumes


def test_carried_optimizer_moments_round_trip_and_old_checkpoints_still_load(
    tmp_path: Path,
) -> None:
    carried = {"w/step": torch.tensor(12.0), "w/exp_avg": torch.randn(3, 2)}
    carried["w/exp_avg_sq"] = torch.rand(3, 2)
    write_master_state(tmp_path, state(2, carried=carried))
    back = read_master_state(tmp_path)
    assert back.carried.keys() == carried.keys()
    assert all(torch.equal(back.carried[k], v) for k, v in carried.items())
    # A checkpoint written before carry_optimizer existed has no "carried" entry.
    path = tmp_path / "master.pt"
    payload = torch.load(path, weights_only=True)
    del payload["carried"]
    torch.save(payload, path)
    assert read_master_state(tmp_path).carried == {}


def test_the_federation_table_round_trips_and_old_checkpoints_still_load(tmp_path: Path) -> None:
    rows = torch.randn(61, 8)
    write_master_state(tmp_path, state(2, ps_rows={"rows": rows}))
    assert torch.equal(read_master_state(tmp_path).ps_rows["rows"], rows)
    path = tmp_path / "master.pt"
    payload = torch.load(path, weights_only=True)
    del payload["ps_rows"]  # written before placement b's table was saved
    torch.save(payload, path)
    assert read_master_state(tmp_path).ps_rows == {}


def test_the_best_round_round_trips_and_old_checkpoints_resume_as_publish_last(
    tmp_path: Path,
) -> None:
    best = {"round": 2, "value": 41.5, "target": params(2)}
    write_master_state(tmp_path, state(3, best=best))
    back = read_master_state(tmp_path).best
    assert back["round"] == 2 and back["value"] == 41.5
    assert all(torch.equal(back["target"][k], v) for k, v in best["target"].items())
    # Written before publish and min_samples existed (session 11's checkpoints): no "best", and
    # a fingerprint without those keys, which resumes as every job then ran.
    path = tmp_path / "master.pt"
    payload = torch.load(path, weights_only=True)
    del payload["best"]
    for key in SETTINGS_SINCE:
        del payload["config"][key]
    torch.save(payload, path)
    old = read_master_state(tmp_path)
    assert old.best == {}
    check_resumable(old, "job-1", config_fingerprint(MasterConfig(num_items=60, job_id="job-1")))
    with pytest.raises(MasterStateError, match="publish"):
        now = config_fingerprint(MasterConfig(num_items=60, job_id="job-1", publish="best"))
        check_resumable(old, "job-1", now)


def test_every_setting_added_since_the_first_checkpoints_resumes_old_ones() -> None:
    # A MasterConfig field that joins the fingerprint makes every older checkpoint "another
    # configuration": it needs its old value in SETTINGS_SINCE (or to be operational).
    from dataclasses import fields

    from fedenc.federation.checkpoint import OPERATIONAL

    first = set(
        "balance_work carry_optimizer checkpoint_dir encoder encoder_options eval_split "
        "evaluate_every expect_children final_test fold_order fraction job_id min_children "
        "num_items ps ps_addresses ps_shards query_timeout resume round_timeout rounds "
        "row_weighting rule rule_options sampling seed share state_dir stop train "
        "wait_timeout work_deadline".split()
    )
    added = {f.name for f in fields(MasterConfig)} - first - OPERATIONAL
    assert added <= set(SETTINGS_SINCE), sorted(added - set(SETTINGS_SINCE))
    defaults = config_fingerprint(MasterConfig(num_items=60))
    assert {k: defaults[k] for k in SETTINGS_SINCE} == SETTINGS_SINCE
