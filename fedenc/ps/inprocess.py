"""The distributed PS inside this process: the same shards, routing, validation and optimizer
as the gRPC one, without the network. For simulations, tests and the baseline of benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedenc.ps.routing import split_by_shard
from fedenc.ps.table import PSError, ShardTable, TableSpec, as_keys, check_push


class InProcessPS:
    """:class:`~fedenc.ps.service.DistributedPS` over ``spec.num_shards`` local shard tables."""

    def __init__(self, spec: TableSpec, snapshot_dir: Path | None = None) -> None:
        self.spec = spec
        self.shards = [
            ShardTable(
                spec,
                i,
                None if snapshot_dir is None else snapshot_dir / shard_file(i, spec.num_shards),
            )
            for i in range(spec.num_shards)
        ]
        self.bytes_pulled = 0
        self.bytes_pushed = 0

    @property
    def num_keys(self) -> int:
        return self.spec.num_keys

    @property
    def width(self) -> int:
        return self.spec.width

    def pull(self, keys: NDArray[np.int64]) -> Tensor:
        keys = as_keys(keys)
        parts = split_by_shard(keys, self.spec.num_shards)
        if len(parts) == 1:
            rows, _ = self.shards[parts[0][0]].pull(keys)
        else:
            rows = torch.empty(keys.size, self.spec.width)
            for shard, pos in parts:
                got, _ = self.shards[shard].pull(keys[pos])
                rows[torch.from_numpy(pos)] = got
        self.bytes_pulled += rows.numel() * 4
        return rows

    def push(self, keys: NDArray[np.int64], rows: Tensor, overwrite: bool = False) -> int:
        keys = as_keys(keys)
        if rows.dim() != 2 or rows.shape[0] != keys.size:
            raise PSError(f"{list(rows.shape)} rows for {keys.size} keys")
        parts = split_by_shard(keys, self.spec.num_shards)
        # Validate every shard's part before applying any, so a refused push changes nothing.
        check_push(keys, rows, self.spec.num_keys, self.spec.width)
        applied = 0
        for shard, pos in parts:
            applied += self.shards[shard].push(keys[pos], rows[pos], overwrite).rows_applied
        self.bytes_pushed += rows.numel() * 4
        return applied

    def stats(self) -> list[dict[str, Any]]:
        return [s.stats() for s in self.shards]

    def snapshot(self) -> list[str]:
        return [str(s.snapshot()[0]) for s in self.shards]

    def restore(self) -> list[int]:
        return [s.restore()[1] for s in self.shards]

    def versions(self) -> list[int]:
        return [s.version for s in self.shards]

    def close(self) -> None:
        pass


def shard_file(shard: int, num_shards: int) -> str:
    """The snapshot file name of a shard."""
    return f"shard-{shard}-of-{num_shards}.pt"
