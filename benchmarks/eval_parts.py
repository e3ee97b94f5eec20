"""What the frozen-scope evaluation paths of ``srgnn`` buy, each against its plain counterpart in
the same process (timed alternately), on Diginetica's test pairs with a trained encoder:

- encoding: the plain packed propagation (autograd off, outside ``frozen_scoring()``) against
  the folded-weight inference inside it (``FusedGatedStep``: folded edge projections, the
  first step's position share from a table, CSR aggregation); session vectors compared;
- ranking with ``limit=20``: items in catalogue order against the frozen scope's order (largest
  raw embedding first); ranks compared, and the share of sessions still scored per block;
- the one-off cost of a frozen scope (scoring table, item order, folded weights).

    python benchmarks/eval_parts.py --data ../shared/data --checkpoint runs/accuracy/digi-srgnn-pos
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import data_dir, interleaved, load_avg, median

from fedenc.data.batching import build_batch
from fedenc.data.readers import read_session_text
from fedenc.data.sessions import Examples
from fedenc.encoders.layers.full_softmax import default_chunk
from fedenc.encoders.layers.ranking import count_ranks
from fedenc.encoders.srgnn import SRGNN
from fedenc.training.allocator import tune_allocator
from fedenc.training.checkpoint import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--checkpoint", required=True, help="a trained srgnn (`fedenc train` output)")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--eval-batch", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    root = data_dir(args.data)
    test = None if root is None else root / "diginetica" / "test_sessions.txt"
    if test is None or not test.is_file():
        raise SystemExit("needs diginetica/test_sessions.txt under --data (or $FEDENC_DATA)")
    tune_allocator()
    ex = Examples.from_sessions(read_session_text(test))
    model, _ = load_checkpoint(args.checkpoint)
    if not isinstance(model, SRGNN) or model.config.num_items != ex.num_items:
        raise SystemExit(f"{args.checkpoint} is not an srgnn over {ex.num_items} items")
    model.eval()
    cpu = torch.device("cpu")
    batches = [
        build_batch(ex, np.arange(lo, min(lo + args.eval_batch, len(ex))), cpu)
        for lo in range(0, min(args.pairs, len(ex)), args.eval_batch)
    ]
    n_pairs = sum(b.size for b in batches)
    torch.set_grad_enabled(False)

    def encode_all() -> list[torch.Tensor]:
        return [model.encode(b) for b in batches]

    scope_ms = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with model.frozen_scoring():  # the normalised scoring table
            model._frozen_steps()  # the folded weights
            model._ranking_table()  # the item order
            scope_ms.append(1e3 * (time.perf_counter() - t0))
            fused_vectors = encode_all()
    plain_vectors = encode_all()
    worst = max(
        float((a - b).abs().max() / b.abs().max())
        for a, b in zip(fused_vectors, plain_vectors, strict=True)
    )

    # Alternately: the plain path outside a frozen scope, the folded one inside a fresh scope
    # whose one-off cost stays out of the timing (it is reported above).
    encode_t: dict[str, list[float]] = {"plain": [], "folded": []}
    for _ in range(args.repeats):
        t = time.perf_counter()
        encode_all()
        encode_t["plain"].append(time.perf_counter() - t)
        with model.frozen_scoring():
            model.encode(batches[0])
            t = time.perf_counter()
            encode_all()
            encode_t["folded"].append(time.perf_counter() - t)

    with model.frozen_scoring():
        weights = model.scoring_weights()
        table, place = model._ranking_table()
        assert place is not None
        sessions = [model.scoring_session(v) for v in plain_vectors]
        chunk = default_chunk(weights.device)
        n = weights.shape[0]

        def rank(ordered: bool) -> list[torch.Tensor]:
            out = []
            w = table if ordered else weights
            for s, b in zip(sessions, batches, strict=True):
                cols = place[b.targets - 1] if ordered else b.targets - 1
                blocks = [(lo, w[lo : lo + chunk]) for lo in range(0, n, chunk)]
                out.append(count_ranks(s, (s * w[cols]).sum(1), cols, blocks, n, 20))
            return out

        def still_scored(ordered: bool) -> float:
            w = table if ordered else weights
            shares = [
                _still_scored(s, w, place[b.targets - 1] if ordered else b.targets - 1, chunk)
                for s, b in zip(sessions, batches, strict=True)
            ]
            return float(np.mean(shares))

        plain_alive, ordered_alive = still_scored(False), still_scored(True)
        same = all(torch.equal(a, b) for a, b in zip(rank(False), rank(True), strict=True))
        rank_t = interleaved(
            {"catalogue order": lambda: rank(False), "largest first": lambda: rank(True)},
            args.repeats,
        )

    per = args.eval_batch / n_pairs * 1e3
    print(
        f"srgnn eval parts on {n_pairs:,} Diginetica test pairs, batch {args.eval_batch}, "
        f"{torch.get_num_threads()} threads, load avg {load_avg()}, medians of {args.repeats}"
    )
    print(
        f"one frozen scope (scoring table, folded weights, item order): {median(scope_ms):.1f} ms"
    )
    a, b = median(encode_t["plain"]) * per, median(encode_t["folded"]) * per
    print(f"encode ms/batch: plain {a:.2f}, folded {b:.2f}, {b / a:.3f}x; agree to {worst:.1e}")
    a, b = median(rank_t["catalogue order"]) * per, median(rank_t["largest first"]) * per
    print(
        f"rank ms/batch:   catalogue order {a:.2f}, largest first {b:.2f}, {b / a:.3f}x, "
        f"same ranks: {same}"
    )
    print(
        f"sessions still scored after each {chunk}-item block (share, mean over blocks): "
        f"catalogue order {plain_alive:.3f}, largest first {ordered_alive:.3f}"
    )


def _still_scored(s: torch.Tensor, w: torch.Tensor, cols: torch.Tensor, chunk: int) -> float:
    """Mean share of sessions with fewer than 20 items above the target after each block."""
    scores = s @ w.t()
    target = scores.gather(1, cols[:, None])
    scores[torch.arange(s.shape[0]), cols] = -torch.inf
    above = (scores > target).float()
    ends = [*range(chunk, w.shape[0], chunk), w.shape[0]]
    counts = torch.stack([above[:, :e].sum(1) for e in ends], 1)
    return float((counts < 20).float().mean())


if __name__ == "__main__":
    main()
