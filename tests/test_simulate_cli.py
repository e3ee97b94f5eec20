"""``fedenc simulate``: a complete tiny run through typer's CliRunner writes every output; scenario
files are read (and the shipped ones are valid); bad settings exit 2 with a message."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo  # the first optimizer step imports it: pay that at collection
from typer.testing import CliRunner

from fedenc.cli import app
from fedenc.runtime.simulate import Scenario
from fedenc.training.checkpoint import load_checkpoint

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--synthetic-sessions",
    "400",
    "--synthetic-items",
    "60",
    "--hidden",
    "8",
    "--local-epochs",
    "1",
]


def test_a_tiny_simulation_writes_all_outputs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["simulate", *TINY, "--children", "3", "--rounds", "2", "--partition", "dirichlet"]
    args += ["--lr-decay-step", "7"]
    result = runner.invoke(app, [*args, "--alpha", "1.0", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Recall@20" in result.stdout and "bytes moved" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["encoder"] == "srgnn" and results["rule"] == "weighted_sum"
    assert results["scenario"]["lr_decay_step"] == 7
    assert results["scenario"]["share"] == "all"  # auto, resolved as the job ran it
    assert results["scenario"]["partition"] == "dirichlet" and results["scenario"]["children"] == 3
    assert results["runtime"]["kind"] == "inprocess"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert len(r["participants"]) == 3 and r["bytes_moved"] > 0 and r["seconds"] > 0
        assert r["loss"] is not None and 0 <= r["mrr_at_20"] <= r["recall_at_20"] <= 100
    assert results["stop_reason"].startswith("max_rounds")
    with (out / "rounds.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["round"]) for row in rows] == [1, 2]
    assert float(rows[1]["recall@20"]) == results["rounds"][1]["recall_at_20"]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, meta = load_checkpoint(out / "encoder")
    assert meta["encoder"] == "srgnn" and model.config.hidden == 8
    assert meta["federation"]["rounds"] == 2
    assert set(meta["federation"]["participants"]) == {"1", "2"}
    with torch.no_grad():
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_scenario_file_with_overrides(tmp_path: Path) -> None:
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        "children = 2\nrounds = 5\nhidden = 8\nsynthetic-sessions = 400\nsynthetic-items = 60\n"
        'rule = "mean"\n[rule-options]\n'
    )
    out = tmp_path / "run"
    result = runner.invoke(app, ["simulate", str(scenario), "--rounds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["scenario"]["name"] == "tiny" and results["rule"] == "mean"
    assert len(results["rounds"]) == 1  # the option overrode the file


def test_shipped_scenarios_are_valid() -> None:
    files = sorted((ROOT / "simulations").glob("*.toml"))
    assert any(f.name == "quickstart.toml" for f in files)
    for path in files:
        scenario = Scenario.from_toml(path)
        assert scenario.children >= 1 and scenario.run_config()
    quick = Scenario.from_toml(ROOT / "simulations" / "quickstart.toml")
    assert (quick.children, quick.rounds, quick.data) == (4, 3, None)
    # A relative data path is the file's, so the shipped ones find ../shared/data beside the
    # checkout from any working directory (they were read from the current one).
    digi = Scenario.from_toml(ROOT / "simulations" / "diginetica-iid.toml")
    assert Path(str(digi.data)).resolve() == (ROOT.parent / "shared" / "data" / "diginetica")


def test_a_relative_data_path_in_a_scenario_file_is_read_from_the_files_folder(
    tmp_path: Path,
) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "mine.toml"
    path.write_text('data = "../sets/x"\n')
    assert Scenario.from_toml(path).data == str(tmp_path / "sets" / "x")
    path.write_text(f'data = "{tmp_path / "abs"}"\n')
    assert Scenario.from_toml(path).data == str(tmp_path / "abs")
    # A file written when paths were read from the working directory still finds its data.
    (tmp_path / "here").mkdir()
    path.write_text('data = "here"\n')
    old = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert Scenario.from_toml(path).data == "here"
    finally:
        os.chdir(old)


def test_bad_settings_exit_2_with_a_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("childern = 3\n")
    result = runner.invoke(app, ["simulate", str(bad)])
    assert result.exit_code == 2 and "childern" in result.output
    result = runner.invoke(app, ["simulate", *TINY, "--rule", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "nope" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["simulate", *TINY, "--wait", "300"])
    assert result.exit_code == 2
    assert "--certs, --insecure, --port and --wait apply to --processes only" in result.output


def test_settings_that_could_never_run_are_refused_at_once(tmp_path: Path) -> None:
    cases = {
        "min_children must lie in [1, children = 4], got 10": ["--min-children", "10"],
        "alpha must be a finite number > 0, got 0.0": ["--partition", "dirichlet", "--alpha", "0"],
        "device must be cpu, cuda, cuda:N or auto, got 'tpu'": ["--device", "tpu"],
        "partition must be one of iid, time, dirichlet, got 'x'": ["--partition", "x"],
    }
    for message, options in cases.items():
        result = runner.invoke(app, ["simulate", *TINY, "--children", "4", *options])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert "round 1" not in result.output


def test_scenario_files_name_the_setting_that_is_wrong(tmp_path: Path) -> None:
    typo = tmp_path / "typed.toml"
    typo.write_text('children = "four"\n')
    result = runner.invoke(app, ["simulate", str(typo)])
    assert result.exit_code == 2
    assert "children must be int, got 'four'" in " ".join(result.output.split())
    result = runner.invoke(app, ["simulate", str(tmp_path)])  # a directory
    assert result.exit_code == 2 and "cannot read the scenario file" in result.output
    assert "Traceback" not in result.output
    # The command line's --max-examples is also a scenario key.
    assert Scenario.from_mapping({"max-examples": 100}).max_examples_per_epoch == 100
    # A value a setting refuses names the file and the setting; numpy's words do not reach it.
    for text, said in [
        ("rounds = -2\n", "typed.toml: rounds must be >= 0, got -2"),
        ("seed = -1\n", "typed.toml: seed must be >= 0, got -1"),
        ("hidden = 0\n", "hidden must be >= 1, got 0"),
        ("lr = 0.0\n", "lr must be a finite number > 0 (got 0.0)"),
        ('data = "/no/such/place"\n', "data /no/such/place: no such file or directory"),
    ]:
        typo.write_text(text)
        result = runner.invoke(app, ["simulate", str(typo)])
        assert result.exit_code == 2, (text, result.output)
        assert said in " ".join(result.output.split()), (text, result.output)


def test_master_takes_every_scenario_option_of_simulate() -> None:
    """docs/runtime.md: `fedenc master` takes the options of `fedenc simulate`; only how the
    simulated children run (in workers, on a device, as processes, on which port) is simulate's
    own."""
    import inspect

    from fedenc.cli import master_cmd, simulate_cmd
    from fedenc.federation.master import MasterConfig

    simulate = set(inspect.signature(simulate_cmd).parameters)
    master = set(inspect.signature(master_cmd).parameters)
    assert simulate - master == {"workers", "threads", "device", "processes", "port"}
    run_config = Scenario(query_timeout=7.0, sampling="cyclic").run_config()
    config = MasterConfig.from_run_config({**run_config, "num-items": 10})
    assert (config.query_timeout, config.sampling) == (7.0, "cyclic")


def test_an_interrupted_simulation_resumes_after_its_last_completed_round(tmp_path: Path) -> None:
    from fedenc.runtime.simulate import run_scenario

    out = tmp_path / "run"
    args = ["simulate", *TINY, "--children", "2", "--rounds", "3", "--out", str(out)]
    scenario = Scenario(
        children=2, rounds=3, synthetic_sessions=400, synthetic_items=60, hidden=8
    ).with_overrides(name=Scenario().name)

    def ctrl_c_after_round_1(result: object) -> None:
        if getattr(result, "round", 0) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, out, on_round=ctrl_c_after_round_1)
    assert not (out / "results.json").exists()
    assert list((out / "state" / "children").glob("*/*.pt"))  # the children's saved states
    from fedenc.federation import child

    child.forget()  # as a new process: nothing of the children is left in memory
    result = runner.invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3]  # round 1 from the checkpoint
    assert not list((out / "state" / "children").glob("*/*.pt"))  # the job is over
    # Only simulations ask children to save their state: `fedenc master` builds its run config
    # from the same scenario, and its children are on other machines.
    assert "child-state" not in Scenario().run_config(out)
    # The same encoder as a run that was never interrupted, bit for bit.
    whole = tmp_path / "whole"
    done = runner.invoke(app, [*args[:-1], str(whole)])
    assert done.exit_code == 0, done.output
    again = runner.invoke(app, [*args, "--resume"])  # a finished job: nothing left to train
    assert again.exit_code == 0, again.output
    assert "the job's rounds are complete (round 3" in " ".join(again.output.split())
    resumed, _ = load_checkpoint(out / "encoder")
    uninterrupted, _ = load_checkpoint(whole / "encoder")
    for (name, a), (_, b) in zip(
        resumed.state_dict().items(), uninterrupted.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    refused = runner.invoke(app, ["simulate", *TINY, "--resume"])
    assert refused.exit_code == 2 and "--resume needs the interrupted simulation's --out" in (
        " ".join(refused.output.split())
    )


def _interrupted_after_round_1(out: Path) -> Scenario:
    """A two-round simulation stopped (as by Ctrl-C) after round 1, checkpointed in ``out``."""
    from fedenc.runtime.simulate import run_scenario

    scenario = Scenario(children=2, rounds=2, synthetic_sessions=400, synthetic_items=60, hidden=8)

    def ctrl_c_after_round_1(result: object) -> None:
        if getattr(result, "round", 0) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, out, on_round=ctrl_c_after_round_1)
    return scenario


def test_a_resume_without_the_childrens_saved_state_says_it_will_not_be_exact(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil

    from fedenc.federation import child
    from fedenc.runtime.simulate import missing_child_states, run_scenario

    out = tmp_path / "run"
    scenario = _interrupted_after_round_1(out)
    assert missing_child_states(out / "state") == (0, 2)  # all saved: an exact resume
    shutil.rmtree(out / "state" / "children")  # as a --processes run leaves it
    assert missing_child_states(out / "state") == (2, 2)
    child.forget()
    with caplog.at_level(logging.WARNING, logger="fedenc.runtime.simulate"):
        run_scenario(scenario, out, resume=True)
    flat = " ".join(caplog.text.split())
    assert "the saved state of 2 of the 2 children that trained is missing" in flat
    assert "will differ from an uninterrupted run's" in flat
    assert "this resume with" not in flat  # same threads: nothing to say


def test_a_resume_with_another_thread_count_says_it_will_not_be_bit_for_bit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from fedenc.runtime.simulate import run_scenario

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    scenario = _interrupted_after_round_1(out)
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level(logging.WARNING, logger="fedenc.runtime.simulate"):
            run_scenario(scenario, out, resume=True)
    finally:
        torch.set_num_threads(threads)
    flat = " ".join(caplog.text.split())
    assert f"the interrupted run trained with {{'torch_threads': {threads}," in flat
    assert "about 1e-7 (the order of float sums), not bit for bit" in flat


def test_a_resume_with_the_native_loss_kernels_switched_says_it_will_not_be_bit_for_bit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from fedenc.encoders.layers import native_softmax
    from fedenc.runtime.simulate import run_scenario

    out = tmp_path / "run"
    before = native_softmax.active()
    scenario = _interrupted_after_round_1(out)
    monkeypatch.setenv(native_softmax.ENV_SWITCH, "1" if not before else "0")
    if native_softmax.active() == before:
        pytest.skip("the native kernels cannot be built here: nothing to switch")
    with caplog.at_level(logging.WARNING, logger="fedenc.runtime.simulate"):
        run_scenario(scenario, out, resume=True)
    flat = " ".join(caplog.text.split())
    assert f"'native_loss_kernels': {before}}}, this resume with" in flat
    assert "float rounding (another loss path: about 1e-6 a step), not bit for bit" in flat


def _simulate_with_nan_from_round(
    nan_round: int, rounds: int, out: Path, monkeypatch: pytest.MonkeyPatch
) -> Any:
    """``fedenc simulate`` with a FedAvg whose target turns NaN from round ``nan_round``."""
    from fedenc.federation.fusion import registry
    from fedenc.federation.fusion.weighted_sum import WeightedSum
    from fedenc.federation.parameters import Parameters

    class NanFrom(WeightedSum):
        def _fuse(self) -> Parameters:
            out = super()._fuse()
            if (self.round or 0) >= nan_round:
                first = next(iter(out))
                out[first] = out[first] * float("nan")
            return out

    registry._load()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    registry.register_fusion_rule("nan_out")(NanFrom)
    args = ["simulate", *TINY, "--rule", "nan_out", "--rounds", str(rounds), "--out", str(out)]
    return runner.invoke(app, args)


def test_a_fusion_rule_that_returns_nan_stops_the_run_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    result = _simulate_with_nan_from_round(1, 2, out, monkeypatch)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "fusion rule 'nan_out' returned a bad target in round 1" in flat
    assert "NaN/Inf" in flat and "Traceback" not in result.output
    assert not (out / "encoder").exists()
    assert not (out / "results.json").exists()  # no round done: nothing to keep


def test_a_run_that_fails_after_some_rounds_keeps_their_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    result = _simulate_with_nan_from_round(2, 3, out, monkeypatch)
    assert result.exit_code == 2, result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["state"] == "failed" and "round 2" in saved["error"]
    assert [r["round"] for r in saved["rounds"]] == [1]
    # Resumed (from round 1's checkpoint) and failing again: round 1 still in the record.
    (out / "results.json").unlink()
    again = runner.invoke(
        app,
        ["simulate", *TINY, "--rule", "nan_out", "--rounds", "3", "--out", str(out), "--resume"],
    )
    assert again.exit_code == 2, again.output
    assert [r["round"] for r in json.loads((out / "results.json").read_text())["rounds"]] == [1]
    assert saved["scenario"]["rule"] == "nan_out"
    with (out / "rounds.csv").open() as f:
        assert [row["round"] for row in csv.DictReader(f)] == ["1"]
    assert not (out / "encoder").exists()


def test_sigterm_says_how_to_resume_and_resume_says_where_it_continues_from(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedenc.cli", "simulate", *TINY, "--rounds", "200"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "state").is_dir() or not any((out / "state").iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "no round checkpointed"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output
    flat = " ".join(output.split())
    assert f"interrupted: the rounds done are checkpointed in {out / 'state'}" in flat
    resumed = runner.invoke(
        app, ["simulate", *TINY, "--rounds", "2", "--out", str(out), "--resume"]
    )
    assert "the master and the simulated children continue from" in " ".join(resumed.output.split())


def test_an_encoder_option_the_encoder_does_not_read_is_refused(tmp_path: Path) -> None:
    scenario = tmp_path / "typo.toml"
    scenario.write_text('encoder = "srgnn"\n[encoder-options]\nfoo = 1\n')
    result = runner.invoke(app, ["simulate", str(scenario), *TINY, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    assert "encoder 'srgnn' has no option 'foo'" in " ".join(result.output.split())


def test_evaluate_says_when_a_federated_checkpoint_lacks_the_childrens_heads(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    args = ["simulate", *TINY, "--rounds", "1", "--share", "encoder", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    _, meta = load_checkpoint(out / "encoder")
    assert meta["federation"]["local_parameters"] == ["embedding.weight"]
    data = ["--synthetic-sessions", "400", "--synthetic-items", "60"]
    scored = runner.invoke(app, ["evaluate", str(out / "encoder"), *data])
    assert scored.exit_code == 0, scored.output
    assert "embedding.weight (the children's local heads)" in " ".join(scored.output.split())
    # Recommendations from that table would mislead as much: said too (on stderr, beside JSON).
    listed = runner.invoke(app, ["recommend", str(out), "1,2", "--json"])
    assert listed.exit_code == 0, listed.output
    assert "embedding.weight (the children's local heads)" in " ".join(listed.output.split())


def test_evaluate_takes_a_run_directory_and_its_data_settings(tmp_path: Path) -> None:
    # `fedenc evaluate runs/x` on a simulation's output: the encoder is in runs/x/encoder and
    # the data settings come from its results.json (the defaults would be another data set).
    out = tmp_path / "run"
    assert (
        runner.invoke(app, ["simulate", *TINY, "--rounds", "1", "--out", str(out)]).exit_code == 0
    )
    data = ["--synthetic-sessions", "400", "--synthetic-items", "60"]
    explicit = runner.invoke(
        app, ["evaluate", str(out / "encoder"), *data, "--json", str(tmp_path / "a.json")]
    )
    assert explicit.exit_code == 0, explicit.output
    bare = runner.invoke(app, ["evaluate", str(out), "--json", str(tmp_path / "b.json")])
    assert bare.exit_code == 0, bare.output
    assert "synthetic-items = 60" in bare.output
    a = json.loads((tmp_path / "a.json").read_text())["test"]
    b = json.loads((tmp_path / "b.json").read_text())["test"]
    assert {k: v for k, v in a.items() if "@" in k} == {k: v for k, v in b.items() if "@" in k}


def test_a_misspelt_scenario_key_gets_the_closest_kebab_case_one(tmp_path: Path) -> None:
    scenario = tmp_path / "typo.toml"
    scenario.write_text("local-epoch = 2\n")
    result = runner.invoke(app, ["simulate", str(scenario), *TINY, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "unknown setting 'local-epoch'; did you mean 'local-epochs'?" in text
    assert "batch-size" in text and "batch_size" not in text


def test_evaluate_does_not_guess_a_runs_relative_data_path(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert (
        runner.invoke(app, ["simulate", *TINY, "--rounds", "1", "--out", str(out)]).exit_code == 0
    )
    results = json.loads((out / "results.json").read_text())
    results["scenario"]["data"] = "data/diginetica"  # as a run started elsewhere recorded it
    (out / "results.json").write_text(json.dumps(results))
    refused = runner.invoke(app, ["evaluate", str(out)])
    assert refused.exit_code == 2
    assert "relative to where it ran: give --data" in " ".join(refused.output.split())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"children": "3"}, "children must be int, got '3'"),
        ({"hidden": 16.0}, "hidden must be int, got 16.0"),
        ({"lr": "0.001"}, "lr must be float, got '0.001'"),
    ],
)
def test_a_scenario_built_in_python_names_a_setting_of_the_wrong_type(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Scenario(**settings)  # type: ignore[arg-type]
    assert Scenario(lr=1).lr == 1  # an int where a float goes is a number
