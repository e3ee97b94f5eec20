"""One shard's rows: storage, validation, row optimizer, counters, snapshot and restore.

A table is a fixed key space ``[0, num_keys)`` of ``width``-wide float32 rows. A shard holds the
keys :mod:`.routing` gives it, in a sorted array, so looking keys up is one vectorised
``searchsorted``; an unknown key (outside the key space, or another shard's) is refused, never
created. Rows start from a deterministic function of ``(seed, key)`` (:func:`initial_rows`), so
the initial table is the same whatever the number of shards.

Every request is validated before it touches anything: a refused push (unknown or duplicate
keys, a wrong width, NaN/Inf) changes nothing. Requests are serialised by one lock, so a push
is applied atomically: a reader sees a shard's rows before or after a push, never half of it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedenc import atomic
from fedenc.ps.optimizers import RowOptimizer, RowOptimizerConfig
from fedenc.ps.routing import check_shard, keys_of_shard, shard_of, splitmix64
from fedenc.training.checkpoint import load_failure

SNAPSHOT_FORMAT = "fedenc-ps-shard-v1"


class PSError(ValueError):
    """A request the parameter server refuses; the message says what is wrong."""


@dataclass(frozen=True)
class TableSpec:
    """The geometry of a distributed table (the same on every shard)."""

    num_keys: int
    width: int
    num_shards: int = 1
    seed: int = 0
    init_bound: float = 0.0  # rows start uniform in ±init_bound; 0 = 1/√width (SR-GNN's init)
    optimizer: RowOptimizerConfig = field(default_factory=RowOptimizerConfig)

    def __post_init__(self) -> None:
        if self.num_keys < 1 or self.width < 1 or self.num_shards < 1:
            raise ValueError(
                f"num_keys, width and num_shards must be >= 1, got {self.num_keys}, "
                f"{self.width}, {self.num_shards}"
            )

    @property
    def bound(self) -> float:
        return self.init_bound or 1.0 / float(self.width) ** 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableSpec:
        values = dict(data)
        values["optimizer"] = RowOptimizerConfig(**values.get("optimizer", {}))
        return cls(**values)


def initial_rows(keys: NDArray[np.int64], width: int, seed: int, bound: float) -> Tensor:
    """Uniform values in ``[-bound, bound)`` that depend only on ``(seed, key, column)``."""
    cols = np.arange(width, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = keys.astype(np.uint64)[:, None] * np.uint64(width) + cols[None, :]
        h = splitmix64(base ^ splitmix64(np.array([seed], dtype=np.uint64)))
    unit = (h >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))
    return torch.from_numpy(unit).mul_(2 * bound).sub_(bound)


@dataclass(frozen=True)
class PushResult:
    rows_applied: int
    duplicate: bool
    version: int
    previous_sequence: int = 0  # the client's last sequence applied before this push


def as_keys(
    keys: Tensor | NDArray[np.integer] | list[int], what: str = "keys"
) -> NDArray[np.int64]:
    """A 1-D int64 array of keys; :class:`PSError` otherwise."""
    arr = keys.numpy() if isinstance(keys, Tensor) else np.asarray(keys)
    if arr.ndim != 1:
        raise PSError(f"{what} must be 1-D, got shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise PSError(f"{what} must be integers, got {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def check_rows(keys: NDArray[np.int64], rows: Tensor, width: int) -> None:
    """Shape, dtype and finiteness of pushed rows; :class:`PSError` naming the problem."""
    if rows.dtype != torch.float32:
        raise PSError(f"rows must be float32, got {str(rows.dtype).removeprefix('torch.')}")
    if rows.dim() != 2 or rows.shape[1] != width:
        raise PSError(
            f"rows have shape {list(rows.shape)}: the table's rows are {width} wide "
            f"(expected [{keys.size}, {width}])"
        )
    if rows.shape[0] != keys.size:
        raise PSError(f"{rows.shape[0]} rows for {keys.size} keys")
    if rows.numel() and math.isfinite(float(rows.sum())):
        return  # NaN and Inf propagate through a sum: one vectorised pass proves all finite
    finite = torch.isfinite(rows).all(1)  # a bad value (or a sum that overflowed): find rows
    if not bool(finite.all()):
        bad = keys[(~finite).numpy()]
        raise PSError(
            f"{bad.size} pushed row(s) hold NaN/Inf values (keys {bad[:5].tolist()}"
            f"{' ...' if bad.size > 5 else ''}); nothing was applied"
        )


def check_push(keys: NDArray[np.int64], rows: Tensor, num_keys: int, width: int) -> None:
    """Everything about a whole push that can be checked without the table's contents."""
    check_rows(keys, rows, width)
    if keys.size and (int(keys.min()) < 0 or int(keys.max()) >= num_keys):
        bad = keys[(keys < 0) | (keys >= num_keys)]
        raise PSError(
            f"unknown key {int(bad[0])} ({bad.size} unknown in this push): the table's key "
            f"space is [0, {num_keys})"
        )
    if keys.size < 2 or bool(np.all(keys[1:] > keys[:-1])):
        return  # strictly increasing (how pushes are usually cut): no key twice, no sort
    uniq, counts = np.unique(keys, return_counts=True)
    if uniq.size != keys.size:
        raise PSError(f"key {int(uniq[counts > 1][0])} appears twice in one push")


