"""Fusion throughput and memory (issue 3): K parameter sets of P float32 values each folded by
every rule, in GB/s of input, next to a NumPy copy of the same bytes into one reused buffer
(measured in the same run, interleaved); then the peak memory of each rule as K grows, with the
updates made one at a time and dropped after folding, as the master does with streamed replies.

    python benchmarks/fusion.py                     # K = 10 sets of 10M parameters
    python benchmarks/fusion.py --params 1000000 --ks 2 4 8

Throughput counts input bytes (K x P x 4) over the time from ``begin`` to ``result``, validation
(names, shapes, dtypes, NaN/Inf) included. Memory is the peak RSS of a fresh process above its
RSS after the imports and the first update, so it is the rule's own state plus one update.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch
from _common import load_avg, median

from fedenc.federation.fusion import FusionRule, build_fusion_rule
from fedenc.training.allocator import tune_allocator

RULES = {
    "weighted_sum": {},
    "mean": {},
    "clipped_mean": {"clip_norm": 1e9},
    "fedavgm": {},
    "fedadam": {},
    "median": {},
    "trimmed_mean": {"beta": 0.1},
    "krum": {"num_malicious": 1},
}
SHAPES = 10  # tensors per set: a model is several named tensors, not one flat vector


def _sets(k: int, params: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    size = params // SHAPES
    return [{f"t{j}": torch.randn(size, generator=gen) for j in range(SHAPES)} for _ in range(k)]


def _fuse(
    rule: FusionRule, current: dict[str, torch.Tensor], sets: list[dict[str, torch.Tensor]]
) -> None:
    rule.begin(1, current)
    for i, update in enumerate(sets):
        rule.add(f"child-{i}", update, 100 + i)
    rule.result()


def throughput(args: argparse.Namespace) -> None:
    k, p = args.k, args.params
    sets = _sets(k, p)
    current = {n: torch.zeros_like(t) for n, t in sets[0].items()}
    flat = [np.concatenate([t.numpy() for t in s.values()]) for s in sets]
    dst = np.empty_like(flat[0])

    def numpy_copy() -> None:
        for src in flat:
            np.copyto(dst, src)

    gb = k * p * 4 / 1e9
    print(f"fusion of K={k} sets x {p:,} float32 ({gb:.2f} GB of input), {SHAPES} tensors per set,"
          f" torch threads {torch.get_num_threads()}, load avg {load_avg()}")  # fmt: skip
    print(f"{'rule':<14}{'GB/s':>8}{'copy GB/s':>11}{'ratio':>7}{'streaming':>11}")
    for name in args.rules:
        times: dict[str, list[float]] = {"rule": [], "copy": []}
        # One rule for every repeat, as the master keeps one for a whole job: its buffers are
        # allocated in the warm-up and reused, as they are from round to round.
        rule = build_fusion_rule(name, **RULES[name])
        _fuse(rule, current, sets)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            numpy_copy()
            times["copy"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _fuse(rule, current, sets)
            times["rule"].append(time.perf_counter() - t0)
        rule_gbs, copy_gbs = gb / median(times["rule"]), gb / median(times["copy"])
        streaming = rule.streaming
        print(f"{name:<14}{rule_gbs:8.2f}{copy_gbs:11.2f}{rule_gbs / copy_gbs:7.2f}"
              f"{'yes' if streaming else 'no':>11}")  # fmt: skip


def _status_kib(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def memory_child(name: str, k: int, params: int) -> None:
    """One measurement, in a fresh process: fold K updates made one at a time."""
    size = params // SHAPES
    current = {f"t{j}": torch.zeros(size) for j in range(SHAPES)}
    rule = build_fusion_rule(name, **RULES[name])
    gen = torch.Generator().manual_seed(0)
    first = {n: torch.randn(size, generator=gen) for n in current}
    base = _status_kib()  # imports, the current target and one update
    rule.begin(1, current)
    rule.add("child-0", first, 100)
    del first
    for i in range(1, k):
        rule.add(f"child-{i}", {n: torch.randn(size, generator=gen) for n in current}, 100 + i)
    rule.result()
    # VmHWM, not ru_maxrss: the latter survives fork + exec, so a child of the (large) throughput
    # run would report its parent's peak.
    peak = _status_kib("VmHWM")
    print(json.dumps({"extra_mib": (peak - base) / 1024}))


def memory(args: argparse.Namespace) -> None:
    model_mib = args.mem_params * 4 / 2**20
    print(
        f"\npeak memory above one update, model = {args.mem_params:,} float32 ({model_mib:.0f} MiB)"
    )
    print(f"{'rule':<14}" + "".join(f"{'K=' + str(k):>9}" for k in args.ks) + "   (MiB)")
    for name in args.rules:
        row = []
        for k in args.ks:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, str(k), str(args.mem_params)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            row.append(json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"])
        print(f"{name:<14}" + "".join(f"{v:9.0f}" for v in row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rules", nargs="*", default=list(RULES))
    ap.add_argument("--ks", nargs="*", type=int, default=[4, 8, 16])
    ap.add_argument("--mem-params", type=int, default=10_000_000)
    ap.add_argument(
        "--threads", type=int, default=0,
        help="torch threads for the fold; 0 = torch's default, which the master uses (2 here)",
    )  # fmt: skip
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    tune_allocator()  # as the master does (fedenc.federation.master)
    if args.memory_child:
        name, k, p = args.memory_child
        memory_child(name, int(k), int(p))
        return
    if not args.skip_throughput:
        throughput(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
