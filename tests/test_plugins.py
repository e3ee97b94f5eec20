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
    # Registered by its own decorator when an earlier entry point imported its module.
    found.append(_EntryPoint("decorated", lambda: 3))
    monkeypatch.setattr(plugins, "entry_points", lambda group: found if group == "g" else [])
    registered: dict[str, Any] = {}
    held = {"builtin": 0, "decorated": 3}
    with caplog.at_level(logging.WARNING, logger="fedenc.plugins"):
        plugins.load_entry_points("g", "widget", held.get, registered.__setitem__)
    assert registered == {"mine": 1}
    assert "widget plugin 'builtin' (pkg:builtin) shadows a registered one" in caplog.text
    assert "decorated" not in caplog.text  # the same class under its own name: no warning
    assert "widget plugin 'broken' (pkg:broken) failed to load: no module named" in caplog.text


def test_an_unknown_name_says_when_its_plugin_failed_to_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The load failure was a warning printed long before; "unknown fusion rule 'x'" alone sent
    # the user looking for a typo.
    from fedenc.federation import stopping
    from fedenc.federation.fusion import registry

    def broken(group: str) -> list[_EntryPoint]:
        return (
            [_EntryPoint("typo_rule", _broken)] if group in ("fedenc.fusion", "fedenc.stop") else []
        )

    monkeypatch.setattr(plugins, "entry_points", broken)
    monkeypatch.setattr(plugins, "_FAILED", {})
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    monkeypatch.setattr(stopping, "_loaded_entry_points", False)
    with pytest.raises(registry.UnknownFusionRuleError) as err:
        registry.fusion_rule_class("typo_rule")
    assert "plugin 'typo_rule' from pkg:typo_rule failed to load: no module named" in str(err.value)
    with pytest.raises(ValueError, match="plugin 'typo_rule' from pkg:typo_rule failed to load"):
        stopping.build_stop_rule("typo_rule=3")
    with pytest.raises(ValueError, match="plugin 'typo_rule' from pkg:typo_rule failed to load"):
        stopping.build_stop_rule({"typo_rule": 3})
    assert plugins.load_failure_note("fedenc.fusion", "other") == ""
