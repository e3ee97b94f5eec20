"""fedenc.plugins: entry points of other packages; built-in names win, broken ones are skipped."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fedenc import plugins


class _EntryPoint:
    def __init__(self, name: str, load: Any) -> None:
        self.name, self.value, self._load = name, f"pkg:{name}", load

    def load(self) -> Any:
        return self._load()


def _broken() -> Any:
    raise ImportError("no module named 'pkg'")


def test_taken_names_are_ignored_and_broken_plugins_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    found = [_EntryPoint("mine", lambda: 1), _EntryPoint("builtin", lambda: 2)]
    found.append(_EntryPoint("broken", _broken))
    monkeypatch.setattr(plugins, "entry_points", lambda group: found if group == "g" else [])
    registered: dict[str, Any] = {}
    with caplog.at_level(logging.WARNING, logger="fedenc.plugins"):
        plugins.load_entry_points(
            "g", "widget", lambda name: name == "builtin", registered.__setitem__
        )
    assert registered == {"mine": 1}
    assert "widget plugin 'builtin' (pkg:builtin) shadows a registered one" in caplog.text
    assert "widget plugin 'broken' (pkg:broken) failed to load: no module named" in caplog.text
