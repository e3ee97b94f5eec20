"""Which shard holds a key: ``splitmix64(key) mod num_shards``.

A stable hash (the same on every machine, process and Python version, unlike ``hash()``) that
spreads consecutive or strided ids evenly, which ``key mod S`` would not (even ids only, ids of
one category in one block...). Vectorised over numpy arrays, since clients route every request.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(values: NDArray[np.integer]) -> NDArray[np.uint64]:
    """The splitmix64 finaliser of each value (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64, copy=True) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def shard_of(keys: NDArray[np.integer], num_shards: int) -> NDArray[np.int64]:
    """The shard index of every key."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if num_shards == 1:
        return np.zeros(keys.shape, dtype=np.int64)
    return (splitmix64(keys) % np.uint64(num_shards)).astype(np.int64)


def keys_of_shard(num_keys: int, shard: int, num_shards: int) -> NDArray[np.int64]:
    """The sorted keys of ``[0, num_keys)`` that shard ``shard`` holds."""
    check_shard(shard, num_shards)
    keys = np.arange(num_keys, dtype=np.int64)
    return keys if num_shards == 1 else keys[shard_of(keys, num_shards) == shard]


def check_shard(shard: int, num_shards: int) -> None:
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ValueError(f"shard must be I/S with 0 <= I < S, got {shard}/{num_shards}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/S"`` -> ``(I, S)``."""
    try:
        left, right = text.split("/")
        shard, num_shards = int(left), int(right)
    except ValueError:
        raise ValueError(f"shard must look like I/S (e.g. 0/2), got {text!r}") from None
    check_shard(shard, num_shards)
    return shard, num_shards


def split_by_shard(keys: NDArray[np.int64], num_shards: int) -> list[tuple[int, NDArray[np.int64]]]:
    """``(shard, positions in keys)`` for every shard that gets at least one key."""
    owner = shard_of(keys, num_shards)
    if num_shards == 1:
        return [(0, np.arange(keys.size, dtype=np.int64))] if keys.size else []
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=num_shards)
    out: list[tuple[int, NDArray[np.int64]]] = []
    lo = 0
    for shard, count in enumerate(counts.tolist()):
        if count:
            out.append((shard, order[lo : lo + count]))
        lo += count
    return out
