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

A worker that dies (killed, out of memory) is replaced by a new process for the same nodes, and
the message in hand is sent to it (up to ``MAX_RESTARTS`` times in a pool's life): its children
rebuild their state from the message's instruction and, in a simulation with an output
directory, take up the state they saved after their last round, so the run goes on bit for bit
(tested). Past the limit, or when the new process cannot start, every message for those nodes
becomes a ``NODE_UNAVAILABLE`` error reply naming the exit code; the master leaves those children
out, as it does for a child process that went away.
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


#: Worker processes a pool starts again, in all, after the ones it started died.
MAX_RESTARTS = 3


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
        self._ctx = mp.get_context("spawn")
        self._args = (app_ref, run_id, dict(run_config), threads)
        self._start_timeout = start_timeout
        self.restarts = 0
        self._owner: dict[int, _Worker] = {}
        self._workers: list[_Worker] = []
        self._nodes: dict[int, dict[int, dict[str, Any]]] = {}  # worker index -> its nodes
        ordered = sorted(node_configs)
        try:
            for w in range(workers):
                mine = {nid: dict(node_configs[nid]) for nid in ordered[w::workers]}
                self._nodes[w] = mine
                process, conn = self._spawn(w)
                worker = _Worker(w, process, conn)
                self._workers.append(worker)
                for nid in mine:
                    self._owner[nid] = worker
            for worker in self._workers:  # fail early when the app cannot be loaded
                self._await_ready(worker.index, worker.conn)
        except (EOFError, OSError, WorkerDiedError) as err:
            codes = {w.index: w.process.exitcode for w in self._workers}
            self.close()
            raise WorkerDiedError(
                f"worker processes failed to start (exit codes {codes}): {err or 'no reason'}; "
                f"is {app_ref!r} importable? Workers are spawned: a script that starts a "
                'simulation with workers must do so under `if __name__ == "__main__":` '
                "(Python's own error about bootstrapping, above, says so too)"
            ) from err

    def _spawn(self, index: int) -> tuple[BaseProcess, Connection]:
        app_ref, run_id, run_config, threads = self._args
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_worker_main,
            args=(child, app_ref, run_id, run_config, self._nodes[index], threads),
            name=f"fedenc-worker-{index}",
            daemon=True,
        )
        process.start()
        child.close()
        return process, parent

    def _await_ready(self, index: int, conn: Connection) -> None:
        if not conn.poll(self._start_timeout):
            raise WorkerDiedError(f"worker {index} did not start in time")
        conn.recv_bytes()

    def _restart(self, worker: _Worker, why: str) -> bool:
        """Under ``worker.lock``: a new process for a dead worker's nodes; False when the pool's
        restarts are spent or it cannot start."""
        if self.restarts >= MAX_RESTARTS:
            return False
        self.restarts += 1
        log.warning(
            "%s: starting a new one for its %d children (restart %d of at most %d); they take "
            "up their saved state, or start again from the round's instruction",
            why, len(self._nodes[worker.index]), self.restarts, MAX_RESTARTS,
        )  # fmt: skip
        worker.conn.close()
        try:
            process, conn = self._spawn(worker.index)
            worker.process, worker.conn = process, conn
            self._await_ready(worker.index, conn)
        except (EOFError, OSError, WorkerDiedError) as err:
            log.warning("worker process %d could not start again: %s", worker.index, err)
            return False
        return True

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
            while True:
                if worker.dead:
                    raise WorkerDiedError(worker.dead)
                try:
                    worker.conn.send((node_id, data))
                    return worker.conn.recv_bytes()
                except (EOFError, OSError) as err:
                    worker.process.join(1.0)
                    why = (
                        f"worker process {worker.index} is gone "
                        f"(exit code {worker.process.exitcode}): {type(err).__name__}"
                    )
                    if not self._restart(worker, why):
                        worker.dead = why
                        raise WorkerDiedError(why) from err

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
