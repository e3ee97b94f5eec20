"""Target ranks over a whole catalog, counted block by block, optionally capped.

A target's rank is the number of other items scored at least as high as it: exact ties count
against the target, so a model whose scores tie exactly (a 1-wide normalised embedding) gets no
hits from them. The target's own score is its dot product and the items' come from block GEMMs,
whose float rounding differs (and changes with the block's shape), so scores equal up to rounding
fall either way. A NaN target score ranks last.

The items come in blocks, so the (B, N) score matrix never exists, and a block can come from
anywhere: a slice of a local table, or rows pulled from a parameter server.

With ``limit`` (Recall@K and MRR@K need no more than ``limit = max K``), a session leaves the
counting as soon as ``limit`` items beat its target, and the blocks after that are scored for the
sessions still in the running only; its rank is then reported as ``limit``. A trained model's
misses leave within the first blocks, so the scoring costs about the share of hits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def count_ranks(
    session: Tensor,
    target_score: Tensor,
    cols: Tensor,
    blocks: Iterable[tuple[int, Tensor]],
    num_items: int,
    limit: int | None = None,
) -> Tensor:
    """0-based ranks (int64, shape (B,)) of targets ``cols`` (0-based item indices).

    ``session`` (B, d) are the scored session vectors and ``target_score`` (B,) each one's score
    of its target; ``blocks`` yields ``(offset, vectors)`` with the item vectors of items
    ``offset .. offset + len(vectors) - 1``, in order, covering ``0 .. num_items - 1``. With
    ``limit``, ranks of ``limit`` or more (and NaN targets) come back as ``limit``; without,
    a NaN target ranks ``num_items``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    nan = target_score.isnan()  # beats nothing, so it never leaves early; ranks last
    final = torch.zeros(session.shape[0], dtype=torch.float32, device=session.device)
    ranks = torch.zeros_like(final)  # the running counts of the sessions still scored
    alive = torch.arange(session.shape[0], device=session.device)  # their rows in the batch
    # Rows are picked by integer indices, each found once per block: a boolean mask would
    # search its set rows again for every tensor it indexes (a nonzero and a host sync each).
    for lo, vectors in blocks:
        z = session @ vectors.t()
        hi = lo + z.shape[1]
        here = ((cols >= lo) & (cols < hi)).nonzero().squeeze(1)
        z[here, cols[here] - lo] = -torch.inf  # the target does not beat itself
        # In-place float compare (1.0 / 0.0): no bool tensor and no conversion pass.
        ranks += z.ge_(target_score[:, None]).sum(1)
        if limit is None or hi >= num_items:
            continue
        keep = (ranks < limit).nonzero().squeeze(1)  # (a GPU block covers 65k items: 1 sync)
        if keep.shape[0] < ranks.shape[0]:
            final[alive] = ranks  # the leaving sessions' final counts (the others' are rewritten)
            alive, ranks = alive[keep], ranks[keep]
            session, target_score, cols = session[keep], target_score[keep], cols[keep]
            if alive.numel() == 0:
                break
    final[alive] = ranks
    worst = num_items if limit is None else limit
    if limit is not None:
        final.clamp_(max=limit)
    return torch.where(nan, float(worst), final).long()


__all__ = ["count_ranks"]
