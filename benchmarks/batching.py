"""Session-graph batch construction: fedenc's vectorised builder against the straightforward
per-session Python loop (the public SR-GNN code's approach), measured in the same run.

    python benchmarks/batching.py --data ../shared/data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import data_dir, interleaved, load_avg, median

from fedenc.data.batching import build_batch, build_batch_reference
from fedenc.data.readers import read_session_text
from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    # Graph building works on tiny tensors: one thread, as in a data-loading worker.
    torch.set_num_threads(1)
    root = data_dir(args.data)
    if root is not None and (root / "diginetica" / "train_sessions.txt").is_file():
        name = "diginetica"
        ex = Examples.from_sessions(read_session_text(root / "diginetica" / "train_sessions.txt"))
    else:
        name = "synthetic"
        ex = Examples.from_sessions(generate(SyntheticConfig(num_sessions=50000)).train)
    rng = np.random.default_rng(0)
    print(f"graph batches on {name}, load avg {load_avg()}, median of {args.repeats} repeats")
    print(f"{'batch':>6s}{'vectorised ms':>15s}{'loop ms':>10s}{'speed-up':>10s}")
    for bsz in (100, 500):
        idx = [rng.integers(0, len(ex), bsz) for _ in range(args.batches)]
        t = interleaved(
            {
                "vec": lambda idx=idx: [build_batch(ex, i) for i in idx],
                "loop": lambda idx=idx: [build_batch_reference(ex, i) for i in idx],
            },
            args.repeats,
        )
        v, lo = (1000 * median(t[k]) / args.batches for k in ("vec", "loop"))
        print(f"{bsz:6d}{v:15.2f}{lo:10.2f}{lo / v:9.1f}x")


if __name__ == "__main__":
    main()
