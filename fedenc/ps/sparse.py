"""Sparse row updates and their row-wise fusion (placement b: the federation-level PS).

A child's update of the shared item table is a :class:`SparseRows`: the keys of the rows it
touched this round, each row's delta (its value at the end of the round minus the federation
table's value at the start) and each row's count ``c``: the samples of the child's own data that
touch the row, the dense table's row weight (:func:`~fedenc.ps.federation.weigh_by_data`; rows
the child's data never touches are not sent). On the wire it is an ``ArrayRecord``
of three arrays (``keys`` int32, ``deltas`` float32 ``[n, width]``, ``counts`` int32): the bytes
grow with the rows touched, not with the catalog.

:class:`RowFusion` fuses the round's updates row by row with the job's rule, over the children
that touched each row::

    weighted_sum:  Δ_r = Σ_i c_i,r Δ_i,r / Σ_i c_i,r       mean:  Δ_r = Σ_i Δ_i,r / |{i: r ∈ i}|

A row no child touched is not in the result (its value stays); a row touched by one child gets
exactly that child's delta. Rows whose delta is exactly zero (the padding of
:func:`pad_rows`, or a row whose gradient was zero) carry no direction and are left out of the
weights, so padding never dilutes a real update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from numpy.typing import NDArray
from torch import Tensor

from fedenc.federation.parameters import BadUpdateError

KEYS: str = "keys"
DELTAS: str = "deltas"
COUNTS: str = "counts"
_WIRE_INT = np.int32  # keys and counts travel as int32 (catalogs and rounds below 2^31)

#: Fusion rules that have a row-wise form, and how each weighs a child's row.
ROW_RULES: dict[str, str] = {"weighted_sum": "count", "fedavg": "count", "mean": "uniform"}


@dataclass
class SparseRows:
    """Rows a child touched: sorted unique ``keys`` (> 0), ``deltas [n, width]``, ``counts``."""

    keys: NDArray[np.int64]
    deltas: Tensor
    counts: NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.keys.size)

    @classmethod
    def empty(cls, width: int) -> SparseRows:
        return cls(np.zeros(0, np.int64), torch.zeros(0, width), np.zeros(0, np.int64))

    def to_record(self) -> ArrayRecord:
        if len(self) and int(self.keys.max()) > np.iinfo(_WIRE_INT).max:
            raise ValueError(f"key {int(self.keys.max())} does not fit the wire's int32 keys")
        return ArrayRecord(
            {
                KEYS: Array(self.keys.astype(_WIRE_INT)),
                DELTAS: Array(self.deltas.detach().to(torch.float32).cpu().numpy()),
                COUNTS: Array(np.minimum(self.counts, np.iinfo(_WIRE_INT).max).astype(_WIRE_INT)),
            }
        )

    def wire_bytes(self) -> int:
        return len(self) * (2 * np.dtype(_WIRE_INT).itemsize + 4 * int(self.deltas.shape[1]))


def rows_from_record(record: ArrayRecord, child: str, num_keys: int, width: int) -> SparseRows:
    """Decode and check a child's sparse rows; :class:`BadUpdateError` naming every problem.

    Refused: missing or extra arrays, keys that are not 1-D integers, keys outside
    ``[1, num_keys)`` (key 0 is the padding row and is never exchanged) or repeated, deltas that
    are not float32 ``[len(keys), width]`` or hold NaN/Inf, counts that are not integers >= 1 of
    the keys' length.
    """
    names = set(record)
    wanted = {KEYS, DELTAS, COUNTS}
    if names != wanted:
        raise BadUpdateError(
            child,
            f"sparse rows need arrays {sorted(wanted)}, got {sorted(names)}",
        )
    try:
        keys = np.asarray(record[KEYS].numpy())
        deltas_np = np.asarray(record[DELTAS].numpy())
        counts = np.asarray(record[COUNTS].numpy())
    except Exception as err:  # any malformed array is the sender's fault
        raise BadUpdateError(child, f"sparse rows cannot be decoded: {err}") from err
    problems: list[str] = []
    if keys.ndim != 1 or not np.issubdtype(keys.dtype, np.integer):
        problems.append(f"keys must be 1-D integers, got {keys.dtype} of shape {list(keys.shape)}")
    if deltas_np.dtype != np.float32:
        problems.append(f"deltas must be float32, got {deltas_np.dtype}")
    if deltas_np.ndim != 2 or deltas_np.shape[1:] != (width,):
        problems.append(
            f"deltas have shape {list(deltas_np.shape)}: the table's rows are {width} wide"
        )
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        problems.append(f"counts must be 1-D integers, got {counts.dtype}")
    if problems:
        raise BadUpdateError(child, "; ".join(problems))
    n = keys.size
    if deltas_np.shape[0] != n or counts.size != n:
        raise BadUpdateError(
            child, f"{n} keys, {deltas_np.shape[0]} delta rows and {counts.size} counts"
        )
    keys = keys.astype(np.int64)
    bad = keys[(keys < 1) | (keys >= num_keys)]
    if bad.size:
        problems.append(
            f"unknown key {int(bad[0])} ({bad.size} outside the table's rows [1, {num_keys}))"
        )
    if np.unique(keys).size != n:
        problems.append("a key appears twice")
    if n and int(counts.min()) < 1:
        problems.append(f"touch counts must be >= 1, got {int(counts.min())}")
    finite = np.isfinite(deltas_np).all(axis=1)
    if not finite.all():
        problems.append(f"{int((~finite).sum())} delta row(s) hold NaN/Inf values")
    if problems:
        raise BadUpdateError(child, "sparse rows: " + "; ".join(problems))
    order = np.argsort(keys, kind="stable")
    return SparseRows(
        keys[order],
        torch.from_numpy(np.ascontiguousarray(deltas_np[order])),
        counts.astype(np.int64)[order],
    )


class RowFusion:
    """One round's row-wise fusion with the job's rule (see the module docstring).

    ``add`` keeps each accepted child's weighted rows (memory: the rows touched, not the
    catalog); ``result`` sums them per key in child-name order, so the outcome does not depend
    on arrival order.
    """

    def __init__(self, rule: str) -> None:
        if rule not in ROW_RULES:
            raise ValueError(
                f"placement b fuses table rows with {sorted(ROW_RULES)}; rule {rule!r} has no "
                "row-wise form here (use it with ps = 'local' or without a PS)"
            )
        self.rule = rule
        self.weighting = ROW_RULES[rule]
        self._parts: dict[str, SparseRows] = {}

    def begin(self) -> None:
        self._parts = {}

    def add(self, child: str, rows: SparseRows) -> None:
        if child in self._parts:
            raise BadUpdateError(child, "a second set of sparse rows in this round")
        self._parts[child] = rows

    @property
    def rows_received(self) -> int:
        return sum(len(r) for r in self._parts.values())

    def result(self) -> tuple[NDArray[np.int64], Tensor]:
        """The fused delta of every row some child changed: (sorted keys, deltas)."""
        parts = [self._parts[c] for c in sorted(self._parts)]
        width = parts[0].deltas.shape[1] if parts else 0
        if not parts or not any(len(p) for p in parts):
            return np.zeros(0, np.int64), torch.zeros(0, width)
        keys = np.concatenate([p.keys for p in parts])
        deltas = torch.cat([p.deltas for p in parts]).double()
        if self.weighting == "count":
            w = torch.from_numpy(np.concatenate([p.counts for p in parts])).double()
        else:
            w = torch.ones(keys.size, dtype=torch.float64)
        w = w * deltas.ne(0).any(1)  # an all-zero delta (padding) carries no weight
        uniq, inverse = np.unique(keys, return_inverse=True)
        index = torch.from_numpy(inverse.astype(np.int64))
        num = torch.zeros(uniq.size, width, dtype=torch.float64)
        num.index_add_(0, index, deltas * w[:, None])
        den = torch.zeros(uniq.size, dtype=torch.float64).index_add_(0, index, w)
        moved = den > 0
        fused = num[moved] / den[moved][:, None]
        return uniq[moved.numpy()], fused.to(torch.float32)


def pad_rows(rows: SparseRows, extra: int, num_keys: int, rng: np.random.Generator) -> SparseRows:
    """``rows`` plus ``extra`` keys drawn uniformly from the rows it does not hold, with zero
    deltas and touch counts drawn from its own counts (so keys and counts look like real ones;
    see docs/ps.md for what this hides and what it does not)."""
    if extra <= 0:
        return rows
    extra = min(extra, num_keys - 1 - len(rows))
    if extra <= 0:
        return rows
    if 2 * (len(rows) + extra) >= num_keys:  # a crowded key space: draw from the free keys
        free = np.setdiff1d(np.arange(1, num_keys, dtype=np.int64), rows.keys)
        pad = rng.choice(free, size=extra, replace=False)
    else:  # rejection sampling: O(extra) whatever the catalog's size
        pad = np.zeros(0, np.int64)
        while pad.size < extra:
            draw = rng.integers(1, num_keys, size=2 * extra + 8)
            pad = np.unique(np.concatenate([pad, draw[~np.isin(draw, rows.keys)]]))
        pad = rng.choice(pad, size=extra, replace=False)
    counts = rng.choice(rows.counts, size=extra) if len(rows) else np.ones(extra, np.int64)
    keys = np.concatenate([rows.keys, pad])
    order = np.argsort(keys, kind="stable")
    deltas = torch.cat([rows.deltas, rows.deltas.new_zeros(extra, rows.deltas.shape[1])])
    return SparseRows(
        keys[order],
        deltas[torch.from_numpy(order)],
        np.concatenate([rows.counts, counts]).astype(np.int64)[order],
    )
