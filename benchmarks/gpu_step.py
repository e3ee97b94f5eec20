"""Where a GPU training step of srgnn goes (hidden 100, batch 100, full softmax over the
catalog): step time of the trainer's current path (its CUDA defaults: graphs built on the GPU,
65,536-item scoring blocks, padded propagation, the per-step NaN check) against variants, each
changing one thing, interleaved in one process; then a profile of the current path. Needs a
CUDA GPU.

    python benchmarks/gpu_step.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import numpy as np
import torch
from _common import interleaved, median
from speed import add_data_options, load_examples

import fedenc.encoders.base as base_mod
from fedenc.data.batching import build_batch
from fedenc.encoders.registry import build_encoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(ap)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    name, ex = load_examples(args)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    torch.manual_seed(0)
    model = build_encoder("srgnn", ex.num_items, hidden=100).to(cuda)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, len(ex), 100) for _ in range(args.steps)]
    original = base_mod.full_softmax_cross_entropy

    def step_fn(host_graphs: bool, chunk: int | None, sync: bool) -> Any:
        def run() -> None:
            base_mod.full_softmax_cross_entropy = functools.partial(original, chunk=chunk)
            for idx in blocks:
                if host_graphs:
                    batch = build_batch(ex, idx, cpu).to(cuda, non_blocking=False)
                else:
                    batch = build_batch(ex, idx, cuda)
                opt.zero_grad(set_to_none=True)
                loss = model.loss(batch)
                if sync:
                    float(loss.detach())  # the trainer's per-step NaN check
                loss.backward()
                opt.step()
            torch.cuda.synchronize()
            base_mod.full_softmax_cross_entropy = original

        return run

    variants = {
        "current": step_fn(False, None, True),  # chunk None: the device default
        "host graphs": step_fn(True, None, True),
        "CPU blocks (4096)": step_fn(False, 4096, True),
        "no loss sync": step_fn(False, None, False),
    }
    for fn in variants.values():
        fn()
    times = interleaved(variants, args.repeats)
    print(f"srgnn on {name}, {torch.cuda.get_device_name()}: ms/step, median of {args.repeats}")
    for k, v in times.items():
        ms = 1000 * median(v) / args.steps
        print(f"{k:20s}{ms:8.2f} ms  {100 * args.steps / median(v):9,.0f} pairs/s")
    t0 = time.perf_counter()
    for _ in range(3):
        build_batch(ex, blocks[0], cpu)
    print(f"host graph build: {1000 * (time.perf_counter() - t0) / 3:.2f} ms/batch")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        variants["current"]()
    print(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40
        )
    )
    print(
        prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=40
        )
    )


if __name__ == "__main__":
    main()
