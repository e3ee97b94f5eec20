"""Training step time with the tied input lookup against the same step without it, in one
process: two identical srgnn models (hidden 100, batch 100, full softmax) alternate blocks of
steps, so load from other work hits both alike. The baseline is autograd's own embedding
backward: a zero-filled dense table gradient added to the loss's (the code before the tie).

    python benchmarks/tied_lookup.py --data ../shared/data     # Diginetica, 43,097 items
    python benchmarks/tied_lookup.py                           # synthetic, no data needed
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from _common import load_avg, median
from speed import add_data_options, load_examples

import fedenc.encoders.base as base
from fedenc.data.batching import build_batch
from fedenc.encoders.registry import build_encoder
from fedenc.training.allocator import tune_allocator


@contextlib.contextmanager
def _no_tie(table: torch.Tensor) -> Iterator[None]:
    yield None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(ap)
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--pairs", type=int, default=9, help="blocks per variant")
    args = ap.parse_args()
    tune_allocator()  # as the trainer does
    name, ex = load_examples(args)
    rng = np.random.default_rng(0)
    batches = [build_batch(ex, rng.integers(0, len(ex), 100)) for _ in range(args.steps)]
    tied = base.tied

    def make() -> tuple[Any, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = build_encoder("srgnn", ex.num_items)
        return model, torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)

    variants = {"tied": make(), "untied": make()}

    def block(which: str) -> float:
        model, opt = variants[which]
        base.tied = tied if which == "tied" else _no_tie  # type: ignore[assignment]
        try:
            t0 = time.perf_counter()
            for b in batches:
                opt.zero_grad(set_to_none=True)
                model.loss(b).backward()
                opt.step()
            return (time.perf_counter() - t0) / len(batches) * 1e3
        finally:
            base.tied = tied

    for which in variants:
        block(which)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.pairs):
        for which in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            times[which].append(block(which))
    ratios = [a / b for a, b in zip(times["tied"], times["untied"], strict=True)]
    print(
        f"srgnn on {name}: {ex.num_items:,} items, hidden 100, batch 100, torch threads "
        f"{torch.get_num_threads()}, load avg {load_avg()}, {args.pairs} paired blocks of "
        f"{args.steps} steps"
    )
    print(f"tied lookup   {median(times['tied']):7.1f} ms/step")
    print(f"untied        {median(times['untied']):7.1f} ms/step   (baseline, same process)")
    print(f"ratio tied/untied: median of pairs {median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
