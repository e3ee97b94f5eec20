"""`fedenc elastic`: the services' command lines."""

from __future__ import annotations

from pathlib import Path


def test_elastic_services_report_setup_errors_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedenc.cli import app

    runner = CliRunner()
    store = tmp_path / "nowhere"
    result = runner.invoke(app, ["elastic", "data-server", "--store", str(store), "--insecure"])
    assert result.exit_code == 2, result.output
    assert f"error: bad model description in {store}" in result.output
    assert "Traceback" not in result.output
    task_server = ["elastic", "task-server", "--data-server", "127.0.0.1:1"]
    options = ["--journal", str(tmp_path), "--heartbeat-timeout", "-1", "--insecure"]
    result = runner.invoke(app, [*task_server, *options])
    assert result.exit_code == 2 and "heartbeat-timeout" in result.output
