"""``fedenc train --ps`` and ``fedenc ps`` argument errors."""

from __future__ import annotations

from typer.testing import CliRunner

from fedenc.cli import app


def test_train_with_the_two_level_ps() -> None:
    result = CliRunner().invoke(
        app,
        "train --synthetic --synthetic-sessions 500 --synthetic-items 80 --epochs 1 --hidden 8 "
        "--ps --ps-exchange-every 300 --ps-scoring sampled -q".split(),
    )
    assert result.exit_code == 0, result.output
    assert "P@20" in result.output


def test_ps_refuses_a_bad_shard_spec() -> None:
    result = CliRunner().invoke(app, ["ps", "--shard", "2/2", "--insecure"])
    assert result.exit_code == 2
    assert "0 <= I < S" in result.output


def test_ps_refuses_to_run_without_tls_or_insecure() -> None:
    result = CliRunner().invoke(app, ["ps", "--shard", "0/1"])
    assert result.exit_code == 2
    assert "--insecure" in result.output
