"""The embedded default data set: seeded synthetic sessions with structure worth learning.

``fedenc simulate`` must work on a machine with no data files, and a smoke run is only
informative if a model can beat popularity. The generator therefore has the shape of real
e-commerce sessions:

- items ``1..N`` fall into ``num_clusters`` contiguous id blocks (categories), with Zipf-like
  popularity inside each block;
- a session has an *intent* cluster (drawn by cluster popularity) and starts on a popular item
  of it;
- each next click repeats the current item (``repeat_prob``), follows one of the current item's
  few fixed likely successors (``follow_prob``; successors sit mostly in the item's own cluster,
  each lies in another cluster with ``jump_prob``), or otherwise is a popular item of the intent
  cluster — so the last item matters most, and the session's start still carries information;
- lengths are ``2 + Poisson(mean_length - 2)``, clipped to ``max_length``; session times increase.

Sessions are generated a click position at a time for all sessions at once (about ``max length``
numpy steps), so 20k sessions take a few tens of milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedenc.data.sessions import IntArray, Sessions
from fedenc.data.splits import DataSplits, train_valid_split

FloatArray = npt.NDArray[np.float64]
_EPOCH = 1_704_067_200.0  # 2024-01-01 UTC: an arbitrary, fixed start for synthetic time


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, structure and seed of the synthetic data set (see the module docstring)."""

    num_items: int = 2000
    num_clusters: int = 20
    num_sessions: int = 20000
    mean_length: float = 5.0
    max_length: int = 50
    successors: int = 4
    follow_prob: float = 0.75
    repeat_prob: float = 0.05
    jump_prob: float = 0.1
    zipf_exponent: float = 1.0
    test_fraction: float = 0.1
    valid_fraction: float = 0.1
    days: float = 30.0
    seed: int = 0
    name: str = "synthetic"

    def __post_init__(self) -> None:
        if self.num_clusters < 1 or self.num_items < 2 * self.num_clusters:
            raise ValueError("need num_clusters >= 1 and at least 2 items per cluster")
        if self.num_sessions < 3:
            raise ValueError("need at least 3 sessions (train, valid and test)")
        if not 2.0 <= self.mean_length <= self.max_length:
            raise ValueError("need 2 <= mean_length <= max_length")
        if self.successors < 1:
            raise ValueError("successors must be >= 1")
        probs = (self.follow_prob, self.repeat_prob, self.jump_prob)
        if min(probs) < 0 or self.follow_prob + self.repeat_prob > 1 or self.jump_prob > 1:
            raise ValueError("probabilities must be >= 0 and follow_prob + repeat_prob <= 1")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid fraction must lie in [0, 1), got {self.valid_fraction}")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test fraction must lie in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class SyntheticWorld:
    """The generator's ground truth: clusters, popularity and the sparse transition table.

    Arrays are indexed by item id (row 0 is unused padding). Exposed so that tests and benchmarks
    can score the generator's own oracle against what a model learns.
    """

    config: SyntheticConfig
    cluster_of: IntArray  # (N + 1,)
    cluster_start: IntArray  # (C + 1,) first item id of each cluster, then N + 1
    popularity: FloatArray  # (N + 1,) within-cluster probability of each item
    cluster_weight: FloatArray  # (C,) probability of each intent cluster
    successor: IntArray  # (N + 1, K) likely next items of each item
    successor_cdf: FloatArray  # (N + 1, K) cumulative successor probabilities

    @classmethod
    def build(cls, config: SyntheticConfig) -> SyntheticWorld:
        rng = np.random.default_rng([config.seed, 0])
        n, c, k = config.num_items, config.num_clusters, config.successors
        ids = np.arange(1, n + 1, dtype=np.int64)
        cluster_of = np.zeros(n + 1, dtype=np.int64)
        cluster_of[1:] = (ids - 1) * c // n
        cluster_start = np.searchsorted(cluster_of[1:], np.arange(c + 1), side="left") + 1
        # Random Zipf rank of each item inside its cluster.
        order = np.lexsort((rng.random(n), cluster_of[1:]))
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n) - (cluster_start[cluster_of[1:]] - 1)[order]
        weight = 1.0 / (rank + 1.0) ** config.zipf_exponent
        mass = np.bincount(cluster_of[1:], weights=weight, minlength=c)
        popularity = np.zeros(n + 1)
        popularity[1:] = weight / mass[cluster_of[1:]]
        cluster_weight = 1.0 / np.sqrt(rng.permutation(c) + 1.0)
        cluster_weight /= cluster_weight.sum()

        world = cls(
            config=config,
            cluster_of=cluster_of,
            cluster_start=cluster_start,
            popularity=popularity,
            cluster_weight=cluster_weight,
            successor=np.zeros((n + 1, k), dtype=np.int64),
            successor_cdf=np.ones((n + 1, k)),
        )
        # Successors: popular items of the item's own cluster, or (jump_prob) of another one.
        home = np.repeat(cluster_of[1:], k)
        jump = rng.random(n * k) < config.jump_prob
        other = (home + rng.integers(1, max(c, 2), size=n * k)) % c
        target_cluster = np.where(jump & (c > 1), other, home)
        succ = world.sample_in_cluster(target_cluster, rng)
        source = np.repeat(ids, k)
        clash = succ == source  # no self-successors: take the next id inside the same cluster
        start, stop = cluster_start[target_cluster[clash]], cluster_start[target_cluster[clash] + 1]
        succ[clash] = start + (succ[clash] + 1 - start) % (stop - start)
        world.successor[1:] = succ.reshape(n, k)
        probs = -np.sort(-rng.dirichlet(np.ones(k), size=n), axis=1)
        world.successor_cdf[1:] = np.cumsum(probs, axis=1)
        world.successor_cdf[:, -1] = 1.0
        return world

    def sample_in_cluster(self, clusters: IntArray, rng: np.random.Generator) -> IntArray:
        """One item per entry of ``clusters``, drawn by within-cluster popularity."""
        cum = np.cumsum(self.popularity[1:])  # clusters are contiguous: per-cluster CDF slices
        base = np.concatenate(([0.0], cum))[self.cluster_start[:-1] - 1]
        x = base[clusters] + rng.random(clusters.size)
        item = np.searchsorted(cum, x, side="right") + 1
        # Clip rounding strays back into the cluster.
        lo, hi = self.cluster_start[clusters], self.cluster_start[clusters + 1] - 1
        return np.clip(item, lo, hi).astype(np.int64)

    def sample_sessions(self, num_sessions: int, rng: np.random.Generator) -> Sessions:
        """``num_sessions`` sessions in time order (timestamps: session end, seconds)."""
        cfg = self.config
        lengths = 2 + rng.poisson(cfg.mean_length - 2.0, size=num_sessions)
        lengths = np.minimum(lengths, cfg.max_length).astype(np.int64)
        width = int(lengths.max())
        intent = rng.choice(cfg.num_clusters, size=num_sessions, p=self.cluster_weight)
        clicks = np.zeros((num_sessions, width), dtype=np.int64)
        cur = self.sample_in_cluster(intent, rng)
        clicks[:, 0] = cur
        for t in range(1, width):
            u = rng.random(num_sessions)
            slot = (rng.random(num_sessions)[:, None] > self.successor_cdf[cur]).sum(1)
            follow = self.successor[cur, np.minimum(slot, cfg.successors - 1)]
            browse = self.sample_in_cluster(intent, rng)
            repeat = u < cfg.repeat_prob
            follows = ~repeat & (u < cfg.repeat_prob + cfg.follow_prob)
            cur = np.where(repeat, cur, np.where(follows, follow, browse))
            clicks[:, t] = cur
        mask = np.arange(width)[None, :] < lengths[:, None]
        offsets = np.zeros(num_sessions + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gaps = rng.exponential(size=num_sessions)
        times = _EPOCH + np.cumsum(gaps) * (cfg.days * 86400.0 / gaps.sum())
        return Sessions(
            items=clicks[mask], offsets=offsets, num_items=cfg.num_items, timestamps=times
        )

    def transition_probs(self, items: IntArray) -> FloatArray:
        """``P(next | current item)`` as a dense ``(B, N + 1)`` matrix, intent cluster taken
        to be the current item's own (the best a last-item-only predictor can assume)."""
        cfg = self.config
        items = np.asarray(items, dtype=np.int64)
        b = items.size
        out = np.zeros((b, cfg.num_items + 1))
        rows = np.arange(b)
        cdf = self.successor_cdf[items]
        probs = np.diff(cdf, axis=1, prepend=0.0)
        np.add.at(out, (rows[:, None], self.successor[items]), cfg.follow_prob * probs)
        out[rows, items] += cfg.repeat_prob
        browse = 1.0 - cfg.follow_prob - cfg.repeat_prob
        same = self.cluster_of[None, :] == self.cluster_of[items][:, None]
        out += browse * np.where(same, self.popularity[None, :], 0.0)
        out[:, 0] = 0.0
        return out

    def top_next(self, k: int = 20) -> IntArray:
        """``(N + 1, k)`` table: the ``k`` most likely next items after each item (the oracle)."""
        ids = np.arange(self.config.num_items + 1, dtype=np.int64)
        table = np.zeros((ids.size, k), dtype=np.int64)
        for lo in range(1, ids.size, 512):
            probs = self.transition_probs(ids[lo : lo + 512])
            top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
            table[lo : lo + 512] = top
        return table


def generate(config: SyntheticConfig | None = None) -> DataSplits:
    """The synthetic data set of ``config``: the last ``test_fraction`` of sessions (by time) are
    test, validation is the end of the rest. Same config and seed, same data."""
    cfg = config or SyntheticConfig()
    world = SyntheticWorld.build(cfg)
    sessions = world.sample_sessions(cfg.num_sessions, np.random.default_rng([cfg.seed, 1]))
    n_test = max(1, round(cfg.test_fraction * cfg.num_sessions))
    cut = cfg.num_sessions - n_test
    train_all = sessions.subset(np.arange(cut, dtype=np.int64))
    test = sessions.subset(np.arange(cut, cfg.num_sessions, dtype=np.int64))
    train, valid = train_valid_split(train_all, cfg.valid_fraction)
    return DataSplits(name=cfg.name, train=train, valid=valid, test=test, num_items=cfg.num_items)
