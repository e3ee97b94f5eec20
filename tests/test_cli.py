"""The ``fedenc`` command line, driven through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch._dynamo  # the first optimizer step imports it (~2 s): pay that at collection
from typer.testing import CliRunner

from fedenc.cli import app
from fedenc.data.batching import batch_from_sessions
from fedenc.training.checkpoint import load_checkpoint

runner = CliRunner()
TINY = ["--synthetic-sessions", "400", "--synthetic-items", "50", "--hidden", "8", "--epochs", "1"]
TINY_DATA = ["--synthetic-sessions", "400", "--synthetic-items", "50"]


def flat(text: str) -> str:
    """Output with line breaks and wrapping removed (rich wraps at the console width)."""
    return "".join(text.split())


def test_version_needs_no_command() -> None:
    from fedenc import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == __version__


def test_a_bad_native_kernels_switch_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDENC_NATIVE_SOFTMAX", "maybe")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--synthetic", *TINY, "--out", str(out)])
    assert result.exit_code == 2
    assert "FEDENC_NATIVE_SOFTMAX='maybe': use 1 (on) or 0 (off)" in " ".join(result.output.split())
    assert not out.exists()


def test_encoders_lists_the_three_types() -> None:
    result = runner.invoke(app, ["encoders"])
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines() if line.strip()]
    assert names == ["edge_attn", "skip_rnn", "srgnn"]


def test_train_refuses_an_unwritable_out_and_a_bad_scale_before_training(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, ["train", "--synthetic", *TINY, "--out", str(afile)])
    assert result.exit_code == 2
    assert flat(f"--out {afile} is a file, not a directory") in flat(result.output)
    assert "epoch" not in result.output  # refused before any training
    for scale in ("0", "nan", "-5"):
        result = runner.invoke(app, ["train", "--synthetic", *TINY, "--scale", scale])
        assert result.exit_code == 2
        assert flat("scale must be a finite number > 0") in flat(result.output)
    result = runner.invoke(app, ["train", "--synthetic", *TINY, "--lr", "inf"])
    assert result.exit_code == 2 and flat("lr must be a finite number > 0") in flat(result.output)


def test_train_synthetic_writes_results_and_a_loadable_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--synthetic", *TINY, "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["encoder"] == "srgnn"
    assert results["encoder_config"]["hidden"] == 8
    assert results["encoder_config"]["num_items"] == 50
    assert results["train_config"]["epochs"] == 1
    assert len(results["history"]) == 1 and results["best_epoch"] == 1
    test = results["test"]
    assert test["examples"] == results["data"]["test_examples"] > 0
    for key in ("recall@20", "mrr@20", "recall@10", "mrr@10"):
        assert 0.0 <= test[key] <= 100.0, key
    assert test["mrr@20"] <= test["recall@20"]

    model, meta = load_checkpoint(out)
    assert meta["encoder"] == "srgnn" and model.config.hidden == 8
    assert meta["train"]["test"] == test
    # fedenc evaluate scores the saved encoder on the same data to the same numbers.
    scored = tmp_path / "scored.json"
    again = runner.invoke(app, ["evaluate", str(out), *TINY_DATA, "--json", str(scored)])
    assert again.exit_code == 0, again.output
    metrics = json.loads(scored.read_text())["test"]
    for key in ("recall@20", "mrr@20", "recall@10", "mrr@10", "examples"):
        assert metrics[key] == pytest.approx(test[key], abs=1e-9), key
    other = runner.invoke(app, ["evaluate", str(out), "--synthetic-items", "400"])
    assert other.exit_code == 2 and "not the data it was trained on" in other.output
    # The run's own data settings are recorded: no options give the same data and numbers.
    assert results["run_config"] == {
        "synthetic-sessions": 400,
        "synthetic-items": 50,
        "seed": 0,
        "valid-fraction": 0.1,
    }
    alone = runner.invoke(app, ["evaluate", str(out), "--json", str(scored)])
    assert alone.exit_code == 0, alone.output
    rescored = json.loads(scored.read_text())["test"]
    for key in ("recall@20", "mrr@20", "recall@10", "mrr@10", "examples"):
        assert rescored[key] == metrics[key], key
    # Without them (an older run), the default synthetic set is not silently scored.
    del results["run_config"]
    (out / "results.json").write_text(json.dumps(results))
    unknown = runner.invoke(app, ["evaluate", str(out)])
    assert unknown.exit_code == 2
    assert flat("records no data settings") in flat(unknown.output)
    if not torch.cuda.is_available():  # before the data load, not a traceback after it
        gpu = runner.invoke(app, ["evaluate", str(out), "--device", "cuda"])
        assert gpu.exit_code == 2 and "CUDA is not available here" in gpu.output
    # The same --out again: said before the work, not found out after it.
    rerun = runner.invoke(app, ["train", "--synthetic", *TINY, "--out", str(out), "-q"])
    assert rerun.exit_code == 0, rerun.output
    assert flat("holds an earlier run's results.json, meta.json: this run replaces them") in flat(
        rerun.output
    )
    with torch.no_grad():
        scores = model.eval()(batch_from_sessions([[1, 2, 3], [50]]))
    assert scores.shape == (2, 50) and torch.isfinite(scores).all()
    # fedenc recommend lists the catalog's own ids (1-based) of the best scores, best first.
    listed = runner.invoke(app, ["recommend", str(out), "1,2,3", "50", "--top", "3", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    best = scores.topk(3, dim=1)
    assert [r["items"] for r in rows] == (best.indices + 1).tolist()
    bad = runner.invoke(app, ["recommend", str(out), "1,x"])
    assert bad.exit_code == 2 and "item ids are integers" in bad.output
    outside = runner.invoke(app, ["recommend", str(out), "51"])
    assert outside.exit_code == 2 and "outside the encoder's catalog (1..50)" in outside.output


def test_missing_data_path_exits_2_naming_it() -> None:
    result = runner.invoke(app, ["train", "--data", "/nonexistent", *TINY, "-q"])
    assert result.exit_code == 2, result.output
    assert "/nonexistent" in flat(result.stderr)
    assert "Traceback" not in result.output


def test_unknown_encoder_exits_2_naming_the_available_types() -> None:
    result = runner.invoke(app, ["train", "--synthetic", "--encoder", "nope", *TINY, "-q"])
    assert result.exit_code == 2, result.output
    message = flat(result.stderr)
    assert "nope" in message
    for name in ("srgnn", "edge_attn", "skip_rnn"):
        assert name in message


def test_data_and_synthetic_together_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--data", str(tmp_path), "--synthetic", *TINY, "-q"])
    assert result.exit_code == 2, result.output
    assert "--synthetic" in flat(result.stderr) and "--data" in flat(result.stderr)


def test_bad_training_option_exits_2() -> None:
    result = runner.invoke(app, ["train", "--synthetic", *TINY, "--lr", "0", "-q"])
    assert result.exit_code == 2, result.output
    assert "lr" in flat(result.stderr)


def test_unknown_device_exits_2() -> None:
    result = runner.invoke(app, ["train", "--synthetic", *TINY, "--device", "gpu", "-q"])
    assert result.exit_code == 2, result.output
    assert "gpu" in flat(result.stderr)


def test_child_elastic_options_need_workers_and_a_certs_directory(tmp_path: Path) -> None:
    base = ["child", "--master", "127.0.0.1:1", "--name", "c", "--insecure"]
    alone = runner.invoke(app, [*base, "--elastic-listen", "0.0.0.0:7200"])
    assert alone.exit_code == 2 and "need --workers N" in alone.output
    missing = runner.invoke(
        app, [*base, "--workers", "1", "--elastic-certs", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 2 and "no such directory" in missing.output


def test_child_plan_overrides_are_checked_before_connecting() -> None:
    base = ["child", "--master", "127.0.0.1:1", "--name", "c", "--insecure"]
    bad = runner.invoke(app, [*base, "--plan", "gpu-everything"])
    assert bad.exit_code == 2 and "--plan gpu-everything" in bad.output
    both = runner.invoke(app, [*base, "--plan", "cpu-t1-c4096", "--workers", "1"])
    assert both.exit_code == 2 and "not by a plan" in both.output


def test_child_refuses_bad_data_settings_before_dialling(tmp_path: Path) -> None:
    base = ["child", "--master", "127.0.0.1:1", "--insecure", "--connect-timeout", "0"]
    cases = {
        f"--data {tmp_path / 'nope'}: no such file or directory": [
            "--data",
            str(tmp_path / "nope"),
        ],
        "--partition must be one of iid, time, dirichlet, got 'foo'": ["--partition", "foo"],
        "--alpha must be a finite number > 0, got 0.0": ["--alpha", "0"],
        "--valid-fraction must lie in [0, 1), got 1.0": ["--valid-fraction", "1"],
        "--synthetic-items must be >= 40 (2 per item cluster), got 5": ["--synthetic-items", "5"],
    }
    for message, options in cases.items():
        result = runner.invoke(app, [*base, *options])
        assert result.exit_code == 2, result.output
        assert flat(message) in flat(result.output)


def test_the_resume_hint_names_only_a_checkpoint_this_run_wrote(tmp_path: Path) -> None:
    import os
    import time

    from fedenc import cli
    from fedenc.federation.checkpoint import state_path

    def hint(since: float) -> str:
        with cli.console.capture() as captured:
            cli._print_resume_hint(tmp_path, since)
        return captured.get()

    assert hint(0.0) == ""  # no checkpoint at all
    path = state_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, (1_000_000.0, 1_000_000.0))
    assert hint(time.time()) == ""  # an earlier job's checkpoint: resuming would continue that
    text = " ".join(hint(0.0).split())
    assert str(tmp_path) in text and "--resume" in text


@pytest.mark.parametrize(
    ("insecure", "certs", "name", "flags"),
    [
        (True, None, "operator", "--insecure"),
        (False, Path("certs dir"), "ops", "--certs 'certs dir' --as ops"),
    ],
)
def test_printed_control_commands_keep_their_connection_flags(
    insecure: bool, certs: Path | None, name: str, flags: str
) -> None:
    from fedenc.control.cli import connection_flags

    assert connection_flags(insecure, certs, name) == flags


def test_encoders_lists_a_types_tensors_with_what_is_exchanged() -> None:
    result = runner.invoke(
        app,
        ["encoders", "--tensors", "srgnn", "--hidden", "8", "--num-items", "50"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if "│" in line}
    assert "51 x 8" in lines["embedding.weight"] and "the item table" in lines["embedding.weight"]
    assert "48 x 32" in lines["gnn.w_ih.weight"] and "all, encoder" in lines["gnn.w_ih.weight"]
    bad = runner.invoke(app, ["encoders", "--tensors", "nope"])
    assert bad.exit_code == 2 and "unknown encoder type 'nope'" in bad.output


@pytest.mark.parametrize(("resume", "reason"), [(True, 8), (False, 1)])
def test_a_stopping_master_asks_children_to_wait_only_for_a_resumable_job(
    resume: bool, reason: int
) -> None:
    # RESTART (8): keep the job's state and dial again; SHUTDOWN (1): the session is over
    # (no checkpoint, or --stop-children).
    from fedenc import cli
    from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb

    calls: list[tuple[str, int]] = []

    class Server:
        def stop(self, detail: str, reason: int = spb.CLOSE_REASON_SHUTDOWN) -> None:
            calls.append((detail, reason))

    assert cli._close_children(Server(), "stopped (SIGTERM)", resume) is resume
    assert calls[0][1] == reason and spb.CLOSE_REASON_RESTART == 8


def test_the_outcome_of_many_children_gives_a_median_and_a_p10_p90_band_and_the_coverage(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import io

    from rich.console import Console

    from fedenc import cli

    written = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=written, width=200))

    recalls = [float(10 * i) for i in range(11)]  # 0, 10, ..., 100 over 11 children
    result = {
        "rounds": [],
        "final_metrics": {"test_recall@20": 50.0, "test_mrr@20": 20.0, "test_examples": 110},
        "final_child_metrics": {f"child-{i}": {"test_recall@20": r} for i, r in enumerate(recalls)},
        "children": [{"name": f"child-{i}", "accepted": True} for i in range(13)],
        "stop_reason": "max_rounds",
    }
    cli._print_outcome(result, "t", tmp_path)
    out = " ".join(written.getvalue().split())
    assert "children's own test P@20: median 50.00, p10-p90 2.00 to 98.00;" in out
    assert "0.00 (child-0) to 100.00 (child-10)" in out
    assert "the final test covers 11 of the 13 children" in out
