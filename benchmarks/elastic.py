"""Elastic training on this machine: training pairs/s of the in-process trainer against 1 and 2
computing servers (synchronous, and asynchronous with staleness 2), and the time from a
SIGKILLed computing server to its batch being applied by another one (median of --kills).

    python benchmarks/elastic.py [--sessions 3000] [--kills 3]

Computing servers start (and import torch) before the clock runs; each gets one torch thread,
as does the in-process baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import signal
import statistics
import time

import torch

from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.elastic.site import ElasticSite
from fedenc.encoders.registry import build_encoder
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("srgnn", 2000, hidden=64)


def ready(site: ElasticSite, n: int) -> None:
    while sum(w.alive for w in site.tis.progress().workers) < n:
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = generate(SyntheticConfig(num_items=2000, num_sessions=args.sessions, seed=3))
    examples = Examples.from_sessions(splits.train)
    config = TrainConfig(epochs=1, batch_size=100, device="cpu")
    trainer = Trainer(model(), copy.deepcopy(config))  # type: ignore[arg-type]
    t0 = time.perf_counter()
    trainer.train_epoch(examples)
    base = len(examples) / (time.perf_counter() - t0)
    print(f"{len(examples)} pairs/epoch, batch 100, srgnn hidden 64, 2000 items")
    print(f"in-process trainer           {base:8.0f} pairs/s   1.00x")
    for workers, mode in ((1, "sync"), (2, "sync"), (2, "async")):
        site = ElasticSite(workers, mode=mode, max_staleness=2)
        try:
            ready(site, workers)
            trainer = Trainer(model(), copy.deepcopy(config))  # type: ignore[arg-type]
            t0 = time.perf_counter()
            report = site.train(trainer, examples, 1)
            rate = len(examples) / (time.perf_counter() - t0)
            print(
                f"{workers} computing server(s) {mode:5s} {rate:8.0f} pairs/s   "
                f"{rate / base:.2f}x  (loss {report['epoch_losses'][0]:.3f}, "
                f"stale refused {report['stale_refused']})"
            )
        finally:
            site.close()

    latencies = []
    site = ElasticSite(2, heartbeat_interval=0.2, heartbeat_timeout=1.0, worker_delay=0.2)
    try:
        for k in range(args.kills):
            name = f"extra{k}"
            if k:
                site.add_worker(name)
            ready(site, 2)
            trainer = Trainer(model(), copy.deepcopy(config))  # type: ignore[arg-type]
            import threading

            thread = threading.Thread(target=site.train, args=(trainer, examples, 1), daemon=True)
            thread.start()
            while site.tis.progress().batches_done < 2:
                time.sleep(0.01)
            busy = [w for w in site.tis.progress().workers if w.busy and w.alive]
            while not busy:
                time.sleep(0.005)
                busy = [w for w in site.tis.progress().workers if w.busy and w.alive]
            victim = busy[0]
            t0 = time.perf_counter()
            site.procs[victim.worker_id].send_signal(signal.SIGKILL)
            while not any(b == victim.batch_id for _, b, _ in site.data.applied_log[-50:]):
                time.sleep(0.005)
            latencies.append(time.perf_counter() - t0)
            thread.join()
    finally:
        site.close()
    print(
        f"SIGKILL -> batch finished elsewhere: median {statistics.median(latencies):.2f} s "
        f"over {len(latencies)} kills (heartbeat 0.2 s, timeout 1.0 s, batch ~0.2 s + compute)"
    )


if __name__ == "__main__":
    main()
