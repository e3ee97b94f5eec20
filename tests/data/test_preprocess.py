"""SR-GNN preprocessing: checked against a literal per-click port of the protocol and on rules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedenc.data.preprocess import DAY_SECONDS, PreparedData, SRGNNProtocol, preprocess
from fedenc.data.readers import Clicks, read_diginetica_clicks
from fedenc.data.sessions import Sessions


def reference(clicks: Clicks, proto: SRGNNProtocol) -> tuple[list[list[int]], list[list[int]]]:
    """The protocol as SR-GNN's datasets/preprocess.py spells it: dicts and per-click loops."""
    sess_clicks: dict[int, list[tuple[int, float, int]]] = {}
    sess_date: dict[int, float] = {}
    for row, (s, i, t, o) in enumerate(
        zip(clicks.session, clicks.item, clicks.time, clicks.order, strict=True)
    ):
        sess_clicks.setdefault(int(s), []).append((int(i), float(o), row))
        # preprocess.py sets a session's date when its rows end in the file: its last row's
        # date, which need not be its latest (Diginetica is not sorted by time in a session).
        sess_date[int(s)] = float(t)
    seqs = {
        s: [c[0] for c in sorted(v, key=lambda c: (c[1], c[2]))] for s, v in sess_clicks.items()
    }
    seqs = {s: v for s, v in seqs.items() if len(v) >= proto.min_session_length}
    counts: dict[int, int] = {}
    for v in seqs.values():
        for i in v:
            counts[i] = counts.get(i, 0) + 1
    seqs = {s: [i for i in v if counts[i] >= proto.min_item_support] for s, v in seqs.items()}
    seqs = {s: v for s, v in seqs.items() if len(v) >= proto.min_session_length}
    split = max(sess_date[s] for s in seqs) - proto.test_days * DAY_SECONDS
    tra = sorted((s for s in seqs if sess_date[s] < split), key=lambda s: sess_date[s])
    tes = sorted((s for s in seqs if sess_date[s] > split), key=lambda s: sess_date[s])
    item_dict: dict[int, int] = {}
    train = []
    for s in tra:
        for i in seqs[s]:
            item_dict.setdefault(i, len(item_dict) + 1)
        train.append([item_dict[i] for i in seqs[s]])
    test = [[item_dict[i] for i in seqs[s] if i in item_dict] for s in tes]
    test = [t for t in test if len(t) >= proto.min_session_length]
    if proto.fraction is not None:
        owner = [k for k, t in enumerate(train) for _ in range(len(t) - 1)]
        cut = int(len(owner) * proto.fraction)
        train = train[owner[-cut] :]
    return train, test


def random_log(seed: int, n: int = 3000, sessions: int = 600, items: int = 80) -> Clicks:
    """Sessions in file order (ids first seen in order), dates over ~20 days, shuffled frames."""
    rng = np.random.default_rng(seed)
    sess = np.sort(rng.integers(1, sessions, size=n))
    item = (rng.zipf(1.5, size=n) % items) + 1000
    day = (rng.integers(0, 20, size=sessions)[sess] * DAY_SECONDS + 1.45e9).astype(np.float64)
    order = rng.integers(0, 50, size=n).astype(np.float64)  # ties: file order decides
    return Clicks(session=sess, item=item, time=day, order=order)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "proto",
    [
        SRGNNProtocol(),
        SRGNNProtocol(test_days=3),
        SRGNNProtocol(min_item_support=2, min_session_length=3, test_days=2, fraction=0.25),
    ],
)
def test_matches_reference_port(seed: int, proto: SRGNNProtocol) -> None:
    clicks = random_log(seed)
    got = preprocess(clicks, proto)
    train, test = reference(clicks, proto)
    assert got.train.to_lists() == train
    assert got.test.to_lists() == test


def test_hand_made_log_follows_every_rule() -> None:
    day = DAY_SECONDS
    rows = [
        # session, item, day, order
        (10, 7, 0, 2),
        (10, 5, 0, 1),  # sorted by order -> [5, 7]
        (11, 9, 0, 0),  # length 1: dropped
        (12, 5, 1, 0),
        (12, 7, 1, 1),
        (12, 3, 1, 2),  # 3 is rare: dropped
        (13, 7, 2, 0),
        (13, 5, 2, 1),
        (14, 5, 3, 0),
        (14, 3, 3, 1),  # becomes length 1 after the rare item goes
        (15, 7, 9, 0),
        (15, 5, 9, 1),
        (15, 5, 9, 2),  # test (last 7 days before day 10)
        (16, 5, 10, 0),
        (16, 8, 10, 1),
        (16, 8, 10, 2),
        (16, 8, 10, 3),
        (16, 8, 10, 4),
        (16, 8, 10, 5),  # 8: frequent but only in test -> dropped
        (17, 7, 3, 0),
        (17, 7, 3, 1),  # dated exactly at the split: in neither set
    ]
    s, i, d, o = (np.array(c) for c in zip(*rows, strict=True))
    clicks = Clicks(session=s, item=i, time=d * day, order=o.astype(np.float64))
    got = preprocess(clicks, SRGNNProtocol(test_days=7))
    assert got.split_time == 3 * day
    assert got.train.to_lists() == [[1, 2], [1, 2], [2, 1]]  # 5 -> 1, 7 -> 2 by first appearance
    assert got.item_ids.tolist() == [5, 7]
    assert got.raw_items(np.array([2, 1])).tolist() == [7, 5]
    assert got.test.to_lists() == [[2, 1, 1]]  # session 16 shrinks to [5]: dropped
    assert got.train.timestamps is not None and got.train.timestamps.tolist() == [0, day, 2 * day]
    assert got.counts["raw_sessions"] == 8
    assert got.counts["filtered_sessions"] == 6


