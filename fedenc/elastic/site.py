"""A whole elastic site on one machine: the data server and the task-information server in this
process (on 127.0.0.1), and N computing-server processes — what ``fedenc child --workers N``
runs for its local training. Remote computing servers can join the same site by registering
with :attr:`ElasticSite.task_address` (``fedenc elastic worker --task-server ...``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fedenc.data.sessions import Examples
from fedenc.elastic import data_server as ds_mod
from fedenc.elastic import task_server as tis_mod
from fedenc.elastic.common import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    ElasticError,
)
from fedenc.elastic.data_server import DataServer, DataTask
from fedenc.elastic.task_server import TaskInfoServer
from fedenc.proto.fedenc.v1 import elastic_pb2 as epb
from fedenc.runtime.grpc.transport import ChannelSecurity, ServerSecurity
from fedenc.training.progress import TrainingProgress
from fedenc.training.trainer import Trainer

log = logging.getLogger(__name__)


def worker_command(
    task_address: str, worker_id: str, threads: int = 1, delay: float = 0.0
) -> list[str]:
    return [
        sys.executable, "-m", "fedenc.elastic.worker", "--task-server", task_address,
        "--id", worker_id, "--insecure", "--threads", str(threads), "--delay", str(delay),
        "--exit-with-parent",
    ]  # fmt: skip


class ElasticSite:
    def __init__(
        self,
        workers: int,
        *,
        name: str = "site",
        mode: str = "sync",
        max_staleness: int = 0,
        journal_dir: Path | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        worker_threads: int = 1,
        worker_delay: float = 0.0,
    ) -> None:
        if workers < 0:
            raise ElasticError(f"workers must be >= 0, got {workers}")
        if mode not in ds_mod.MODES:
            raise ElasticError(f"unknown training mode {mode!r}; use sync or async")
        self.name, self.mode, self.max_staleness = name, mode, max_staleness
        self._tmp = None
        if journal_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedenc-elastic-")
            journal_dir = Path(self._tmp.name)
        self.data = DataServer()
        insecure = ServerSecurity(insecure=True)  # loopback only: 127.0.0.1
        self._ds_server, ds_port = ds_mod.serve(self.data, "127.0.0.1:0", insecure)
        self.data_address = f"127.0.0.1:{ds_port}"
        self.tis = TaskInfoServer(
            self.data_address,
            journal_dir,
            channel=ChannelSecurity(insecure=True),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        self._tis_server, tis_port = tis_mod.serve(self.tis, "127.0.0.1:0", insecure)
        self.task_address = f"127.0.0.1:{tis_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_threads, self.worker_delay = worker_threads, worker_delay
        for i in range(workers):
            self.add_worker(f"{name}-w{i}")

    def add_worker(self, worker_id: str) -> subprocess.Popen[bytes]:
        cmd = worker_command(self.task_address, worker_id, self.worker_threads, self.worker_delay)
        env = {**os.environ, "OMP_NUM_THREADS": str(self.worker_threads)}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs[worker_id] = proc
        return proc

    def train(
        self,
        trainer: Trainer,
        examples: Examples,
        epochs: int,
        progress: TrainingProgress | None = None,
        timeout: float = 24 * 3600.0,
    ) -> dict[str, Any]:
        """``epochs`` epochs of ``trainer`` on ``examples`` through the computing servers; the
        trainer's model, optimizer, schedule and shuffling advance as with ``train_epoch``."""
        progress = progress or TrainingProgress(enabled=False)
        task = DataTask.from_trainer(
            f"{self.name}-{uuid.uuid4().hex[:8]}", trainer, examples, epochs, self.mode,
            self.max_staleness,
        )  # fmt: skip
        self.tis.reset_worker_stats()
        t0 = time.perf_counter()
        self.data.start_task(task)
        first = trainer.epochs_done + 1
        bar = progress.start(f"elastic epochs {first}..{first + epochs - 1}", task.total_batches)
        shown = 0
        deadline = time.monotonic() + timeout
        while not task.done.wait(0.25):
            if time.monotonic() > deadline:
                raise ElasticError(f"elastic training did not finish in {timeout:.0f} s")
            if not any(p.poll() is None for p in self.procs.values()) and self.procs:
                alive = [w for w in self.tis.progress().workers if w.alive]
                if not alive:
                    raise ElasticError("every computing server is gone")
            done = len(task.applied)
            if done > shown:
                p = self.tis.progress()
                rate = sum(w.pairs_per_s for w in p.workers if w.alive)
                progress.advance(bar, done - shown, rate, p.loss_sum / max(p.pairs_done, 1))
                shown = done
        seconds = time.perf_counter() - t0
        # Wait for the last report so the counters below are complete.
        while time.monotonic() < deadline:
            p = self.tis.progress()
            if p.task_id == task.task_id and p.finished:
                break
            time.sleep(0.02)
        trainer.epochs_done += epochs
        report = elastic_metrics(p, seconds)
        report["epoch_losses"] = [
            s / n for s, n in zip(task.epoch_loss, task.epoch_pairs, strict=True)
        ]
        report["stale_refused"] = task.stale_refused
        report["pairs"] = int(sum(task.epoch_pairs))
        progress.log(describe(p, seconds))
        return report

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.tis.stop()
        self._tis_server.stop(0)
        self._ds_server.stop(0)
        if self._tmp is not None:
            self._tmp.cleanup()


def elastic_metrics(p: epb.ProgressResponse, seconds: float) -> dict[str, Any]:
    """The round report's elastic counters (plain numbers, as Flower metrics need)."""
    out: dict[str, Any] = {
        "elastic_batches": int(p.batches_done),
        "elastic_in_flight": int(p.in_flight),
        "elastic_reassigned": int(p.reassigned),
        "elastic_duplicates_ignored": int(p.duplicates_ignored),
        "elastic_workers": sum(1 for w in p.workers if w.alive),
        "elastic_pairs_per_s": p.pairs_done / seconds if seconds else 0.0,
    }
    for w in p.workers:
        out[f"elastic_pairs_per_s/{w.worker_id}"] = float(w.pairs_per_s)
    return out


def describe(p: epb.ProgressResponse, seconds: float) -> str:
    workers = ", ".join(
        f"{w.worker_id} {w.batches} batches {w.pairs_per_s:.0f} pairs/s"
        + ("" if w.alive else " (gone)")
        for w in p.workers
    )
    return (
        f"elastic: {p.batches_done}/{p.total_batches} batches in {seconds:.1f} s, "
        f"{p.in_flight} in flight, {p.reassigned} reassigned, {p.duplicates_ignored} duplicate "
        f"reports ignored; {workers}"
    )
