"""Cost-balanced local work: the master's use of the cost model across children.

Each child reports how long its local training took and how many examples it trained on; their
ratio is its measured cost per example (its hardware, its load, its deliberate slowdown). A round
then gives child ``i`` the work ``w_i = T / c_i`` so that every child needs about ``T`` seconds:

* with a deadline ``D`` (seconds of local training per round), ``T = D``;
* without one, ``T`` keeps the round's total work equal to the uniform round's (without caps,
  ``T = sum(u_i) / sum(1 / c_i)``), so the federation trains as many examples per round as before
  but nobody waits on a straggler. This needs headroom: with ``max_examples_per_epoch`` below
  the children's data, fast children can take over work from slow ones.

``w_i`` never exceeds the child's data and never drops below ``floor`` examples. Children
without a measurement yet (the first round, a child that just joined) keep their uniform work.
Costs are smoothed over rounds (EMA) so that one noisy round does not swing the assignment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


class WorkBalancer:
    def __init__(self, deadline: float = 0.0, smoothing: float = 0.5, floor: int = 1) -> None:
        if deadline < 0:
            raise ValueError(f"deadline must be >= 0 seconds (got {deadline})")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must lie in (0, 1] (got {smoothing})")
        self.deadline = deadline
        self.smoothing = smoothing
        self.floor = max(1, floor)
        self.cost: dict[int, float] = {}  # seconds per example, by node

    def observe(self, node: int, seconds: float | None, examples: float | None) -> None:
        """Record a child's measured local training time for ``examples`` examples."""
        if seconds is None or examples is None or not examples > 0 or not seconds > 0:
            return
        if not math.isfinite(seconds):
            return
        c = seconds / examples
        old = self.cost.get(node)
        self.cost[node] = c if old is None else self.smoothing * c + (1 - self.smoothing) * old

    def assign(
        self, uniform: Mapping[int, int], limit: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Work per node (examples per epoch) for the nodes in ``uniform`` (their uniform work),
        at most ``limit`` (their data; default: the uniform work); empty until every one of them
        has a measured cost.

        Without a deadline, ``T`` solves ``sum(min(T / c_i, limit_i)) = sum(uniform_i)`` (water
        filling): children whose data run out first are capped and the rest share the remainder
        at equal finish times."""
        if not uniform or any(n not in self.cost for n in uniform):
            return {}
        cap = {n: max(uniform[n], (limit or uniform).get(n, uniform[n])) for n in uniform}
        if self.deadline > 0:
            target = self.deadline
        else:
            total = sum(uniform.values())
            lo, hi = 0.0, max(cap[n] * self.cost[n] for n in uniform)
            for _ in range(100):  # bisection on T: the filled work grows with T
                mid = (lo + hi) / 2
                if sum(min(mid / self.cost[n], cap[n]) for n in uniform) < total:
                    lo = mid
                else:
                    hi = mid
            target = hi
        out = {}
        for node in uniform:
            work = round(target / self.cost[node])
            out[node] = max(min(work, cap[node]), min(self.floor, cap[node]))
        return out
