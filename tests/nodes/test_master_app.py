"""nodes/master.py's ServerApp: the progress lines it shows where the host set up no logging,
for its run only."""

from __future__ import annotations

import logging

import pytest

from nodes.master import _show_progress


def test_progress_lines_go_to_stderr_for_the_run_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a host that set up no logging (pytest has)
    fedenc = logging.getLogger("fedenc")
    before = (list(fedenc.handlers), fedenc.level, fedenc.propagate)
    with _show_progress():
        logging.getLogger("fedenc.federation.master").info("round 1: shown")
    assert "INFO fedenc.federation.master: round 1: shown" in capsys.readouterr().err
    # A program running jobs through the Python API keeps its own logging afterwards.
    assert (list(fedenc.handlers), fedenc.level, fedenc.propagate) == before


def test_a_host_that_set_up_logging_keeps_it(caplog: pytest.LogCaptureFixture) -> None:
    fedenc = logging.getLogger("fedenc")
    with caplog.at_level(logging.INFO), _show_progress():
        assert fedenc.handlers == [] and fedenc.propagate
        logging.getLogger("fedenc.x").info("to the host's handlers")
    assert "to the host's handlers" in caplog.text
