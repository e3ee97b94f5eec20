"""``fedenc train --ps`` and ``fedenc ps`` argument errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fedenc.cli import app


def test_train_with_the_two_level_ps_saves_an_encoder_that_scores_the_same(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        "train --synthetic --synthetic-sessions 500 --synthetic-items 80 --epochs 1 --hidden 8 "
        f"--ps --ps-exchange-every 300 --ps-scoring sampled -q --out {out}".split(),
    )
    assert result.exit_code == 0, result.output
    assert "P@20" in result.output
    # Sampled scoring holds no item table: the checkpoint carries the PS's, and scores the
    # test split to the number training reported (it could not be loaded before).
    scored = tmp_path / "scored.json"
    again = CliRunner().invoke(app, ["evaluate", str(out), "--json", str(scored)])
    assert again.exit_code == 0, again.output
    test = json.loads((out / "results.json").read_text())["test"]
    rescored = json.loads(scored.read_text())["test"]
    for key in ("recall@20", "mrr@20"):
        assert abs(rescored[key] - test[key]) < 1e-6, key


def test_ps_refuses_a_bad_shard_spec() -> None:
    result = CliRunner().invoke(app, ["ps", "--shard", "2/2", "--insecure"])
    assert result.exit_code == 2
    assert "0 <= I < S" in result.output


def test_ps_refuses_to_run_without_tls_or_insecure() -> None:
    result = CliRunner().invoke(app, ["ps", "--shard", "0/1"])
    assert result.exit_code == 2
    assert "--insecure" in result.output
