"""The Flower App table in pyproject.toml: `flwr run .` accepts only declared run-config keys, so
every key the apps read is declared there, with the apps' own defaults."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import tomllib

from fedenc.federation.child_data import ChildDataConfig
from fedenc.federation.master import MasterConfig
from fedenc.runtime.simulate import Scenario

ROOT = Path(__file__).resolve().parents[1]


def app_config() -> dict[str, Any]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    table: dict[str, Any] = data["tool"]["flwr"]["app"]
    assert table["components"] == {"serverapp": "nodes.master:app", "clientapp": "nodes.child:app"}
    return dict(table["config"])


def _master(config: dict[str, Any]) -> dict[str, Any]:
    values = asdict(MasterConfig.from_run_config({**config, "num-items": 7, "job-id": "j"}))
    return values


def test_declared_defaults_are_the_apps_defaults() -> None:
    declared = app_config()
    assert _master(declared) == _master({})
    node = {"partition-id": 1, "num-partitions": 3}
    assert ChildDataConfig.from_configs(declared, node) == ChildDataConfig.from_configs({}, node)


def test_every_key_a_scenario_sets_is_declared() -> None:
    declared = set(app_config())
    for ps in ("", "local", "federation"):
        scenario = Scenario(
            encoder_options={"x": 1}, rule_options={"y": 2}, stop="deadline_s=60", ps=ps
        ).run_config(Path("out"))
        assert set(scenario) - declared == set()


def test_every_run_config_key_the_apps_read_is_declared() -> None:
    """Scans the apps' typed reads of the run config (``get_int(rc, "key", ...)`` and the
    like): `flwr run` refuses an undeclared key, so an undeclared one cannot be set there."""
    import re

    pattern = re.compile(
        r'get_(?:str|int|float|bool|json)\(\s*(?:rc|run_config|context\.run_config)\s*,\s*"([a-z0-9-]+)"'
    )
    read: set[str] = set()
    for path in [*(ROOT / "fedenc").rglob("*.py"), *(ROOT / "nodes").rglob("*.py")]:
        read |= set(pattern.findall(path.read_text()))
    assert {"num-server-rounds", "replay-round", "balance-work"} <= read  # the scan sees them
    aliases = {"rounds"}  # an older spelling of num-server-rounds, read as its fallback
    assert read - aliases - set(app_config()) == set()


def test_the_packages_key_list_is_the_declared_one() -> None:
    from fedenc.federation.runconfig import RUN_CONFIG_KEYS

    assert RUN_CONFIG_KEYS - {"rounds"} == set(app_config())
