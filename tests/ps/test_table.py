"""A shard's table: refusals change nothing, snapshots round-trip atomically, init is
independent of the number of shards."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.optimizers import RowOptimizerConfig
from fedenc.ps.routing import shard_of
from fedenc.ps.table import PSError, ShardTable, TableSpec

SPEC = TableSpec(num_keys=200, width=8, num_shards=2, optimizer=RowOptimizerConfig("adam"))


def _key_of(shard: int) -> int:
    return int(np.flatnonzero(shard_of(np.arange(200), 2) == shard)[0])


def test_initial_rows_do_not_depend_on_sharding() -> None:
    keys = np.arange(200, dtype=np.int64)
    one = InProcessPS(TableSpec(200, 8, num_shards=1)).pull(keys)
    four = InProcessPS(TableSpec(200, 8, num_shards=4)).pull(keys)
    assert torch.equal(one, four)
    bound = 1 / 8**0.5
    assert float(one.abs().max()) <= bound and float(one.std()) > bound / 3


@pytest.mark.parametrize(
    ("keys", "rows", "message"),
    [
        ([200], torch.zeros(1, 8), r"unknown key 200 .* key space is \[0, 200\)"),
        ([-3], torch.zeros(1, 8), "unknown key -3"),
        ([None], torch.zeros(1, 7), "the table's rows are 8 wide"),
        ([None], torch.full((1, 8), float("nan")), "NaN/Inf"),
        ([None, None], torch.zeros(2, 8), "appears twice"),
        ([None], torch.zeros(1, 8, dtype=torch.float64), "must be float32"),
    ],
)
def test_refused_pushes_change_nothing(
    keys: list[int | None], rows: torch.Tensor, message: str
) -> None:
    table = ShardTable(SPEC, 0)
    own = _key_of(0)
    arr = np.array([own if k is None else k for k in keys], dtype=np.int64)
    before = table.values.clone()
    with pytest.raises(PSError, match=message):
        table.push(arr, rows)
    assert torch.equal(table.values, before)
    assert table.version == 0 and table.stats()["refused"] == 1


def test_a_shard_refuses_another_shards_key() -> None:
    with pytest.raises(PSError, match=r"belongs to shard 1/2, not to this shard 0/2"):
        ShardTable(SPEC, 0).pull(np.array([_key_of(1)]))


def test_snapshot_and_restore_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "snap" / "shard.pt"
    table = ShardTable(SPEC, 1, path)
    keys = np.array([_key_of(1)])
    table.push(keys, torch.ones(1, 8), client_id="c", sequence=1)
    table.snapshot()
    saved = table.values.clone(), {k: v.clone() for k, v in table.optimizer.state.items()}
    table.push(keys, torch.ones(1, 8), client_id="c", sequence=2)
    assert not torch.equal(table.values, saved[0])

    fresh = ShardTable(SPEC, 1, path)
    assert fresh.restore() == (path, 1)
    assert torch.equal(fresh.values, saved[0])
    for name, t in saved[1].items():
        assert torch.equal(fresh.optimizer.state[name], t)
    # The push sequence is part of the snapshot: a retried push 1 is recognised, push 2 applies.
    assert fresh.push(keys, torch.ones(1, 8), client_id="c", sequence=1).duplicate
    assert fresh.push(keys, torch.ones(1, 8), client_id="c", sequence=2).version == 2
    assert [p.name for p in path.parent.iterdir()] == ["shard.pt"]  # no temporary left


def test_restore_refuses_foreign_or_missing_snapshots(tmp_path: Path) -> None:
    path = tmp_path / "s.pt"
    ShardTable(SPEC, 0, path).snapshot()
    with pytest.raises(PSError, match="another shard or table: shard 0 here 1"):
        ShardTable(SPEC, 1, path).restore()
    wider = replace(SPEC, width=SPEC.width * 2)
    with pytest.raises(PSError, match=f"width {SPEC.width} here {SPEC.width * 2}") as err:
        ShardTable(wider, 0, path).restore()
    assert "num_keys" not in str(err.value)  # only what differs is named
    with pytest.raises(PSError, match="does not exist"):
        ShardTable(SPEC, 0, tmp_path / "none.pt").restore()
    for name, content in (("junk.pt", b"not a snapshot"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PSError, match=r"cannot be read: .+") as err:
            ShardTable(SPEC, 0).restore(tmp_path / name)
        assert "weights_only" not in str(err.value) and "\n" not in str(err.value)


def test_in_process_push_is_all_or_nothing_across_shards() -> None:
    ps = InProcessPS(SPEC)
    before = ps.pull(np.arange(200))
    with pytest.raises(PSError, match="unknown key 999"):
        ps.push(np.array([_key_of(0), _key_of(1), 999]), torch.ones(3, 8))
    assert torch.equal(ps.pull(np.arange(200)), before)
    assert ps.versions() == [0, 0]
