"""A small pool of worker processes that host virtual children for the in-process runtime.

Why: in one process every child's local training shares one interpreter and one torch thread
pool; with a worker pool the children of different workers train at the same time in separate
processes, each with its share of the cores (``threads``, default ``cores // workers``).

Each worker owns a fixed set of nodes (node ``i`` goes to worker ``i mod W``) and their
``Context`` objects, so a child's state (data, model, optimizer) stays in one process for the whole
run, and handles their messages one at a time, in the order they were sent. Messages and replies
cross the process boundary in Flower's wire format, so the workers see exactly what a remote child
would. The app is named by reference (``"nodes.child:app"``) and imported in each worker, which
starts with ``spawn`` (no fork of a parent that already runs torch threads).

A worker that dies (killed, out of memory) turns every message for its nodes into a
``NODE_UNAVAILABLE`` error reply naming the exit code; the master leaves those children out, as it
does for a child process that went away.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

log = logging.getLogger(__name__)


def _worker_main(
    conn: Connection,
    app_ref: str,
    run_id: int,
    run_config: dict[str, Any],
    node_configs: dict[int, dict[str, Any]],
    threads: int,
) -> None:
    # Ctrl-C belongs to the parent, which closes the pool in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch
    from flwr.app import Context, RecordDict

    from fedenc.runtime import flower_compat as fc
    from fedenc.runtime.clientapp import call_client_app, load_app

    torch.set_num_threads(threads)
    parent = os.getppid()

    def orphan_watch() -> None:  # a killed parent must not leave workers training for nobody
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=orphan_watch, name="fedenc-orphan-watch", daemon=True).start()
    app = load_app(app_ref)
    contexts = {
        nid: Context(
            run_id=run_id,
            node_id=nid,
            node_config=dict(cfg),
            state=RecordDict(),
            run_config=dict(run_config),
        )
        for nid, cfg in node_configs.items()
    }
    conn.send_bytes(b"ready")
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent went away
            return
        if item is None:
            return
        node_id, data = item
        message = fc.message_from_bytes(data)
        reply = call_client_app(app, message, contexts[node_id], f"node {node_id}")
        conn.send_bytes(fc.message_to_bytes(reply))


class WorkerDiedError(RuntimeError):
    """The worker process hosting a node is gone."""


@dataclass
class _Worker:
    index: int
    process: BaseProcess
    conn: Connection
    lock: threading.Lock = field(default_factory=threading.Lock)
    dead: str = ""


class WorkerPool:
    """``workers`` processes hosting the nodes of ``node_configs`` (node id -> node_config)."""

    def __init__(
        self,
        app_ref: str,
        node_configs: Mapping[int, Mapping[str, Any]],
        run_id: int,
        run_config: Mapping[str, Any],
        *,
        workers: int,
        threads: int | None = None,
        start_timeout: float = 120.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        workers = min(workers, max(1, len(node_configs)))
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // workers)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        ctx = mp.get_context("spawn")
        self._owner: dict[int, _Worker] = {}
        self._workers: list[_Worker] = []
        ordered = sorted(node_configs)
        try:
            for w in range(workers):
                mine = {nid: dict(node_configs[nid]) for nid in ordered[w::workers]}
                parent, child = ctx.Pipe()
                process = ctx.Process(
                    target=_worker_main,
                    args=(child, app_ref, run_id, dict(run_config), mine, threads),
                    name=f"fedenc-worker-{w}",
                    daemon=True,
                )
                process.start()
                child.close()
                worker = _Worker(w, process, parent)
                self._workers.append(worker)
                for nid in mine:
                    self._owner[nid] = worker
            for worker in self._workers:  # fail early when the app cannot be loaded
                if not worker.conn.poll(start_timeout):
                    raise WorkerDiedError(f"worker {worker.index} did not start in time")
                worker.conn.recv_bytes()
        except (EOFError, OSError, WorkerDiedError) as err:
            codes = {w.index: w.process.exitcode for w in self._workers}
            self.close()
            raise WorkerDiedError(
                f"worker processes failed to start (exit codes {codes}): {err or 'no reason'}; "
                f"is {app_ref!r} importable? Workers are spawned: a script that starts a "
                'simulation with workers must do so under `if __name__ == "__main__":` '
                "(Python's own error about bootstrapping, above, says so too)"
            ) from err

    @property
    def size(self) -> int:
        return len(self._workers)

    def worker_of(self, node_id: int) -> int:
        return self._owner[node_id].index

    def handle(self, node_id: int, data: bytes) -> bytes:
        """Node ``node_id``'s reply (wire bytes) to the message ``data`` (wire bytes); blocks
        while the worker is busy with another of its nodes."""
        worker = self._owner[node_id]
        with worker.lock:
            if worker.dead:
                raise WorkerDiedError(worker.dead)
            try:
                worker.conn.send((node_id, data))
                return worker.conn.recv_bytes()
            except (EOFError, OSError) as err:
                worker.process.join(1.0)
                worker.dead = (
                    f"worker process {worker.index} is gone "
                    f"(exit code {worker.process.exitcode}): {type(err).__name__}"
                )
                raise WorkerDiedError(worker.dead) from err

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers: each finishes the message in hand, then exits."""
        for worker in self._workers:
            if not worker.lock.acquire(timeout=timeout):
                continue  # stuck in a message: terminated below
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
            finally:
                worker.lock.release()
        for worker in self._workers:
            worker.process.join(timeout)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout)
            worker.conn.close()
        self._workers = []

    def processes(self) -> list[BaseProcess]:
        return [w.process for w in self._workers]
