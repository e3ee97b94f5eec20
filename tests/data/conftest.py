"""Shared fixtures for the data tests: the real-data directory (skip when absent)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fedenc.data.splits import DATA_ENV, default_data_dir


def _missing_message(what: str) -> str:
    where = os.environ.get(DATA_ENV) or "../shared/data (next to the repo or the cwd)"
    return f"real data not found at {where} ({what}); set {DATA_ENV}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = default_data_dir()
    if root is None:
        pytest.skip(_missing_message("no directory"))
    return root


@pytest.fixture(scope="session")
def real_file(data_dir: Path) -> Callable[[str], Path]:
    """``real_file("a/b.txt")`` -> the path under the data directory, or skip."""

    def get(relative: str) -> Path:
        path = data_dir / relative
        if not path.exists():
            pytest.skip(_missing_message(relative))
        return path

    return get