class ShardTable:
    """Shard ``shard`` of the table ``spec``; thread-safe."""

    def __init__(self, spec: TableSpec, shard: int = 0, snapshot_path: Path | None = None) -> None:
        check_shard(shard, spec.num_shards)
        self.spec = spec
        self.shard = shard
        self.snapshot_path = snapshot_path
        self.keys = keys_of_shard(spec.num_keys, shard, spec.num_shards)
        self.values = initial_rows(self.keys, spec.width, spec.seed, spec.bound)
        self.optimizer = RowOptimizer(spec.optimizer, self.keys.size, spec.width)
        self.version = 0
        self.applied: dict[str, int] = {}  # client id -> last push sequence applied
        self.counters = {"pulls": 0, "rows_pulled": 0, "pushes": 0, "rows_pushed": 0, "refused": 0}
        self.last_snapshot = ""
        self.lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"{self.shard}/{self.spec.num_shards}"

    def index_of(self, keys: NDArray[np.int64]) -> Tensor:
        """Row positions of ``keys`` here; :class:`PSError` for a key this shard does not hold."""
        if keys.size == 0:
            return torch.zeros(0, dtype=torch.int64)
        pos = np.searchsorted(self.keys, keys)
        pos_c = np.minimum(pos, max(self.keys.size - 1, 0))
        ok = (pos < self.keys.size) & (self.keys[pos_c] == keys) if self.keys.size else pos < 0
        if not bool(ok.all()):
            key = int(keys[~ok][0])
            n = int((~ok).sum())
            if not 0 <= key < self.spec.num_keys:
                raise PSError(
                    f"unknown key {key} ({n} unknown in this request): the table's key space is "
                    f"[0, {self.spec.num_keys})"
                )
            owner = int(shard_of(np.array([key]), self.spec.num_shards)[0])
            raise PSError(
                f"key {key} belongs to shard {owner}/{self.spec.num_shards}, not to this shard "
                f"{self.label} ({n} misrouted key(s) in this request)"
            )
        return torch.from_numpy(pos.astype(np.int64))

    def pull(self, keys: NDArray[np.int64]) -> tuple[Tensor, int]:
        """Copies of the rows of ``keys`` and the version they were read at."""
        with self.lock:
            index = self.index_of(keys)
            rows = self.values.index_select(0, index)
            self.counters["pulls"] += 1
            self.counters["rows_pulled"] += keys.size
            return rows, self.version

    def push(
        self,
        keys: NDArray[np.int64],
        rows: Tensor,
        overwrite: bool = False,
        client_id: str = "",
        sequence: int = 0,
    ) -> PushResult:
        """Apply deltas (through the row optimizer) or overwrite rows; all or nothing."""
        with self.lock:
            previous = self.applied.get(client_id, 0) if client_id else 0
            try:
                if sequence and client_id and sequence <= previous:
                    return PushResult(0, True, self.version, previous)
                check_push(keys, rows, self.spec.num_keys, self.spec.width)
                index = self.index_of(keys)
            except PSError:
                self.counters["refused"] += 1
                raise
            if overwrite:
                self.values.index_copy_(0, index, rows)
            else:
                self.optimizer.apply(self.values, index, rows)
            self.version += 1
            if sequence and client_id:
                self.applied[client_id] = sequence
            self.counters["pushes"] += 1
            self.counters["rows_pushed"] += keys.size
            return PushResult(keys.size, False, self.version, previous)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "shard_index": self.shard,
                "num_shards": self.spec.num_shards,
                "num_keys": self.spec.num_keys,
                "rows": int(self.keys.size),
                "width": self.spec.width,
                "optimizer": self.spec.optimizer.name,
                "version": self.version,
                **self.counters,
                "last_snapshot": self.last_snapshot,
            }

    # -- snapshot and restore ---------------------------------------------------------------

    def _path(self, path: Path | str | None) -> Path:
        chosen = Path(path) if path else self.snapshot_path
        if chosen is None:
            raise PSError("no snapshot path given and the shard has none configured")
        return chosen

    def snapshot(self, path: Path | str | None = None) -> tuple[Path, int]:
        """Write rows, optimizer state, version and push sequences to ``path`` atomically."""
        target = self._path(path)
        with self.lock:
            payload = {
                "format": SNAPSHOT_FORMAT,
                "spec": self.spec.to_dict(),
                "shard": self.shard,
                "keys": torch.from_numpy(self.keys.copy()),
                "values": self.values.clone(),
                "state": {k: v.clone() for k, v in self.optimizer.state.items()},
                "version": self.version,
                "applied": dict(self.applied),
            }
            version = self.version
        atomic.torch_save(payload, target, atomic.PRIVATE)
        with self.lock:
            self.last_snapshot = str(target)
        return target, version

    def restore(self, path: Path | str | None = None) -> tuple[Path, int]:
        """Replace everything with the snapshot at ``path`` (which must match this shard)."""
        source = self._path(path)
        try:
            payload = atomic.torch_load(source, weights_only=True)
        except FileNotFoundError:
            raise PSError(f"snapshot {source} does not exist") from None
        except Exception as err:  # a truncated or foreign file: say which, not a pickle trace
            raise PSError(f"snapshot {source} cannot be read: {load_failure(err)}") from None
        if not isinstance(payload, dict) or payload.get("format") != SNAPSHOT_FORMAT:
            raise PSError(f"{source} is not a fedenc PS shard snapshot")
        spec = TableSpec.from_dict(payload["spec"])
        if spec != self.spec or payload["shard"] != self.shard:
            ours, theirs = asdict(self.spec), asdict(spec)
            differ = [f"{k} {theirs[k]} here {ours[k]}" for k in ours if ours[k] != theirs[k]]
            if payload["shard"] != self.shard:
                differ.insert(0, f"shard {payload['shard']} here {self.shard}")
            raise PSError(
                f"snapshot {source} is of another shard or table: {'; '.join(differ)} "
                "(the snapshot's value first; start with --fresh to ignore it)"
            )
        with self.lock:
            self.values = payload["values"]
            self.optimizer.state = dict(payload["state"])
            self.version = int(payload["version"])
            self.applied = {str(k): int(v) for k, v in payload["applied"].items()}
            self.last_snapshot = str(source)
            return source, self.version
