"""The per-machine cost cache: a file it cannot read or write is named and worked around
(profile again, or train without caching), never a crash after a whole profile."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedenc.planner.cost import FORMAT, CostCache, CostModel


def model() -> CostModel:
    return CostModel(samples={"encode[x]|cpu x1": [0.01, 0.02]}, bandwidth={}, load="0.1")


def test_saved_costs_load_back(tmp_path: Path) -> None:
    cache = CostCache(tmp_path)
    cache.save("w", model())
    loaded = cache.load("w")
    assert loaded is not None and loaded.samples == model().samples
    assert cache.load("other") is None


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "Expecting property name"),
        (
            json.dumps({"format": FORMAT, "workloads": {"w": {"samples": {"k": ["x"]}}}}),
            "could not convert string to float",
        ),
        (
            json.dumps({"format": FORMAT, "workloads": {"w": {"samples": {"k": [-1.0]}}}}),
            "negative or non-finite samples of k",
        ),
    ],
)
def test_an_unreadable_cache_is_named_and_profiled_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str, reason: str
) -> None:
    cache = CostCache(tmp_path)
    cache.path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="fedenc.planner.cost"):
        assert cache.load("w") is None
    assert f"planner cache {cache.path} unreadable" in caplog.text and reason in caplog.text
    cache.save("w", model())  # and rewritten
    assert cache.load("w") is not None


def test_a_cache_that_cannot_be_written_is_reported_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = CostCache(blocker)  # FEDENC_PLANNER_CACHE pointing at a file
    with caplog.at_level(logging.WARNING, logger="fedenc.planner.cost"):
        cache.save("w", model())
    assert "cannot be written" in caplog.text and "not cached" in caplog.text
