"""A data server: holds its data shard, the optimizer and (in a PS table) the parameters; sends
batches to the computing servers the task-information server names and applies their results.

It owns the order of the optimizer steps, which is what makes synchronous mode exact: batch
``b``'s examples are the ones :meth:`fedenc.training.trainer.Trainer.index_batches` would draw
(the trainer's own :class:`fedenc.training.order.EpochOrder`), its gradients are computed from
the parameters after batches ``0..b-1``, and the data server applies them with the trainer's own
fused Adam and StepLR. In asynchronous mode results are applied as they arrive, if computed from
a version at most ``max_staleness`` steps old.

Exactly once: every applied batch id is kept; a second result for it is acknowledged as a
duplicate and not applied, and an assignment of an applied batch is answered ``already_applied``.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

from fedenc.data.batching import pad_prefixes
from fedenc.data.sessions import Examples
from fedenc.elastic.common import OPTIONS, ElasticError, abort, batch_to_proto
from fedenc.elastic.param_store import ParameterStore
from fedenc.encoders.base import SessionEncoder
from fedenc.proto.fedenc.v1 import elastic_pb2 as epb
from fedenc.proto.fedenc.v1 import elastic_pb2_grpc as egrpc
from fedenc.proto.fedenc.v1 import tensor_pb2 as tpb
from fedenc.protocol.tensors import TensorDecodeError, parameters_from_proto, parameters_to_proto
from fedenc.runtime.grpc.transport import ServerSecurity, bind
from fedenc.training.order import EpochOrder
from fedenc.training.trainer import Trainer

log = logging.getLogger(__name__)

MODES = {"sync": epb.TRAINING_MODE_SYNC, "async": epb.TRAINING_MODE_ASYNC}


@dataclass
class DataTask:
    """One task on a data server: epochs over its shard with one model and optimizer."""

    task_id: str
    model: SessionEncoder
    optimizer: torch.optim.Optimizer
    scheduler: Any  # torch.optim.lr_scheduler.LRScheduler (StepLR)
    order: EpochOrder
    examples: Examples
    batch_size: int
    epochs: int
    cap: int = 0  # examples per epoch, 0 = all (TrainConfig.max_examples_per_epoch)
    mode: int = epb.TRAINING_MODE_SYNC
    max_staleness: int = 0
    # progress, guarded by the DataServer's lock
    version: int = 0
    applied: list[int] = field(default_factory=list)
    applied_set: set[int] = field(default_factory=set)
    epoch_loss: list[float] = field(default_factory=list)  # sum of loss x pairs per epoch
    epoch_pairs: list[int] = field(default_factory=list)
    stale_refused: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    _orders: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def from_trainer(
        cls,
        task_id: str,
        trainer: Trainer,
        examples: Examples,
        epochs: int,
        mode: str = "sync",
        max_staleness: int = 0,
    ) -> DataTask:
        """A task that continues ``trainer`` (its model, optimizer, LR schedule and shuffling
        generator), as ``epochs`` calls of ``trainer.train_epoch`` would."""
        if mode not in MODES:
            raise ElasticError(f"unknown training mode {mode!r}; use sync or async")
        if len(examples) == 0:
            raise ElasticError("no training examples (every session needs at least 2 clicks)")
        if trainer.device.type != "cpu":
            raise ElasticError("elastic training keeps the data server's parameters on the CPU")
        return cls(
            task_id=task_id,
            model=trainer.model,
            optimizer=trainer.optimizer,
            scheduler=trainer.scheduler,
            order=trainer.epoch_order,
            examples=examples,
            batch_size=trainer.config.batch_size,
            epochs=epochs,
            cap=trainer.config.max_examples_per_epoch,
            mode=MODES[mode],
            max_staleness=max_staleness if mode == "async" else 0,
        )

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ElasticError("epochs and batch_size must be >= 1")
        n = len(self.examples)
        self.pairs_per_epoch = min(n, self.cap) if self.cap else n
        self.batches_per_epoch = math.ceil(self.pairs_per_epoch / self.batch_size)
        self.total_batches = self.epochs * self.batches_per_epoch
        self.names = [name for name, _ in self.model.named_parameters()]

    def batch_index(self, batch_id: int) -> np.ndarray:
        """The example indices of ``batch_id`` (Trainer.index_batches' order, epoch by epoch)."""
        epoch, j = divmod(batch_id, self.batches_per_epoch)
        n = len(self.examples)
        while len(self._orders) <= epoch:  # the generator draws in epoch order, as the trainer
            self._orders.append(self.order.next_epoch(n, self.cap))
        return self._orders[epoch][j * self.batch_size : (j + 1) * self.batch_size]


class DataServer(egrpc.DataServerServicer):
    """The ``fedenc.v1.DataServer`` service over one task at a time."""

    def __init__(self, ps_width: int = 1024) -> None:
        self._lock = threading.Lock()
        self.task: DataTask | None = None
        self.store: ParameterStore | None = None
        self.ps_width = ps_width
        self._streams: dict[str, queue.Queue[epb.WorkItem | None]] = {}
        self._encoded: tuple[int, tpb.ParameterSet] | None = None  # (version, parameters)
        self.applied_log: list[tuple[str, int, str]] = []  # (task, batch, worker): diagnostics

    # -- the task ---------------------------------------------------------------------------
    def start_task(self, task: DataTask, store: ParameterStore | None = None) -> None:
        with self._lock:
            if self.task is not None and not self.task.done.is_set():
                raise ElasticError(f"task {self.task.task_id} is still running")
            params = dict(task.model.named_parameters())
            bad = [n for n, p in params.items() if p.dtype != torch.float32]
            if bad:
                raise ElasticError(f"parameters {bad} are not float32")
            if store is None or list(store.shapes) != list(params):
                store = ParameterStore(
                    {n: tuple(p.shape) for n, p in params.items()}, width=self.ps_width
                )
            store.write(params)
            task.model.train()
            self.task, self.store, self._encoded = task, store, None

    def abandon_task(self, task_id: str) -> None:
        """Drop task ``task_id`` (its owner gave up on it: timeout, no computing server left).
        Its late results are refused from now on (they would step the owner's model and
        optimizer behind its back) and the next task can start."""
        with self._lock:
            task = self.task
            if task is None or task.task_id != task_id:
                return
            self.task, self._encoded = None, None
        task.done.set()  # wakes whoever waits on it

    def wait(self, timeout: float | None = None) -> bool:
        task = self.task
        return task is not None and task.done.wait(timeout)

    def _parameters(self, task: DataTask) -> tpb.ParameterSet:
        assert self.store is not None
        if self._encoded is None or self._encoded[0] != task.version:
            self._encoded = (task.version, parameters_to_proto(self.store.read()))
        return self._encoded[1]

    # -- RPCs -------------------------------------------------------------------------------
    def Describe(
        self, request: epb.DescribeRequest, context: grpc.ServicerContext
    ) -> epb.DescribeResponse:
        task = self.task
        if task is None:
            return epb.DescribeResponse()
        return epb.DescribeResponse(
            task_id=task.task_id,
            encoder_type=task.model.type_name,
            encoder_config_json=json.dumps(task.model.config.to_dict()),
            num_examples=task.pairs_per_epoch,
            batch_size=task.batch_size,
            batches_per_epoch=task.batches_per_epoch,
            epochs=task.epochs,
            mode=epb.TrainingMode.ValueType(task.mode),
            max_staleness=task.max_staleness,
            version=task.version,
        )

    def Assign(
        self, request: epb.AssignRequest, context: grpc.ServicerContext
    ) -> epb.AssignResponse:
        with self._lock:
            task = self.task
            if task is None or request.task_id != task.task_id:
                return epb.AssignResponse(reason=f"no task {request.task_id!r} on this data server")
            b = request.batch_id
            if b >= task.total_batches:
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"batch {b} out of range: the task has {task.total_batches} batches",
                )
            if b in task.applied_set:
                return epb.AssignResponse(already_applied=True)
            if task.mode == epb.TRAINING_MODE_SYNC and b != len(task.applied):
                return epb.AssignResponse(
                    reason=f"synchronous mode: batch {len(task.applied)} is next, not {b}"
                )
            stream = self._streams.get(request.worker_id)
            if stream is None:
                return epb.AssignResponse(reason=f"no Work stream open for {request.worker_id!r}")
            index = task.batch_index(b)
            items, _, lengths = pad_prefixes(task.examples, index)
            targets = torch.from_numpy(task.examples.target[index].astype(np.int64, copy=True))
            items_pb, lengths_pb, targets_pb = batch_to_proto(items, lengths, targets)
            item = epb.WorkItem(
                task_id=task.task_id,
                batch_id=b,
                attempt=request.attempt,
                version=task.version,
                parameters=self._parameters(task),
                items=items_pb,
                lengths=lengths_pb,
                targets=targets_pb,
            )
        stream.put(item)
        return epb.AssignResponse(accepted=True)

    def Work(
        self, request: epb.WorkRequest, context: grpc.ServicerContext
    ) -> Iterator[epb.WorkItem]:
        if not request.worker_id:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "worker_id must not be empty")
        mine: queue.Queue[epb.WorkItem | None] = queue.Queue()
        with self._lock:
            old = self._streams.get(request.worker_id)
            self._streams[request.worker_id] = mine  # a reconnecting worker replaces its stream
        if old is not None:
            old.put(None)
        context.add_callback(lambda: mine.put(None))
        try:
            while True:
                item = mine.get()
                if item is None:
                    return
                yield item
        finally:
            with self._lock:
                if self._streams.get(request.worker_id) is mine:
                    del self._streams[request.worker_id]

    def GetParameters(
        self, request: epb.ParametersRequest, context: grpc.ServicerContext
    ) -> epb.ParametersResponse:
        with self._lock:
            task = self.task
            if task is None:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no task on this data server")
            return epb.ParametersResponse(version=task.version, parameters=self._parameters(task))

    def StoreResult(
        self, request: epb.StoreResultRequest, context: grpc.ServicerContext
    ) -> epb.StoreResultResponse:
        task = self.task
        if task is None or request.task_id != task.task_id:
            abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no task {request.task_id!r} on this data server",
            )
        try:
            grads = parameters_from_proto(request.gradients, check_finite=True)
        except TensorDecodeError as err:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"bad gradients: {err}")
        params = dict(task.model.named_parameters())
        unknown = sorted(set(grads) - set(params))
        if unknown:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"unknown parameters {unknown}")
        for name, g in grads.items():
            if g.shape != params[name].shape or g.dtype != params[name].dtype:
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"gradient {name!r} is {g.dtype} {list(g.shape)}, the parameter "
                    f"{params[name].dtype} {list(params[name].shape)}",
                )
        if not math.isfinite(request.loss) or request.pairs < 1:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "loss must be finite, pairs >= 1")
        b = request.batch_id
        with self._lock:
            if self.task is not task:  # abandoned (or replaced) while the gradients were read
                abort(
                    context,
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"no task {request.task_id!r} on this data server",
                )
            if b >= task.total_batches:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"batch {b} out of range")
            if b in task.applied_set:
                return epb.StoreResultResponse(duplicate=True, version=task.version)
            if task.mode == epb.TRAINING_MODE_SYNC:
                if b != len(task.applied) or request.base_version != task.version:
                    abort(
                        context,
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"synchronous mode: expected batch {len(task.applied)} from version "
                        f"{task.version}, got batch {b} from version {request.base_version}",
                    )
            elif request.base_version > task.version:
                abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"base version {request.base_version} is ahead of {task.version}",
                )
            elif task.version - request.base_version > task.max_staleness:
                task.stale_refused += 1
                return epb.StoreResultResponse(applied=False, version=task.version)
            self._apply(task, params, grads, request)
            self.applied_log.append((task.task_id, b, request.worker_id))
            return epb.StoreResultResponse(applied=True, version=task.version)

    def _apply(
        self,
        task: DataTask,
        params: dict[str, torch.nn.Parameter],
        grads: dict[str, torch.Tensor],
        request: epb.StoreResultRequest,
    ) -> None:
        # Exactly Trainer.train_epoch's step: zero_grad(set_to_none) leaves a parameter without
        # a gradient as None, which Adam skips.
        for name, p in params.items():
            p.grad = grads.get(name)
        task.optimizer.step()
        for p in params.values():
            p.grad = None
        task.version += 1
        task.applied.append(request.batch_id)
        task.applied_set.add(request.batch_id)
        epoch = (len(task.applied) - 1) // task.batches_per_epoch
        while len(task.epoch_loss) <= epoch:
            task.epoch_loss.append(0.0)
            task.epoch_pairs.append(0)
        task.epoch_loss[epoch] += request.loss * request.pairs
        task.epoch_pairs[epoch] += request.pairs
        if len(task.applied) % task.batches_per_epoch == 0:
            task.scheduler.step()  # the trainer steps StepLR once per epoch
        assert self.store is not None
        self.store.write(params)
        if len(task.applied) == task.total_batches:
            task.done.set()


def serve(
    server_impl: DataServer,
    listen: str,
    security: ServerSecurity,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Start the data server on ``listen`` (port 0 = any free one): the server and its port.
    Each open Work stream holds a thread, so ``max_workers`` bounds computing servers + 4."""
    security.check()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=OPTIONS)
    egrpc.add_DataServerServicer_to_server(server_impl, server)
    port = bind(server, listen, security.credentials)
    server.start()
    return server, port
