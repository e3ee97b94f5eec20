"""The task-information server: registers computing servers, watches their heartbeats, hands
batches to the data server together with a computing server to send them to, and records the
batch ids the computing servers report, in a journal it resumes from after a restart.

Scheduling (one thread, :meth:`TaskInfoServer._loop`): it learns the data server's task from
``Describe``; pending batches go in id order to idle, live computing servers — one at a time in
synchronous mode (batch b needs the parameters after b-1), one per idle computing server in
asynchronous mode. A computing server silent for longer than the heartbeat timeout, or that
leaves, loses its batch: it goes back to the pending ones (``reassigned``). A report for a batch
recorded already is ignored (``duplicates_ignored``); an assignment of a batch the data server
applied already (its reporter died before reporting) is recorded without running it again.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedenc.elastic.common import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    OPTIONS,
    ElasticError,
    abort,
)
from fedenc.elastic.journal import Journal
from fedenc.proto.fedenc.v1 import elastic_pb2 as epb
from fedenc.proto.fedenc.v1 import elastic_pb2_grpc as egrpc
from fedenc.runtime.grpc.transport import ChannelSecurity, ServerSecurity, bind

log = logging.getLogger(__name__)


@dataclass
class WorkerInfo:
    worker_id: str
    last_beat: float
    alive: bool = True
    batch: int | None = None
    attempt: int = 0
    assigned_at: float = 0.0
    not_before: float = 0.0  # back-off after a refused assignment (e.g. no Work stream yet)
    batches: int = 0
    pairs: int = 0
    busy_seconds: float = 0.0


@dataclass
class _Task:
    task_id: str
    total: int
    mode: int
    journal: Journal
    pending: list[int]
    in_flight: dict[int, str]
    attempts: dict[int, int]
    reassigned: int = 0
    duplicates: int = 0
    pairs: int = 0
    loss_sum: float = 0.0


class TaskInfoServer(egrpc.TaskInformationServicer):
    def __init__(
        self,
        data_server: str,
        journal_dir: Path,
        *,
        channel: ChannelSecurity,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        advertise_data_server: str | None = None,
    ) -> None:
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ElasticError(
                f"need 0 < heartbeat interval ({heartbeat_interval}) < timeout "
                f"({heartbeat_timeout})"
            )
        channel.check()
        self.data_server = data_server
        self.advertise = advertise_data_server or data_server
        self.journal_dir = journal_dir
        self.interval = heartbeat_interval
        self.timeout = heartbeat_timeout
        self._channel = channel.channel(data_server, OPTIONS)
        self._ds = egrpc.DataServerStub(self._channel)
        self._lock = threading.Condition()
        self.workers: dict[str, WorkerInfo] = {}
        self.task: _Task | None = None
        self._stop = threading.Event()
        self.failure: str | None = None  # why scheduling stopped for good (see _fail)
        self.failed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="task-info", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(5)
        self._channel.close()
        if self.task is not None:
            self.task.journal.close()

    # -- bookkeeping (under the lock) ----------------------------------------------------------
    def _requeue(self, task: _Task, batch: int) -> None:
        if task.in_flight.pop(batch, None) is not None and batch not in task.journal.done:
            heapq.heappush(task.pending, batch)
            task.reassigned += 1

    def _drop_worker(self, w: WorkerInfo, why: str) -> None:
        w.alive = False
        if w.batch is not None and self.task is not None:
            log.warning("%s %s: batch %d goes back to the queue", w.worker_id, why, w.batch)
            if self.task.in_flight.get(w.batch) == w.worker_id:
                self._requeue(self.task, w.batch)
        w.batch = None

    def _open_task(self, desc: epb.DescribeResponse) -> None:
        total = desc.epochs * desc.batches_per_epoch
        journal = Journal(self.journal_dir / f"{desc.task_id}.jsonl", desc.task_id, total)
        pending = [b for b in range(total) if b not in journal.done]
        heapq.heapify(pending)
        if self.task is not None:
            self.task.journal.close()
        self.task = _Task(desc.task_id, total, desc.mode, journal, pending, {}, {})
        for w in self.workers.values():
            w.batch = None
        if journal.resumed:
            log.info("task %s: resumed %d/%d batches from %s", desc.task_id, journal.resumed,
                     total, journal.path)  # fmt: skip

    def _check_task(self, desc: epb.DescribeResponse, journalled: int) -> None:
        """Open the data server's task, or check that it still holds what the journal says.
        ``journalled``: the journal's count taken before ``desc`` was asked for."""
        if self.task is None or self.task.task_id != desc.task_id:
            self._open_task(desc)
            return
        if desc.version < journalled:  # the journal records only batches it had applied
            raise ElasticError(
                f"the data server holds task {desc.task_id!r} at step {desc.version}, but the "
                f"journal {self.task.journal.path} has {journalled} batches applied: the data "
                "server restarted and lost them. Restart the task: stop this server, delete "
                "the journal, and start both again (docs/elastic.md)"
            )

    def _fail(self, why: str) -> None:
        """Stop scheduling for good: the task cannot go on as it is (the owner reports it)."""
        log.error("task-information server stops: %s", why)
        self.failure = why
        self._stop.set()
        self.failed.set()

    # -- the scheduler ---------------------------------------------------------------------
    def _loop(self) -> None:
        next_describe = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_describe:
                next_describe = now + 0.2
                with self._lock:  # counted before asking: a batch journalled meanwhile is
                    # already in the answer's version (the journal follows the data server)
                    journalled = len(self.task.journal.done) if self.task is not None else 0
                try:
                    desc = self._ds.Describe(epb.DescribeRequest(), timeout=5)
                except grpc.RpcError:
                    desc = None  # the data server is not up (yet)
                if desc is not None and desc.task_id:
                    with self._lock:
                        try:
                            self._check_task(desc, journalled)
                        except ElasticError as err:
                            self._fail(str(err))
                            return
            plan: list[tuple[int, WorkerInfo, int]] = []
            with self._lock:
                for w in self.workers.values():
                    if w.alive and now - w.last_beat > self.timeout:
                        self._drop_worker(w, f"missed heartbeats for {now - w.last_beat:.1f} s")
                task = self.task
                if task is not None:
                    # Longest idle first: work spreads over every computing server.
                    idle = sorted(
                        (
                            w
                            for w in self.workers.values()
                            if w.alive and w.batch is None and w.not_before <= now
                        ),
                        key=lambda w: w.assigned_at,
                    )
                    while idle and task.pending:
                        if task.mode == epb.TRAINING_MODE_SYNC and (task.in_flight or plan):
                            break
                        w = idle.pop(0)
                        b = heapq.heappop(task.pending)
                        task.attempts[b] = task.attempts.get(b, 0) + 1
                        task.in_flight[b] = w.worker_id
                        w.batch, w.attempt, w.assigned_at = b, task.attempts[b], now
                        plan.append((b, w, task.attempts[b]))
            for b, w, attempt in plan:
                assert task is not None
                self._assign(task, b, w, attempt)
            with self._lock:
                if not self._stop.is_set():
                    self._lock.wait(0.02 if not plan else 0.0)

    def _assign(self, task: _Task, b: int, w: WorkerInfo, attempt: int) -> None:
        request = epb.AssignRequest(
            task_id=task.task_id, batch_id=b, worker_id=w.worker_id, attempt=attempt
        )
        try:
            reply = self._ds.Assign(request, timeout=10)
        except grpc.RpcError as err:
            reply = epb.AssignResponse(reason=f"data server: {err}")
        with self._lock:
            if reply.accepted:
                return
            if w.batch == b:
                w.batch = None
            if reply.already_applied:
                task.in_flight.pop(b, None)
                self._record(task, b, "")
                return
            w.not_before = time.monotonic() + 0.1
            task.attempts[b] -= 1
            if task.in_flight.pop(b, None) is not None and b not in task.journal.done:
                heapq.heappush(task.pending, b)
            log.debug("assignment of batch %d to %s refused: %s", b, w.worker_id, reply.reason)

    def _record(self, task: _Task, b: int, worker_id: str) -> bool:
        if not task.journal.record(b, worker_id):
            return False
        # A batch requeued after its computing server was declared gone, then applied anyway.
        if b in task.pending:
            task.pending.remove(b)
            heapq.heapify(task.pending)
        return True

    # -- RPCs ----------------------------------------------------------------------------------
    def Register(
        self, request: epb.RegisterWorkerRequest, context: grpc.ServicerContext
    ) -> epb.RegisterWorkerResponse:
        if not request.worker_id:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "worker_id must not be empty")
        with self._lock:
            w = self.workers.get(request.worker_id)
            if w is not None and w.alive:
                self._drop_worker(w, "registered again")  # a restarted process: its batch is lost
            if w is None:
                w = self.workers[request.worker_id] = WorkerInfo(request.worker_id, 0.0)
            w.alive, w.last_beat, w.batch = True, time.monotonic(), None
            self._lock.notify_all()
        log.info("computing server %s registered (%s)", request.worker_id, request.agent)
        return epb.RegisterWorkerResponse(
            worker_id=request.worker_id,
            heartbeat_interval_s=self.interval,
            heartbeat_timeout_s=self.timeout,
            data_server=self.advertise,
        )

    def Heartbeat(
        self, request: epb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> epb.HeartbeatResponse:
        with self._lock:
            w = self.workers.get(request.worker_id)
            if w is None or not w.alive:
                return epb.HeartbeatResponse(known=False)
            w.last_beat = time.monotonic()
        return epb.HeartbeatResponse(known=True)

    def Leave(self, request: epb.LeaveRequest, context: grpc.ServicerContext) -> epb.LeaveResponse:
        with self._lock:
            w = self.workers.get(request.worker_id)
            if w is None:
                return epb.LeaveResponse(known=False)
            self._drop_worker(w, "left")
            self._lock.notify_all()
        return epb.LeaveResponse(known=True)

    def ReportBatch(
        self, request: epb.BatchReport, context: grpc.ServicerContext
    ) -> epb.BatchReportResponse:
        with self._lock:
            task = self.task
            if task is None or request.task_id != task.task_id:
                abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"no task {request.task_id!r} here (current: "
                    f"{task.task_id if task else 'none'!r})",
                )
            b = request.batch_id
            if b >= task.total:
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"batch {b} out of range: the task has {task.total} batches",
                )
            w = self.workers.get(request.worker_id)
            if w is not None and w.batch == b:
                w.batch = None
                w.last_beat = time.monotonic()
            self._lock.notify_all()
            if b in task.journal.done:
                task.duplicates += 1
                if task.in_flight.get(b) == request.worker_id:
                    task.in_flight.pop(b)
                return epb.BatchReportResponse(duplicate=True)
            if not request.applied:  # the data server refused it (too stale): run it again
                if task.in_flight.get(b) == request.worker_id:
                    self._requeue(task, b)
                return epb.BatchReportResponse()
            task.in_flight.pop(b, None)
            self._record(task, b, request.worker_id)
            task.pairs += request.pairs
            task.loss_sum += request.loss * request.pairs
            if w is not None:
                w.batches += 1
                w.pairs += request.pairs
                w.busy_seconds += request.seconds
            return epb.BatchReportResponse(recorded=True)

    def Progress(
        self, request: epb.ProgressRequest, context: grpc.ServicerContext
    ) -> epb.ProgressResponse:
        return self.progress()

    def progress(self) -> epb.ProgressResponse:
        with self._lock:
            task = self.task
            workers = [
                epb.WorkerProgress(
                    worker_id=w.worker_id,
                    alive=w.alive,
                    batches=w.batches,
                    pairs=w.pairs,
                    pairs_per_s=w.pairs / w.busy_seconds if w.busy_seconds else 0.0,
                    batch_id=w.batch or 0,
                    busy=w.batch is not None,
                )
                for w in self.workers.values()
            ]
            if task is None:
                return epb.ProgressResponse(workers=workers)
            return epb.ProgressResponse(
                task_id=task.task_id,
                total_batches=task.total,
                batches_done=len(task.journal.done),
                in_flight=len(task.in_flight),
                reassigned=task.reassigned,
                duplicates_ignored=task.duplicates,
                workers=workers,
                finished=len(task.journal.done) == task.total,
                pairs_done=task.pairs,
                loss_sum=task.loss_sum,
                resumed_batches=task.journal.resumed,
            )

    def reset_worker_stats(self) -> None:
        """Start per-worker counters afresh (a new round of the child)."""
        with self._lock:
            for w in self.workers.values():
                w.batches, w.pairs, w.busy_seconds = 0, 0, 0.0


def serve(
    impl: TaskInfoServer, listen: str, security: ServerSecurity, max_workers: int = 16
) -> tuple[grpc.Server, int]:
    """Start the task-information server on ``listen`` (port 0 = any free one)."""
    security.check()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=OPTIONS)
    egrpc.add_TaskInformationServicer_to_server(impl, server)
    port = bind(server, listen, security.credentials)
    server.start()
    impl.start()
    return server, port
