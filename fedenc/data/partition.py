"""Split one set of sessions among K children (federated clients).

Three schemes, the usual axes of federated-learning experiments:

- ``iid``: a seeded shuffle dealt into K near-equal parts; the control case.
- ``time``: K contiguous blocks by session timestamp (by stored order when there are none), as
  when children are shops or regions that came online one after another.
- ``dirichlet``: label-skew non-IID (Hsu et al. 2019). Each session gets an item group, the id
  bucket holding most of its clicks, then every group's sessions are dealt to children in
  proportions drawn from ``Dirichlet(alpha)``: small ``alpha`` gives each child few groups, large
  ``alpha`` tends to IID. Buckets are the synthetic generator's clusters; in the SR-GNN-prepared
  files, ids follow first appearance, so buckets group items by when they first sold (a proxy,
  not product categories, which those files do not carry).

Every session goes to exactly one child; each child keeps its sessions in their original
(chronological) order so local train/validation splits still take the most recent sessions.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fedenc.data.sessions import IntArray, Sessions

log = logging.getLogger(__name__)
_told_few: set[tuple[int, int, str]] = set()  # (sessions, children, scheme) already warned of

if TYPE_CHECKING:
    from rich.console import Console

SCHEMES = ("iid", "time", "dirichlet")
_MAX_REDRAWS = 100


def partition(
    sessions: Sessions,
    k: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    min_sessions: int = 1,
    num_groups: int = 20,
) -> list[Sessions]:
    """Split ``sessions`` among ``k`` children by ``scheme`` (see the module docstring)."""
    return [
        sessions.subset(idx)
        for idx in partition_indices(sessions, k, scheme, seed, alpha, min_sessions, num_groups)
    ]


def partition_indices(
    sessions: Sessions,
    k: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    min_sessions: int = 1,
    num_groups: int = 20,
) -> list[IntArray]:
    """The session indices of each child (ascending), as :func:`partition` deals them."""
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"number of children k must be an integer >= 1, got {k!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if min_sessions < 1:
        raise ValueError(f"min_sessions must be >= 1, got {min_sessions}")
    n = len(sessions)
    if n < k * min_sessions:
        raise ValueError(
            f"cannot give {k} children {min_sessions} session(s) each from only {n} sessions"
        )
    if scheme == "iid":
        order = np.random.default_rng(seed).permutation(n)
        parts = np.array_split(order, k)
    elif scheme == "time":
        if sessions.timestamps is None:
            order = np.arange(n, dtype=np.int64)
        else:
            order = np.argsort(sessions.timestamps, kind="stable")
        parts = np.array_split(order, k)
    else:
        if not 0 < alpha < math.inf:  # numpy's Dirichlet draws one-hot shares at infinity
            raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
        parts = _dirichlet(sessions, k, alpha, min_sessions, num_groups, seed)
    return [np.sort(p).astype(np.int64) for p in parts]


def session_groups(sessions: Sessions, num_groups: int = 20) -> IntArray:
    """Each session's item group: the id bucket (of ``num_groups``) holding most of its clicks.

    Ties go to the lower bucket. Buckets are equal slices of ``1..num_items``.
    """
    g = max(1, min(num_groups, sessions.num_items))
    n = len(sessions)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    bucket = (sessions.items - 1) * g // max(sessions.num_items, 1)
    owner = np.repeat(np.arange(n, dtype=np.int64), sessions.lengths)
    counts = np.bincount(owner * g + bucket, minlength=n * g).reshape(n, g)
    groups: IntArray = counts.argmax(axis=1).astype(np.int64)
    return groups


def held_out_indices(
    train: Sessions,
    train_parts: list[IntArray],
    held_out: Sessions,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    num_groups: int = 20,
) -> list[IntArray]:
    """Each child's indices into a held-out split (validation or test) of ``train``, dealt so
    that a child's held-out data follow its training data, ``train_parts`` (the children's
    indices into ``train``, as :func:`partition_indices` dealt them).

    ``iid`` and ``time`` deal the held-out split as :func:`partition_indices` deals ``train``
    (a shuffle; blocks of the held-out period). ``dirichlet`` deals each item group's held-out
    sessions in the proportions the child got of that group's training sessions: dealt apart,
    with proportions of their own, a child that trained on groups 3 and 16 was scored on
    groups 5 and 14. Children may get no held-out session. The parts cover the split."""
    n, k = len(held_out), len(train_parts)
    if scheme != "dirichlet" or n == 0:
        return deal_indices(held_out, k, scheme, seed, alpha, num_groups)
    g = max(1, min(num_groups, train.num_items))
    train_groups = session_groups(train, num_groups)
    taken = np.zeros((g, k), dtype=np.float64)
    for child, idx in enumerate(train_parts):
        taken[:, child] = np.bincount(train_groups[idx], minlength=g)
    groups = session_groups(held_out, num_groups)
    # Its own stream: the training partition (and every result drawn from it) is unchanged.
    rng = np.random.default_rng([seed, 0x5EED])
    owner = np.empty(n, dtype=np.int64)
    for group in np.unique(groups):
        idx = rng.permutation(np.flatnonzero(groups == group))
        total = taken[group].sum()
        # A group no child trained on is dealt like the training groups were.
        share = taken[group] / total if total > 0 else rng.dirichlet(np.full(k, alpha))
        _deal_group(owner, idx, share)
    return [np.flatnonzero(owner == c).astype(np.int64) for c in range(k)]


def deal_indices(
    sessions: Sessions,
    k: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    num_groups: int = 20,
) -> list[IntArray]:
    """:func:`partition_indices` with at least one session per child, except for a split of
    fewer than ``k`` sessions, whose sessions go to the first children (the rest get none)."""
    n = len(sessions)
    if n < k:
        if (n, k, scheme) not in _told_few:  # once, not once per child that deals the split
            _told_few.add((n, k, scheme))
            log.warning(
                "%d sessions for %d children: one each to the first %d, none to the rest (the "
                "%s scheme cannot apply)", n, k, n, scheme,
            )  # fmt: skip
        empty = np.zeros(0, dtype=np.int64)
        return [np.array([i], dtype=np.int64) if i < n else empty for i in range(k)]
    return partition_indices(sessions, k, scheme, seed, alpha, 1, num_groups)


def _deal_group(owner: IntArray, idx: IntArray, share: np.ndarray) -> None:
    """Give the sessions ``idx`` (in their dealing order) to the children in proportions
    ``share``: contiguous runs, the cuts rounded."""
    cuts = np.round(np.cumsum(share)[:-1] * idx.size)
    owner[idx] = np.searchsorted(cuts, np.arange(idx.size), side="right")


def _dirichlet(
    sessions: Sessions, k: int, alpha: float, min_sessions: int, num_groups: int, seed: int
) -> list[IntArray]:
    rng = np.random.default_rng(seed)
    groups = session_groups(sessions, num_groups)
    members = [rng.permutation(np.flatnonzero(groups == g)) for g in np.unique(groups)]
    # Redraw until every child has enough sessions (the usual recipe), then repair if unlucky.
    for _ in range(_MAX_REDRAWS):
        owner = np.empty(len(sessions), dtype=np.int64)
        for idx in members:
            _deal_group(owner, idx, rng.dirichlet(np.full(k, alpha)))
        sizes = np.bincount(owner, minlength=k)
        if sizes.min() >= min_sessions:
            break
    else:
        _repair(owner, sizes, min_sessions, rng)
    return [np.flatnonzero(owner == c) for c in range(k)]


def _repair(owner: IntArray, sizes: IntArray, min_sessions: int, rng: np.random.Generator) -> None:
    """Move random sessions from the largest children to those below ``min_sessions``."""
    for child in np.flatnonzero(sizes < min_sessions):
        while sizes[child] < min_sessions:
            donor = int(np.argmax(sizes))
            give = min(min_sessions - int(sizes[child]), int(sizes[donor]) - min_sessions)
            pick = rng.choice(np.flatnonzero(owner == donor), size=give, replace=False)
            owner[pick] = child
            sizes[donor] -= give
            sizes[child] += give


def partition_stats(parts: list[Sessions]) -> list[dict[str, Any]]:
    """Per-child counts that show how (un)balanced and skewed a partition is."""
    stats: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        counts = np.bincount(part.items, minlength=part.num_items + 1)
        clicks = part.num_clicks
        row: dict[str, Any] = {
            "child": i,
            "sessions": len(part),
            "clicks": clicks,
            "examples": part.num_examples,
            "items": int(np.count_nonzero(counts)),
            "mean_length": clicks / len(part) if len(part) else 0.0,
            "top_item_share": float(counts.max() / clicks) if clicks else 0.0,
        }
        if part.timestamps is not None and len(part):
            row["time_first"] = float(part.timestamps.min())
            row["time_last"] = float(part.timestamps.max())
        stats.append(row)
    return stats


def heterogeneity(parts: list[Sessions]) -> float:
    """Mean pairwise total-variation distance between the children's item distributions.

    0 for identical distributions, 1 for disjoint catalogs: one number for "how non-IID". Even
    an IID split of a finite log is above 0 (sampling noise): :func:`random_heterogeneity` gives
    that level for the same sessions and sizes.
    """
    return _mean_tv([np.bincount(p.items, minlength=p.num_items + 1) for p in parts])


def random_heterogeneity(parts: list[Sessions], seed: int = 0) -> float:
    """:func:`heterogeneity` of the same sessions dealt at random to children of the same sizes:
    the baseline a split's heterogeneity is to be read against."""
    if len(parts) < 2:
        return 0.0
    num_items = max(p.num_items for p in parts)
    items = np.concatenate([p.items for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    np.random.default_rng(seed).shuffle(owner)
    click_owner = np.repeat(owner, lengths)
    return _mean_tv(
        [np.bincount(items[click_owner == c], minlength=num_items + 1) for c in range(len(parts))]
    )


def _mean_tv(counts: list[IntArray]) -> float:
    if len(counts) < 2:
        return 0.0
    p = np.stack([c.astype(np.float64) / max(float(c.sum()), 1.0) for c in counts])
    k = len(counts)
    total = sum(0.5 * float(np.abs(p[i + 1 :] - p[i]).sum()) for i in range(k - 1))
    return total / (k * (k - 1) / 2)


def print_partition_stats(
    parts: list[Sessions], console: Console | None = None, title: str = "Partition"
) -> None:
    """Print :func:`partition_stats` as a rich table (rich is imported only here)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{title} (heterogeneity {heterogeneity(parts):.3f}; a random split of the same "
        f"sizes: {random_heterogeneity(parts):.3f})"
    )
    rows = partition_stats(parts)
    timed = all("time_first" in row for row in rows)
    columns = ["child", "sessions", "clicks", "examples", "items", "mean len", "top item"]
    for col in columns + (["sessions from .. to"] if timed else []):
        table.add_column(col, justify="right")
    for row in rows:
        cells = [
            str(row["child"]),
            f"{row['sessions']:,}",
            f"{row['clicks']:,}",
            f"{row['examples']:,}",
            f"{row['items']:,}",
            f"{row['mean_length']:.2f}",
            f"{row['top_item_share']:.1%}",
        ]
        if timed:
            cells.append(f"{_day(row['time_first'])} .. {_day(row['time_last'])}")
        table.add_row(*cells)
    (console or Console()).print(table)


def _day(seconds: float) -> str:
    """A session time as a UTC date (seconds since the epoch)."""
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))
