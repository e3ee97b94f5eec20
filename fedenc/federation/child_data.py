"""A child's local data in a simulation: its share of one data set, loaded once per process.

Every virtual child of a simulation reads the same source (the seeded synthetic default, or
``data`` = a directory or raw log that :func:`fedenc.data.splits.load_dataset` reads) and keeps the
part that :func:`fedenc.data.partition.partition_indices` deals to its ``partition-id`` out of
``num-partitions``, and the held-out splits that :func:`fedenc.data.partition.held_out_indices`
deals after it: with ``dirichlet``, in the proportions the child got of each item group's training
sessions, so a child is scored on data like its own. The same settings always give the same
partition.

The source and its partition indices are cached per process (K children in one process load the
data once); only the small per-child views are built per child.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedenc.data.partition import SCHEMES, deal_indices, held_out_indices
from fedenc.data.sessions import Examples, IntArray, Sessions
from fedenc.data.splits import DataSplits, load_dataset
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.federation.runconfig import get_float, get_int, get_str

_CACHE_SIZE = 2


@dataclass(frozen=True)
class ChildDataConfig:
    """Where a child's data come from and how the simulation deals them out."""

    partition_id: int = 0
    num_partitions: int = 1
    source: str = ""  # "" = the synthetic default
    scheme: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    synthetic_sessions: int = 20000
    synthetic_items: int = 2000
    valid_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.partition_id < self.num_partitions:
            raise ValueError(
                f"partition-id {self.partition_id} outside 0..{self.num_partitions - 1}"
            )
        # Messages start with the run-config key, so the CLI can name its option ("--" + key).
        if self.scheme not in SCHEMES:
            raise ValueError(f"partition must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if not 0 < self.alpha < math.inf:
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha}")
        if self.seed < 0:  # numpy's own refusal names no setting
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid-fraction must lie in [0, 1), got {self.valid_fraction}")
        if self.synthetic_sessions < 3:
            raise ValueError(
                f"synthetic-sessions must be >= 3 (train, valid and test), "
                f"got {self.synthetic_sessions}"
            )
        min_items = 2 * SyntheticConfig.num_clusters  # the generator's default clusters
        if self.synthetic_items < min_items:
            raise ValueError(
                f"synthetic-items must be >= {min_items} (2 per item cluster), "
                f"got {self.synthetic_items}"
            )

    @classmethod
    def from_configs(
        cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]
    ) -> ChildDataConfig:
        """From Flower's node_config (``partition-id``, ``num-partitions``) and run_config
        (``data``, ``partition``, ``alpha``, ``seed``, ``synthetic-sessions``,
        ``synthetic-items``, ``valid-fraction``). A child's own node_config may set the data keys
        too (``data``, ``partition``, ``alpha``, ``synthetic-sessions``, ``synthetic-items``,
        ``valid-fraction``: a child process started with its own data); it wins over the run's."""

        def own(key: str) -> bool:
            return key in node_config or key.replace("-", "_") in node_config

        def pick(key: str) -> Mapping[str, Any]:
            return node_config if own(key) else run_config

        def where(key: str) -> str:
            return "node config" if own(key) else "run config"

        return cls(
            partition_id=get_int(node_config, "partition-id", 0, source="node config"),
            num_partitions=get_int(node_config, "num-partitions", 1, source="node config"),
            source=get_str(node_config, "data", "", source="node config")
            or get_str(run_config, "data", ""),
            scheme=get_str(pick("partition"), "partition", "iid", source=where("partition")),
            alpha=get_float(pick("alpha"), "alpha", 0.5, source=where("alpha")),
            seed=get_int(run_config, "seed", 0),
            synthetic_sessions=get_int(
                pick("synthetic-sessions"),
                "synthetic-sessions",
                20000,
                source=where("synthetic-sessions"),
            ),
            synthetic_items=get_int(
                pick("synthetic-items"), "synthetic-items", 2000, source=where("synthetic-items")
            ),
            valid_fraction=get_float(
                pick("valid-fraction"), "valid-fraction", 0.1, source=where("valid-fraction")
            ),
        )

    def source_key(self) -> tuple[Any, ...]:
        if self.source:
            return ("path", self.source, self.valid_fraction)
        return (
            "synthetic",
            self.synthetic_sessions,
            self.synthetic_items,
            self.seed,
            self.valid_fraction,
        )


@dataclass(frozen=True)
class ChildData:
    """One child's sessions and examples."""

    name: str
    num_items: int
    train: Sessions
    valid: Sessions
    test: Sessions

    def examples(self, split: str) -> Examples:
        sessions = {"train": self.train, "valid": self.valid, "test": self.test}.get(split)
        if sessions is None:
            raise ValueError(f"unknown split {split!r}; use train, valid or test")
        return Examples.from_sessions(sessions)


_lock = threading.Lock()
_sources: OrderedDict[tuple[Any, ...], DataSplits] = OrderedDict()
_parts: OrderedDict[tuple[Any, ...], list[list[IntArray]]] = OrderedDict()


def _remember(cache: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def load_source(config: ChildDataConfig) -> DataSplits:
    """The whole data set of ``config`` (cached per process)."""
    key = config.source_key()
    with _lock:
        cached = _sources.get(key)
        if cached is not None:
            return cached
        if config.source:
            splits = load_dataset(config.source, valid_fraction=config.valid_fraction)
        else:
            splits = generate(
                SyntheticConfig(
                    num_sessions=config.synthetic_sessions,
                    num_items=config.synthetic_items,
                    seed=config.seed,
                    valid_fraction=config.valid_fraction,
                )
            )
        _remember(_sources, key, splits)
        return splits


def load_child_data(config: ChildDataConfig) -> ChildData:
    """Child ``config.partition_id``'s share of the data set."""
    splits = load_source(config)
    key = (*config.source_key(), config.num_partitions, config.scheme, config.alpha, config.seed)
    with _lock:
        parts = _parts.get(key)
    if parts is None:
        dealt = deal_indices(
            splits.train, config.num_partitions, config.scheme, config.seed, config.alpha
        )
        parts = [dealt] + [
            held_out_indices(splits.train, dealt, s, config.scheme, config.seed, config.alpha)
            for s in (splits.valid, splits.test)
        ]
        with _lock:
            _remember(_parts, key, parts)
    pid = config.partition_id
    train, valid, test = (
        s.subset(p[pid])
        for s, p in zip((splits.train, splits.valid, splits.test), parts, strict=True)
    )
    return ChildData(
        name=f"{splits.name}[{pid}/{config.num_partitions}]",
        num_items=splits.num_items,
        train=train,
        valid=valid,
        test=test,
    )


def clear_cache() -> None:
    """Forget the cached data sets (tests; long-lived processes between jobs)."""
    with _lock:
        _sources.clear()
        _parts.clear()