def test_fraction_keeps_most_recent_sessions_and_full_catalog() -> None:
    clicks = random_log(5, n=6000, sessions=1500)
    full = preprocess(clicks, SRGNNProtocol(test_days=2))
    part = preprocess(clicks, SRGNNProtocol(test_days=2, fraction=0.25))
    k = len(part.train)
    assert 0 < k < len(full.train)
    assert part.train.to_lists() == full.train.to_lists()[-k:]
    assert part.num_items == full.num_items
    assert part.test.to_lists() == full.test.to_lists()
    assert part.train.num_examples >= int(full.train.num_examples * 0.25)


def test_protocol_validation_and_presets() -> None:
    assert SRGNNProtocol.diginetica().test_days == 7
    yoo = SRGNNProtocol.yoochoose()
    assert (yoo.test_days, yoo.fraction) == (1, 1 / 64)
    for bad in (
        {"min_item_support": 0},
        {"min_session_length": 1},
        {"test_days": 0},
        {"fraction": 0.0},
        {"fraction": 1.5},
    ):
        with pytest.raises(ValueError):
            SRGNNProtocol(**bad)  # type: ignore[arg-type]


def test_degenerate_logs_raise() -> None:
    empty = np.zeros(0, dtype=np.int64)
    with pytest.raises(ValueError, match="empty"):
        preprocess(Clicks(empty, empty, empty.astype(float), empty.astype(float)))
    one = Clicks(np.array([1, 2]), np.array([3, 3]), np.zeros(2), np.zeros(2))
    with pytest.raises(ValueError, match="no session survives"):
        preprocess(one)
    same_day = Clicks(np.repeat([1, 2], 5), np.tile([1, 2, 1, 2, 1], 2), np.zeros(10), np.zeros(10))
    with pytest.raises(ValueError, match="no training session"):
        preprocess(same_day)


# ---------------------------------------------------------------------------- real sample


@pytest.fixture(scope="module")
def sample(real_file: Callable[[str], Path]) -> tuple[Clicks, PreparedData]:
    clicks = read_diginetica_clicks(real_file("srgnn_sample/sample_train-item-views.csv"))
    return clicks, preprocess(clicks, SRGNNProtocol.diginetica())


def test_real_sample_matches_reference_and_published_counts(
    sample: tuple[Clicks, PreparedData],
) -> None:
    clicks, got = sample
    # SOURCE.md: after the standard filter 1,877 clicks, 525 sessions, 317 items.
    assert got.counts["filtered_clicks"] == 1877
    assert got.counts["filtered_sessions"] == 525
    assert got.counts["filtered_items"] == 317
    train, test = reference(clicks, SRGNNProtocol.diginetica())
    assert got.train.to_lists() == train
    assert got.test.to_lists() == test


def test_real_sample_obeys_protocol_rules(sample: tuple[Clicks, PreparedData]) -> None:
    clicks, got = sample
    train, test = got.train, got.test
    assert len(train) > 0 and len(test) > 0
    # Every session has >= 2 clicks.
    assert train.lengths.min() >= 2 and test.lengths.min() >= 2
    # Items are 1..N, contiguous, all used in train, numbered by first appearance.
    assert np.array_equal(np.unique(train.items), np.arange(1, got.num_items + 1))
    first = np.unique(train.items, return_index=True)[1]
    assert np.all(np.diff(first) > 0)
    # No test item unseen in train.
    assert np.isin(test.items, train.items).all()
    # Support: every kept item had >= 5 clicks among sessions of length >= 2 in the raw log.
    _, inv, length = np.unique(clicks.session, return_inverse=True, return_counts=True)
    pool = clicks.item[length[inv] >= 2]
    support = {int(k): int(v) for k, v in zip(*np.unique(pool, return_counts=True), strict=True)}
    raw = got.raw_items(np.arange(1, got.num_items + 1))
    assert min(support[int(r)] for r in raw) >= 5
    # Date split: train strictly before, test strictly after; both sorted by date.
    assert train.timestamps is not None and test.timestamps is not None
    assert train.timestamps.max() < got.split_time < test.timestamps.min()
    assert np.all(np.diff(train.timestamps) >= 0) and np.all(np.diff(test.timestamps) >= 0)
    assert got.split_time == clicks.time.max() - 7 * DAY_SECONDS
    assert isinstance(train, Sessions)


def test_a_session_is_dated_by_its_last_row_in_the_file_not_its_latest_click() -> None:
    # As SR-GNN's preprocess.py: session 1's rows end on day 0 although one click is on day 9,
    # so it is a training session (the latest click would have made it a test one).
    day = DAY_SECONDS
    session = np.array([1, 1, 1, 2, 2, 3, 3] + [4, 4] * 3)
    item = np.array([7, 8, 7, 7, 8, 8, 7] + [7, 8] * 3)
    time = np.array([0, 9, 0, 1, 1, 10, 10, 2, 2, 3, 3, 4, 4]) * day + 1.4e9
    order = np.arange(session.size, dtype=np.float64)
    clicks = Clicks(session, item, time.astype(np.float64), order)
    got = preprocess(clicks, SRGNNProtocol(min_item_support=2, test_days=7.0))
    assert got.split_time == 1.4e9 + 3 * day
    assert len(got.train) == 2 and len(got.test) == 2  # sessions 1 and 2; 4 and 3
    assert got.train.timestamps is not None and got.train.timestamps[0] == 1.4e9
