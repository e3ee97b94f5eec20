"""Test-wide settings: Flower stays offline and writes only into a temporary home."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="fedenc-flwr-home-")
# `fedenc train` plans by default: its per-machine cost cache goes to a temporary directory too.
os.environ["FEDENC_PLANNER_CACHE"] = tempfile.mkdtemp(prefix="fedenc-planner-cache-")

# Two cores on CI: one torch thread per test process keeps timings sane and results stable.
torch.set_num_threads(1)


@pytest.fixture
def seed() -> Iterator[int]:
    torch.manual_seed(0)
    yield 0


@pytest.fixture
def native() -> None:
    """Skips (saying why) where the native loss kernels cannot run; checked when a test runs,
    not when the suite is collected (no build for deselected tests)."""
    import platform

    from fedenc.encoders.layers import native_softmax

    if not native_softmax.switched_on():
        pytest.skip(f"native kernels switched off ({native_softmax.ENV_SWITCH})")
    if not native_softmax.enabled():
        pytest.skip(f"native kernels need an x86-64 CPU with AVX2 ({platform.machine()})")
    if native_softmax.library() is None:
        pytest.skip(f"native kernels did not build: {native_softmax.unavailable_reason()}")


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``-m "not realdata"`` deselects the tests that read ../shared/data (they skip, with the
    reason, where it is absent)."""
    for item in items:
        if {"data_dir", "real_file"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)
