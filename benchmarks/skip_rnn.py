"""Skip RNN benchmark: the saving of the skip path when most steps are skipped (US20210406641A1).

For skip fractions ``f`` (share of click steps that are repeated clicks, so the start nodes tag
their regions), times the vectorised skip path of :class:`SkipGRU` against the **baseline**: the
same unit with the same parameters and inputs but no skip conditions, i.e. the fused GRU cell run
on every row at every step. Medians of ``--repeats`` alternating runs, forward (no grad) and
forward + backward. It also reports the literal node-graph executor's executed node ops on a small
slice of the batch.

    .venv/bin/python benchmarks/skip_rnn.py [--batch 256 --length 50 --hidden 128 ...]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from fedenc.encoders.layers import SkipGRU

SKIP = ["padding", "repeat"]


def make_items(bsz: int, length: int, fraction: float, num_items: int, seed: int) -> Tensor:
    """Random clicks where each step after the first repeats the previous one with prob ``f``."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, num_items + 1, (bsz, length), generator=g)
    repeat = torch.rand(bsz, length, generator=g) < fraction
    for t in range(1, length):
        prev = items[:, t - 1]
        fresh = torch.where(items[:, t] == prev, prev % num_items + 1, items[:, t])  # no accidents
        items[:, t] = torch.where(repeat[:, t], prev, fresh)
    return items


def paired_median_ms(
    baseline: Callable[[], object], candidate: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median wall times (ms) of two functions, run alternately so load drift hits both alike."""
    baseline(), candidate()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, acc in ((baseline, times[0]), (candidate, times[1])):
            start = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[0]), 1e3 * statistics.median(times[1])


def forward(unit: SkipGRU, x: Tensor, items: Tensor, p: Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return unit(x, items, p)

    return run


def train_step(unit: SkipGRU, x: Tensor, items: Tensor, p: Tensor) -> Callable[[], object]:
    def run() -> object:
        unit.zero_grad(set_to_none=True)
        out = unit(x, items, p)
        torch.autograd.backward(out.outputs.sum() + out.hidden.sum())
        return None

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--fractions", default="0,0.5,0.9")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--literal-batch", type=int, default=8, help="rows for the literal op counts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    d = args.hidden
    skip_unit = SkipGRU(d, d, side_features=d, skip=SKIP, skip_output=SKIP)
    base_unit = SkipGRU(d, d, side_features=d, skip=[], skip_output=[])
    base_unit.load_state_dict(skip_unit.state_dict())
    print(
        f"SkipGRU batch={args.batch} length={args.length} hidden={d} threads={args.threads}, "
        f"median of {args.repeats} alternating runs"
    )
    print(f"skip path: {skip_unit!r}")
    print("baseline : the same unit and parameters without skip conditions (fused cell on every")
    print("           row at every step); speed-up = baseline time / skip time\n")
    header = (
        f"{'f':>5} {'skipped':>8} | {'fwd base':>9} {'fwd skip':>9} {'speedup':>8} | "
        f"{'f+b base':>9} {'f+b skip':>9} {'speedup':>8} | {'literal ops':>17}"
    )
    print(header)
    print("-" * len(header))
    nodes_per_step = len(SkipGRU.CELL_NODES) + len(SkipGRU.OUTPUT_NODES)
    for fraction in (float(f) for f in args.fractions.split(",")):
        items = make_items(args.batch, args.length, fraction, 10_000, args.seed)
        g = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(args.batch, args.length, d, generator=g)
        p = torch.randn(args.batch, args.length, d, generator=g)
        keep_cell, _ = skip_unit.active(items)
        skipped = 1.0 - keep_cell.float().mean().item()
        if fraction == 0.0:  # nothing to skip: both runs compute the same thing
            with torch.no_grad():
                torch.testing.assert_close(
                    skip_unit(x, items, p).outputs, base_unit(x, items, p).outputs
                )

        fb, fs = paired_median_ms(
            forward(base_unit, x, items, p), forward(skip_unit, x, items, p), args.repeats
        )
        tb, ts = paired_median_ms(
            train_step(base_unit, x, items, p), train_step(skip_unit, x, items, p), args.repeats
        )
        n = args.literal_batch
        with torch.no_grad():
            lit = skip_unit(x[:n], items[:n], p[:n], executor="literal")
        assert lit.op_counts is not None
        executed, possible = sum(lit.op_counts.values()), nodes_per_step * n * args.length
        print(
            f"{fraction:>5.2f} {skipped:>8.1%} | {fb:>7.1f}ms {fs:>7.1f}ms {fb / fs:>7.2f}x | "
            f"{tb:>7.1f}ms {ts:>7.1f}ms {tb / ts:>7.2f}x | {executed:>7} / {possible:<7}"
        )
    print(
        f"\nliteral ops: node executions by the literal executor on {args.literal_batch} rows "
        f"(of {nodes_per_step} nodes x rows x steps); tagged nodes are never called."
    )


if __name__ == "__main__":
    main()
