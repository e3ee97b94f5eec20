"""The order in which a trainer visits its examples, epoch after epoch.

An uncapped epoch is one fresh permutation. A capped epoch (``max_examples_per_epoch``, how a
federation sets a round's local work) takes the next ``cap`` examples of a running shuffled
order and reshuffles only when that order is used up: E capped epochs adding up to one pass see
every example exactly once, where a fresh random subset each time would leave about 1/e unseen.
The trainer and the elastic data server share this so their batches are the same.
"""

from __future__ import annotations

import numpy as np


class EpochOrder:
    """Seeded example order; its whole state is ``rng``, ``order`` and ``cursor``."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.order: np.ndarray | None = None  # the running permutation of capped epochs
        self.cursor = 0

    def next_epoch(self, n: int, cap: int = 0) -> np.ndarray:
        """Example indices of the next epoch over ``n`` examples, at most ``cap`` (0 = all)."""
        if not cap or cap >= n:
            return self.rng.permutation(n)
        parts: list[np.ndarray] = []
        need = cap
        while need:
            if self.order is None or self.order.size != n or self.cursor >= n:
                self.order, self.cursor = self.rng.permutation(n), 0
            part = self.order[self.cursor : self.cursor + need]
            self.cursor += part.size
            need -= part.size
            parts.append(part)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def state(self) -> tuple[dict[str, object], np.ndarray | None, int]:
        """A copy of the state, for a snapshot."""
        order = None if self.order is None else self.order.copy()
        return dict(self.rng.bit_generator.state), order, self.cursor

    def restore(self, state: tuple[dict[str, object], np.ndarray | None, int]) -> None:
        rng, order, cursor = state
        self.rng.bit_generator.state = dict(rng)
        self.order = None if order is None else order.copy()
        self.cursor = cursor
