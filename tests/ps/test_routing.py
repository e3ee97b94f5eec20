"""Key -> shard routing: stable across processes and versions, balanced, total."""

from __future__ import annotations

import numpy as np
import pytest

from fedenc.ps.routing import keys_of_shard, parse_shard, shard_of, split_by_shard, splitmix64


def test_splitmix64_is_the_published_function() -> None:
    # Reference outputs of splitmix64's finaliser (Vigna) for inputs 0 and 1: routing must never
    # change between versions, or every existing snapshot would hold the wrong keys.
    got = splitmix64(np.array([0, 1], dtype=np.int64))
    assert got.tolist() == [0xE220A8397B1DCDAF, 0x910A2DEC89025CC1]


def test_every_key_has_exactly_one_shard_and_shards_are_balanced() -> None:
    keys = np.arange(100_000, dtype=np.int64)
    owner = shard_of(keys, 4)
    counts = np.bincount(owner, minlength=4)
    assert counts.sum() == keys.size
    assert counts.min() > 0.97 * keys.size / 4  # strided ids too, unlike key % S
    assert np.bincount(shard_of(keys[::4], 4), minlength=4).min() > 0.9 * keys.size / 16
    parts = [keys_of_shard(100_000, s, 4) for s in range(4)]
    assert np.array_equal(np.sort(np.concatenate(parts)), keys)


def test_split_by_shard_returns_each_position_once() -> None:
    keys = np.array([5, 17, 5, 99, 1234, 0], dtype=np.int64)
    parts = split_by_shard(keys, 3)
    positions = np.sort(np.concatenate([pos for _, pos in parts]))
    assert positions.tolist() == list(range(keys.size))
    for shard, pos in parts:
        assert (shard_of(keys[pos], 3) == shard).all()


@pytest.mark.parametrize("text", ["2/2", "x/2", "1", "-1/3", "0/0"])
def test_parse_shard_refuses_bad_specs(text: str) -> None:
    with pytest.raises(ValueError, match="I/S"):
        parse_shard(text)
    assert parse_shard("1/4") == (1, 4)
