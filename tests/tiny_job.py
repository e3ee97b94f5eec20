"""The smallest federated job the runtime tests run (synthetic data, hidden 8, two rounds): one
run config for the files that build on it, each adding what its runtime needs. Importable from
every test folder: the folder of tests/conftest.py is on the path."""

from __future__ import annotations

from typing import Any, Final

TINY_JOB: Final[dict[str, Any]] = {
    "synthetic-sessions": 400,
    "synthetic-items": 60,
    "hidden": 8,
    "batch-size": 50,
    "num-server-rounds": 2,
    "final-test": False,
}
