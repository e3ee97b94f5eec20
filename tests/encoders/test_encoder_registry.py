"""Encoder types by name: built-ins, the ``fedenc.encoders`` entry points, and plugins that fail."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from fedenc.encoders import registry
from fedenc.encoders.srgnn import SRGNN


def _entry_point(name: str, load: Any) -> SimpleNamespace:
    return SimpleNamespace(name=name, value=f"plugin_pkg:{name}", load=load)


def _broken() -> Any:
    raise ModuleNotFoundError("No module named 'nosuchmodule'")


def test_a_broken_plugin_is_logged_and_skipped_and_a_shadowing_one_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry._load_builtin_and_plugins()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_loaded_entry_points", False)
    plugins = [
        _entry_point("broken", _broken),
        _entry_point("srgnn", lambda: object),
        _entry_point("srgnn_copy", lambda: type("SRGNNCopy", (SRGNN,), {})),
    ]
    monkeypatch.setattr("fedenc.plugins.entry_points", lambda group: plugins)
    with caplog.at_level(logging.WARNING, logger="fedenc.plugins"):
        names = registry.available_encoders()
    assert {"srgnn", "edge_attn", "skip_rnn", "srgnn_copy"} <= set(names)
    assert "broken" not in names and registry.encoder_class("srgnn") is SRGNN
    assert SRGNN.type_name == "srgnn"
    assert "encoder plugin 'broken' (plugin_pkg:broken) failed to load" in caplog.text
    assert "No module named 'nosuchmodule'" in caplog.text
    assert "encoder plugin 'srgnn' (plugin_pkg:srgnn) shadows a registered one" in caplog.text
    with pytest.raises(registry.UnknownEncoderError, match="unknown encoder type 'broken'"):
        registry.encoder_class("broken")


def test_an_option_an_encoder_does_not_read_is_refused_with_its_options() -> None:
    with pytest.raises(ValueError, match=r"encoder 'srgnn' has no option 'foo' \(options: "):
        registry.build_encoder("srgnn", 10, hidden=4, foo=1)
    with pytest.raises(ValueError, match="its own: executor, skip, skip_output"):
        registry.build_encoder("skip_rnn", 10, hidden=4, skipp=["padding"])
    model = registry.build_encoder("skip_rnn", 10, hidden=4, executor="literal")
    assert model.config.extra == {"executor": "literal"}
