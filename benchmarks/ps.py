"""The two-level PS, each figure next to a baseline measured in the same run.

1. Pull / push rows/s (d = 100) on loopback with 1, 2 and 4 ``fedenc ps`` shard processes,
   against a plain in-process dict of rows, the in-process PS, and raw gRPC moving the same
   bytes in the same request sizes (a bytes-in/bytes-out unary service in this process).
2. Training pairs/s with the two-level PS (full-softmax path, 2 gRPC shards) against the plain
   in-memory embedding, for exchanges every 1,000 and 10,000 samples and at the end of the
   epoch ("round"), on the synthetic data or ``--data DIR`` (SR-GNN format, e.g.
   ../shared/data/diginetica).

    python benchmarks/ps.py [--data ../shared/data/diginetica] [--pairs 5000]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedenc.data.sessions import Examples  # noqa: E402
from fedenc.data.splits import load_dataset  # noqa: E402
from fedenc.data.synthetic import SyntheticConfig, generate  # noqa: E402
from fedenc.encoders.registry import build_encoder  # noqa: E402
from fedenc.ps.client import REQUEST_BYTES, ShardedClient  # noqa: E402
from fedenc.ps.inprocess import InProcessPS  # noqa: E402
from fedenc.ps.table import TableSpec  # noqa: E402
from fedenc.ps.trainer import PSConfig, PSTrainer  # noqa: E402
from fedenc.training.config import TrainConfig  # noqa: E402
from fedenc.training.trainer import Trainer  # noqa: E402

WIDTH = 100


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start_shards(num_shards: int, num_keys: int) -> tuple[list[subprocess.Popen[str]], list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs, addresses = [], []
    for i in range(num_shards):
        cmd = [
            sys.executable, "-m", "fedenc.cli", "ps", "--shard", f"{i}/{num_shards}",
            "--listen", "127.0.0.1:0", "--num-keys", str(num_keys), "--width", str(WIDTH),
            "--insecure",
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"listening on (\S+)", line)
            if m:
                addresses.append(m.group(1))
                break
        procs.append(proc)
    return procs, addresses


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


def raw_grpc(keys: np.ndarray, repeats: int) -> tuple[float, float]:
    """Seconds to move the same bytes as a pull / push through plain unary gRPC calls."""
    rows = np.zeros((REQUEST_BYTES // (4 * WIDTH + 8), WIDTH), dtype=np.float32).tobytes()
    ident = lambda b: b  # noqa: E731

    def pull(request: bytes, context: object) -> bytes:
        return rows[: len(request) // 8 * 4 * WIDTH]

    def push(request: bytes, context: object) -> bytes:
        return b"ok"

    handler = grpc.method_handlers_generic_handler(
        "raw",
        {
            "Pull": grpc.unary_unary_rpc_method_handler(pull, ident, ident),
            "Push": grpc.unary_unary_rpc_method_handler(push, ident, ident),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call_pull = channel.unary_unary("/raw/Pull", ident, ident)
    call_push = channel.unary_unary("/raw/Push", ident, ident)
    per = REQUEST_BYTES // (4 * WIDTH + 8)
    key_batches = [keys[lo : lo + per].tobytes() for lo in range(0, keys.size, per)]
    row_batches = [rows[: len(k) // 8 * 4 * WIDTH] for k in key_batches]
    t_pull = median_time(lambda: [call_pull(k) for k in key_batches], repeats)
    t_push = median_time(
        lambda: [call_push(k + r) for k, r in zip(key_batches, row_batches, strict=True)], repeats
    )
    channel.close()
    server.stop(0)
    return t_pull, t_push


def rows_per_second(args: argparse.Namespace) -> None:
    num_keys, n = args.keys, args.rows
    keys = np.random.default_rng(0).choice(num_keys, n, replace=False).astype(np.int64)
    delta = torch.full((n, WIDTH), 1e-3)
    print(
        f"\n== pull / push: {n:,} distinct rows of {num_keys:,} (d = {WIDTH}), median of "
        f"{args.repeats}"
    )
    print(f"{'what':<34s}{'pull rows/s':>14s}{'push rows/s':>14s}")
    table = {int(k): np.zeros(WIDTH, dtype=np.float32) for k in range(num_keys)}
    d_np = delta.numpy()

    def dict_pull() -> None:
        np.stack([table[k] for k in keys.tolist()])

    def dict_push() -> None:
        for k, r in zip(keys.tolist(), d_np, strict=True):
            table[k] += r

    def show(name: str, tp: float, tq: float) -> None:
        print(f"{name:<34s}{n / tp:>14,.0f}{n / tq:>14,.0f}")

    show(
        "baseline: python dict of rows",
        median_time(dict_pull, args.repeats),
        median_time(dict_push, args.repeats),
    )
    ips = InProcessPS(TableSpec(num_keys, WIDTH))
    show(
        "in-process PS (1 shard)",
        median_time(lambda: ips.pull(keys), args.repeats),
        median_time(lambda: ips.push(keys, delta), args.repeats),
    )
    tp, tq = raw_grpc(keys, args.repeats)
    show("baseline: raw gRPC, same bytes", tp, tq)
    for shards in (1, 2, 4):
        procs, addresses = start_shards(shards, num_keys)
        try:
            with ShardedClient(addresses) as client:
                show(
                    f"gRPC PS, {shards} shard process(es)",
                    median_time(lambda c=client: c.pull(keys), args.repeats),
                    median_time(lambda c=client: c.push(keys, delta), args.repeats),
                )
        finally:
            stop(procs)


def training(args: argparse.Namespace) -> None:
    if args.data:
        splits = load_dataset(Path(args.data))
    else:
        splits = generate(SyntheticConfig(num_sessions=20000, num_items=args.items, seed=0))
    train = Examples.from_sessions(splits.train)
    n_items = splits.num_items
    config = TrainConfig(epochs=1, batch_size=100, device="cpu", max_examples_per_epoch=args.pairs)
    print(
        f"\n== training pairs/s on {splits.name}: {n_items:,} items, {args.pairs:,} pairs per "
        f"epoch, srgnn d = {WIDTH}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'what':<44s}{'pairs/s':>10s}{'vs plain':>10s}   (plain measured just before)")

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = build_encoder("srgnn", n_items, hidden=WIDTH)
        m.reset_parameters()
        return m

    def run(trainer: Trainer) -> float:
        trainer.train_epoch(train)  # warm-up epoch
        rates = []
        for _ in range(args.epochs):
            t0 = time.perf_counter()
            out = trainer.train_epoch(train)
            rates.append(out["pairs"] / (time.perf_counter() - t0))
        return statistics.median(rates)

    # The baseline is measured again right before each variant (the same plain trainer goes on
    # training), so a change of load on the shared machine hits both sides of each ratio.
    baseline = Trainer(model(), config)
    plains: list[float] = []
    procs, addresses = start_shards(2, n_items + 1)
    try:
        for where in ("in-process", "gRPC 2 shards"):
            for every in (1000, 10000, 0):
                plain = run(baseline)
                plains.append(plain)
                remote = (
                    InProcessPS(TableSpec(n_items + 1, WIDTH))
                    if where == "in-process"
                    else ShardedClient(addresses)
                )
                trainer = PSTrainer(model(), config, remote, PSConfig(exchange_every=every))
                rate = run(trainer)
                label = f"PS {where}, exchange " + (f"every {every:,}" if every else "per epoch")
                print(f"{label:<44s}{rate:>10,.0f}{rate / plain:>10.2f}   (plain {plain:,.0f})")
                remote.close()
    finally:
        stop(procs)
    median_plain = statistics.median(plains)
    print(f"{'baseline: plain in-memory embedding, median':<44s}{median_plain:>10,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=None, help="SR-GNN-format directory (default synthetic)")
    ap.add_argument("--keys", type=int, default=200_000, help="table size for pull/push")
    ap.add_argument("--rows", type=int, default=50_000, help="rows per pull/push")
    ap.add_argument("--items", type=int, default=20_000, help="synthetic catalog size")
    ap.add_argument("--pairs", type=int, default=5000, help="training pairs per timed epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per variant")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-rows", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    if not args.skip_rows:
        rows_per_second(args)
    if not args.skip_training:
        training(args)


if __name__ == "__main__":
    main()
