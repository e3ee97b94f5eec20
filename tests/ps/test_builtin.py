"""The built-in PS: the distributed PS changes only at exchanges (every N samples, counted in
whole batches), exchanges push only touched rows and pull fresh ones, the last window is
flushed, a full local table forces an exchange."""

from __future__ import annotations

import numpy as np
import torch

from fedenc.ps.builtin import BuiltinPS
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.table import TableSpec


def _remote() -> InProcessPS:
    return InProcessPS(TableSpec(num_keys=1000, width=4, num_shards=2))


def _train_batch(ps: BuiltinPS, keys: list[int], size: int) -> bool:
    """A stand-in for one training step: move the batch's rows, then count its samples."""
    slots = ps.resolve(torch.tensor(sorted(keys)))
    with torch.no_grad():
        ps.values[slots] += 0.5
    ps.mark_touched(slots)
    return ps.count(size)


def test_distributed_ps_is_unchanged_between_exchanges() -> None:
    remote = _remote()
    ps = BuiltinPS(remote, torch.zeros(101, 4), exchange_every=250)
    everything = np.arange(1000)
    snapshot = remote.pull(everything)
    exchanged = []
    for step in range(10):  # batches of 100 samples: exchanges after 300, 600, 900 samples
        exchanged.append(_train_batch(ps, [1 + step, 500 + step], 100))
        now = remote.pull(everything)
        if exchanged[-1]:
            assert not torch.equal(now, snapshot)
            snapshot = now
        else:
            assert torch.equal(now, snapshot), f"PS changed between exchanges (batch {step})"
    assert [i for i, e in enumerate(exchanged) if e] == [2, 5, 8]
    assert ps.stats.history == [300, 600, 900]
    assert remote.versions() == [3, 3] or sum(remote.versions()) == 6
    ps.flush()  # the last partial window (batch 9)
    assert ps.stats.history[-1] == 1000
    ps.flush()  # nothing pending: no further exchange
    assert ps.stats.exchanges == 4


def test_exchange_pushes_touched_rows_only_and_lands_where_the_trainer_was() -> None:
    remote = _remote()
    start = remote.pull(np.arange(1000))
    ps = BuiltinPS(remote, torch.zeros(11, 4), exchange_every=0)
    for _ in range(3):
        assert not _train_batch(ps, [3, 7], 50)  # 0 = end of round only
    assert torch.equal(remote.pull(np.arange(1000)), start)
    ps.flush()
    after = remote.pull(np.arange(1000))
    torch.testing.assert_close(after[[3, 7]], start[[3, 7]] + 1.5)
    others = np.setdiff1d(np.arange(1000), [3, 7])
    assert torch.equal(after[others], start[others])
    assert ps.stats.rows_pushed == 2


def test_exchange_pulls_other_trainers_changes() -> None:
    remote = _remote()
    a = BuiltinPS(remote, torch.zeros(11, 4), exchange_every=100)
    b = BuiltinPS(remote, torch.zeros(11, 4), exchange_every=100)
    b.resolve(torch.tensor([5]))
    seen_by_b = b.values[b.resolve(torch.tensor([5]))].clone()
    _train_batch(a, [5], 100)  # a exchanges: the PS moves
    assert torch.equal(b.values[b.resolve(torch.tensor([5]))], seen_by_b)  # b: not yet
    _train_batch(b, [6], 100)  # b's exchange pulls every row it holds
    torch.testing.assert_close(b.values[b.resolve(torch.tensor([5]))], seen_by_b + 0.5)


def test_a_full_local_table_forces_an_exchange() -> None:
    remote = _remote()
    ps = BuiltinPS(remote, torch.zeros(5, 4), exchange_every=10_000)  # 4 slots
    freed: list[torch.Tensor] = []
    ps.on_evict.append(freed.append)
    _train_batch(ps, [1, 2, 3], 10)
    _train_batch(ps, [4, 5], 10)  # needs 2 slots, 1 left
    assert ps.stats.forced_exchanges == 1 and len(freed) == 1
    assert sorted(ps.slot_of) == [4, 5]
    torch.testing.assert_close(
        remote.pull(np.array([1]))[0], ps.base.new_tensor(0) + 0.5 + _init(1)
    )


def _init(key: int) -> torch.Tensor:
    return _remote().pull(np.array([key]))[0]
