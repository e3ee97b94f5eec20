"""Typed reads of Flower's ``run_config`` / ``node_config`` (flat ``str -> bool|int|float|str``).

Flower fills ``context.run_config`` from ``[tool.flwr.app.config]`` plus ``--run-config``, and
leaves it empty under some launchers, so every read has a default. Keys are kebab-case as in
Flower's templates; an underscore spelling of the same key is accepted too. A value of the wrong
type is a ``ValueError`` that names the key, never a silent default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeAlias

Config: TypeAlias = Mapping[str, Any]

#: Every run-config key the apps read (pyproject's ``[tool.flwr.app.config]`` declares each, a
#: test keeps the two equal), plus ``rounds``, an older spelling of ``num-server-rounds``.
RUN_CONFIG_KEYS: frozenset[str] = frozenset(
    """
    encoder num-items hidden steps use-positions normalize scale dropout encoder-options
    local-epochs batch-size lr lr-decay-step lr-decay-rate l2 max-examples-per-epoch device
    num-server-rounds rounds stop rule share row-weighting rule-options min-children fraction
    sampling carry-optimizer round-timeout query-timeout evaluate-every eval-split final-test
    expect-children wait-timeout seed job-id fold-order balance-work work-deadline state-dir
    resume replay-round ps ps-exchange-every ps-scoring ps-negatives ps-capacity
    ps-shards ps-addresses ps-pad-rows out-dir data partition alpha synthetic-sessions
    synthetic-items valid-fraction publish min-samples
    """.split()
)


def unknown_key_message(key: str, known: frozenset[str] = RUN_CONFIG_KEYS) -> str:
    """``unknown run-config key 'x'`` with the closest known spellings."""
    import difflib

    close = difflib.get_close_matches(key.replace("_", "-"), sorted(known), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"unknown run-config key {key!r}{hint}"


def _lookup(config: Config, key: str) -> Any:
    if key in config:
        return config[key]
    alt = key.replace("-", "_")
    return config.get(alt)


def get_str(config: Config, key: str, default: str = "", *, source: str = "run config") -> str:
    value = _lookup(config, key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{source} {key!r} must be a string, got {value!r}")
    return value


def get_int(config: Config, key: str, default: int, *, source: str = "run config") -> int:
    value = _lookup(config, key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source} {key!r} must be an integer, got {value!r}")
    return value


def get_float(config: Config, key: str, default: float, *, source: str = "run config") -> float:
    value = _lookup(config, key)
    if value is None:
        return default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{source} {key!r} must be a number, got {value!r}")
    return float(value)


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def get_bool(config: Config, key: str, default: bool, *, source: str = "run config") -> bool:
    value = _lookup(config, key)
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    if not isinstance(value, bool):
        raise ValueError(f"{source} {key!r} must be a boolean, got {value!r}")
    return value


def get_json(config: Config, key: str) -> dict[str, Any]:
    """A JSON object stored as a string (run configs are flat); ``{}`` when absent or empty."""
    text = get_str(config, key, "")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"run config {key!r} is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"run config {key!r} must be a JSON object, got {value!r}")
    return value
