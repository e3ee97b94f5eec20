"""A whole elastic site: the data server and the task-information server in this process, and
N computing-server processes on this machine — what ``fedenc child --workers N`` runs for its
local training.

By default the two servers listen on 127.0.0.1 only, in plaintext. With ``listen`` on another
interface, computing servers on other machines join the same site by registering with
:attr:`ElasticSite.task_address` (``fedenc elastic worker --task-server HOST:PORT``); the task
server tells them where the data server is (``advertise``). Off loopback the site needs ``certs``
(a fedenc certificates directory of the site's own: the servers present its master certificate
and require child certificates; the local computing servers and the task server get theirs
issued from its CA key) or an explicit ``insecure``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.progress import TaskID

from fedenc.data.sessions import Examples
from fedenc.elastic import data_server as ds_mod
from fedenc.elastic import task_server as tis_mod
from fedenc.elastic.common import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    ElasticError,
    server_security_of,
)
from fedenc.elastic.data_server import DataServer, DataTask
from fedenc.elastic.task_server import TaskInfoServer
from fedenc.elastic.worker import channel_security
from fedenc.proto.fedenc.v1 import elastic_pb2 as epb
from fedenc.runtime.grpc.launcher import prepare_certs
from fedenc.runtime.grpc.transport import ServerSecurity
from fedenc.training.progress import TrainingProgress
from fedenc.training.trainer import Trainer

log = logging.getLogger(__name__)


def worker_command(
    task_address: str,
    worker_id: str,
    threads: int = 1,
    delay: float = 0.0,
    certs: Path | None = None,
) -> list[str]:
    """A local computing server's command line (mutual TLS as ``worker_id`` with ``certs``)."""
    security = ["--certs", str(certs), "--name", worker_id] if certs else ["--insecure"]
    return [
        sys.executable, "-m", "fedenc.elastic.worker", "--task-server", task_address,
        "--id", worker_id, *security, "--threads", str(threads), "--delay", str(delay),
        "--exit-with-parent",
    ]  # fmt: skip


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ElasticError(f"elastic listen address must be HOST:PORT, got {listen!r}")
    return host, int(port)


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
        listen: str = "127.0.0.1:0",
        advertise: str | None = None,
        certs: Path | None = None,
        insecure: bool = False,
    ) -> None:
        if workers < 0:
            raise ElasticError(f"workers must be >= 0, got {workers}")
        if mode not in ds_mod.MODES:
            raise ElasticError(f"unknown training mode {mode!r}; use sync or async")
        host, port = _split_listen(listen)
        if certs is None and not insecure and not _is_loopback(host):
            raise ElasticError(
                f"the elastic site would listen on {host}, reachable from other machines: give "
                "it certificates (--elastic-certs DIR, from `fedenc certs init --dir DIR "
                "--master-host THIS_HOST`) or accept plaintext explicitly (--elastic-insecure)"
            )
        if advertise is None:  # what other machines dial; a wildcard address is not dialable
            advertise = socket.gethostname() if host in ("0.0.0.0", "::", "[::]") else host
        self.name, self.mode, self.max_staleness = name, mode, max_staleness
        self.certs = certs
        self._tmp = None
        self._stack = ExitStack()
        if journal_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fedenc-elastic-")
            journal_dir = Path(self._tmp.name)
        if certs is not None:  # the site's own services get their child certificates
            own = [f"{name}-tis", *(f"{name}-w{i}" for i in range(workers))]
            prepare_certs(own, certs, self._stack)
            server_security = server_security_of(certs, insecure=False)
        elif _is_loopback(host):
            server_security = ServerSecurity(insecure=True)  # this machine only
        else:
            server_security = server_security_of(None, insecure=True)  # warns: plaintext
        self.data = DataServer()
        self._ds_server, ds_port = ds_mod.serve(self.data, f"{host}:0", server_security)
        self.data_address = f"{advertise}:{ds_port}"
        self.tis = TaskInfoServer(
            self.data_address,
            journal_dir,
            channel=channel_security(str(certs) if certs else None, f"{name}-tis", certs is None),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        self._tis_server, tis_port = tis_mod.serve(self.tis, f"{host}:{port}", server_security)
        self.task_address = f"{advertise}:{tis_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.worker_threads, self.worker_delay = worker_threads, worker_delay
        for i in range(workers):
            self.add_worker(f"{name}-w{i}")

    def add_worker(self, worker_id: str) -> subprocess.Popen[bytes]:
        """Start a local computing server (its certificate is issued first under ``certs``)."""
        if self.certs is not None:
            prepare_certs([worker_id], self.certs, self._stack)
        cmd = worker_command(
            self.task_address, worker_id, self.worker_threads, self.worker_delay, self.certs
        )
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
        deadline = time.monotonic() + timeout
        try:
            self._wait(task, deadline, timeout, progress, bar)
        except BaseException:
            # The site lives as long as its process: a task left running would refuse every
            # later round's ("still running"), and its late results would step the model.
            self.data.abandon_task(task.task_id)
            raise
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

    def _wait(
        self,
        task: DataTask,
        deadline: float,
        timeout: float,
        progress: TrainingProgress,
        bar: TaskID | None,
    ) -> None:
        """Wait for ``task`` to finish, advancing the progress bar."""
        shown = 0
        while not task.done.wait(0.25):
            if time.monotonic() > deadline:
                raise ElasticError(f"elastic training did not finish in {timeout:.0f} s")
            if self.tis.failure is not None:
                raise ElasticError(self.tis.failure)
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

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(10)
        self.tis.stop()
        self._tis_server.stop(0)
        self._ds_server.stop(0)
        self._stack.close()
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
