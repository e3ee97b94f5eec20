"""What every distributed PS offers: the in-process one (:mod:`.inprocess`) and the gRPC client
of the sharded one (:mod:`.client`) are interchangeable behind :class:`DistributedPS`."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from torch import Tensor


class DistributedPS(Protocol):
    """A table of ``num_keys`` rows of ``width`` float32 values, split over shards."""

    @property
    def num_keys(self) -> int: ...

    @property
    def width(self) -> int: ...

    def pull(self, keys: NDArray[np.int64]) -> Tensor:
        """The rows of ``keys`` (duplicates allowed), shape ``(len(keys), width)``."""
        ...

    def push(self, keys: NDArray[np.int64], rows: Tensor, overwrite: bool = False) -> int:
        """Apply deltas through the shards' row optimizer (or overwrite); keys unique.
        Returns the rows applied. Raises :class:`~fedenc.ps.table.PSError` when refused."""
        ...

    def stats(self) -> list[dict[str, Any]]:
        """One dict per shard (see ``StatsResponse``)."""
        ...

    def snapshot(self) -> list[str]:
        """Every shard writes its snapshot to its configured path; the paths."""
        ...

    def close(self) -> None: ...
