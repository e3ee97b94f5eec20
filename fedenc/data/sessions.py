"""Compact session storage and prefix -> next-item examples.

Sessions are kept in CSR form (one flat ``int64`` item array plus offsets) so that a data set with
millions of clicks costs two arrays, and every augmented example is a view ``(start, length,
target)`` into it: no prefix is ever copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Sessions:
    """Click sessions in CSR form; item ids are ``1..num_items`` (0 is reserved for padding).

    ``items[offsets[i]:offsets[i + 1]]`` is session ``i`` in click order. ``timestamps`` (optional)
    holds one time per session (its last click, seconds) for time-based splits and partitions.
    """

    items: IntArray
    offsets: IntArray
    num_items: int
    timestamps: npt.NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets.size == 0 or self.offsets[0] != 0:
            raise ValueError("offsets must be a 1-D array starting at 0")
        if self.offsets[-1] != self.items.size:
            raise ValueError(
                f"offsets end at {int(self.offsets[-1])} but there are {self.items.size} items"
            )
        if self.items.size and (self.items.min() < 1 or self.items.max() > self.num_items):
            raise ValueError(
                f"item ids must lie in 1..{self.num_items}, got "
                f"{int(self.items.min())}..{int(self.items.max())}"
            )
        if self.timestamps is not None and self.timestamps.shape != (len(self),):
            raise ValueError("timestamps must hold one value per session")

    @classmethod
    def from_lists(
        cls,
        sessions: Iterable[Sequence[int]],
        num_items: int | None = None,
        timestamps: Sequence[float] | None = None,
    ) -> Sessions:
        """Sessions from lists of item ids (1..N, in click order), with an optional timestamp
        per session (for time partitions); ``num_items`` defaults to the largest id seen."""
        seqs = [np.asarray(s, dtype=np.int64) for s in sessions]
        lengths = np.array([s.size for s in seqs], dtype=np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.concatenate(seqs) if seqs else np.zeros(0, dtype=np.int64)
        n = int(items.max()) if num_items is None and items.size else int(num_items or 0)
        ts = None if timestamps is None else np.asarray(timestamps, dtype=np.float64)
        return cls(items=items, offsets=offsets, num_items=n, timestamps=ts)

    def __len__(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def lengths(self) -> IntArray:
        return np.diff(self.offsets)

    @property
    def num_clicks(self) -> int:
        return int(self.items.size)

    @property
    def num_examples(self) -> int:
        """Number of prefix -> next-item examples, ``sum(n - 1)`` (SR-GNN's augmented count)."""
        return int(np.maximum(self.lengths - 1, 0).sum())

    def session(self, i: int) -> IntArray:
        return self.items[self.offsets[i] : self.offsets[i + 1]]

    def to_lists(self) -> list[list[int]]:
        return [self.session(i).tolist() for i in range(len(self))]

    def subset(self, index: IntArray | Sequence[int]) -> Sessions:
        """The sessions at ``index`` (in that order), sharing the catalog size."""
        idx = np.asarray(index, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Vectorised gather of variable-length rows: position of every output click in `items`.
        starts = np.repeat(self.offsets[:-1][idx] - offsets[:-1], lengths)
        items = self.items[starts + np.arange(offsets[-1], dtype=np.int64)]
        ts = None if self.timestamps is None else self.timestamps[idx]
        return Sessions(items=items, offsets=offsets, num_items=self.num_items, timestamps=ts)


@dataclass(frozen=True)
class Examples:
    """Prefix -> next-item examples as views into a :class:`Sessions` store.

    Example ``j`` is the prefix ``sessions.items[start[j]:start[j] + length[j]]`` with target
    ``target[j]``. This is SR-GNN's augmentation: a session ``[i1..in]`` yields ``n - 1`` examples.
    """

    sessions: Sessions
    start: IntArray
    length: IntArray
    target: IntArray

    def __len__(self) -> int:
        return int(self.target.size)

    @property
    def num_items(self) -> int:
        return self.sessions.num_items

    @classmethod
    def from_sessions(cls, sessions: Sessions, order: str = "srgnn") -> Examples:
        """Every prefix of every session with its next click.

        ``order="srgnn"`` lists each session's prefixes longest first, as SR-GNN's preprocessing
        writes them (so test metrics line up example by example); ``"forward"`` shortest first.
        """
        lengths = sessions.lengths
        per = np.maximum(lengths - 1, 0)
        total = int(per.sum())
        sess_idx = np.repeat(np.arange(len(sessions), dtype=np.int64), per)
        first = np.zeros(len(sessions) + 1, dtype=np.int64)
        np.cumsum(per, out=first[1:])
        rank = np.arange(total, dtype=np.int64) - first[sess_idx]  # 0..n-2 within a session
        if order == "srgnn":
            prefix_len = per[sess_idx] - rank
        elif order == "forward":
            prefix_len = rank + 1
        else:
            raise ValueError(f"unknown example order {order!r}; use 'srgnn' or 'forward'")
        start = sessions.offsets[:-1][sess_idx]
        target = sessions.items[start + prefix_len]
        return cls(sessions=sessions, start=start, length=prefix_len, target=target)

    def subset(self, index: IntArray) -> Examples:
        return Examples(self.sessions, self.start[index], self.length[index], self.target[index])

    def prefix(self, j: int) -> IntArray:
        s = int(self.start[j])
        return self.sessions.items[s : s + int(self.length[j])]
