"""One gRPC shard of the distributed PS: the ``fedenc.v1.ParameterServer`` service over a
:class:`~fedenc.ps.table.ShardTable`.

Refused requests answer ``INVALID_ARGUMENT`` with the table's message (unknown key, wrong width,
NaN...). With a snapshot path and ``snapshot_every = K``, every K-th applied push is written to
disk before it is acknowledged, so after a crash a restart from the snapshot loses at most the
last K - 1 acknowledged pushes (none with K = 1) plus whatever was in flight.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from typing import Any

import grpc

from fedenc.proto.fedenc.v1 import parameter_server_pb2 as pspb
from fedenc.ps.optimizers import PROTO_OPTIMIZER
from fedenc.ps.table import PSError, ShardTable
from fedenc.ps.wire import keys_from_proto, pull_response_bytes, read_push_request
from fedenc.runtime.grpc.transport import EXCLUSIVE_PORT, bind
from fedenc.training.allocator import tune_allocator

log = logging.getLogger(__name__)

#: Requests stay below gRPC's default 4 MiB; allow some headroom for foreign clients.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_OPTIONS = [
    EXCLUSIVE_PORT,
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


class ShardServicer:
    """The ``fedenc.v1.ParameterServer`` methods (registered by :func:`add_servicer`)."""

    def __init__(self, table: ShardTable, snapshot_every: int = 0) -> None:
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
        if snapshot_every and table.snapshot_path is None:
            raise ValueError("snapshot_every needs a snapshot path")
        self.table = table
        self.snapshot_every = snapshot_every
        self._snapshot_lock = threading.Lock()

    def Pull(self, request: pspb.PullRequest, context: Any) -> bytes:
        """The serialized ``PullResponse`` (:func:`~fedenc.ps.wire.pull_response_bytes`)."""
        try:
            keys = keys_from_proto(request.keys)
            rows, version = self.table.pull(keys)
        except (PSError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"shard {self.table.label}: {err}")
        return pull_response_bytes(rows, version)

    def Push(self, data: bytes, context: Any) -> pspb.PushResponse:
        """A serialized ``PushRequest`` (:func:`~fedenc.ps.wire.read_push_request`)."""
        try:
            request = read_push_request(data)
            if request.mode not in (pspb.PUSH_MODE_DELTA, pspb.PUSH_MODE_OVERWRITE):
                raise PSError("push mode not set: use PUSH_MODE_DELTA or PUSH_MODE_OVERWRITE")
            result = self.table.push(
                request.keys,
                request.rows,
                overwrite=request.mode == pspb.PUSH_MODE_OVERWRITE,
                client_id=request.client_id,
                sequence=request.sequence,
            )
        except (PSError, ValueError) as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"shard {self.table.label}: {err}")
        if self.snapshot_every and not result.duplicate:
            if result.version % self.snapshot_every == 0:
                with self._snapshot_lock:  # one writer at a time
                    self.table.snapshot()
        return pspb.PushResponse(
            rows_applied=result.rows_applied,
            duplicate=result.duplicate,
            version=result.version,
            previous_sequence=result.previous_sequence,
        )

    def Stats(self, request: pspb.StatsRequest, context: Any) -> pspb.StatsResponse:
        s = self.table.stats()
        s["optimizer"] = PROTO_OPTIMIZER[s["optimizer"]]
        return pspb.StatsResponse(**s)

    def Snapshot(self, request: pspb.SnapshotRequest, context: Any) -> pspb.SnapshotResponse:
        try:
            with self._snapshot_lock:
                path, version = self.table.snapshot(request.path or None)
        except (PSError, OSError) as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"shard {self.table.label}: {err}")
        return pspb.SnapshotResponse(path=str(path), version=version)

    def Restore(self, request: pspb.RestoreRequest, context: Any) -> pspb.RestoreResponse:
        try:
            path, version = self.table.restore(request.path or None)
        except PSError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"shard {self.table.label}: {err}")
        return pspb.RestoreResponse(path=str(path), version=version)


SERVICE = "fedenc.v1.ParameterServer"


def _already_serialized(data: bytes) -> bytes:
    return data


def add_servicer(servicer: ShardServicer, server: grpc.Server) -> None:
    """The generated registration, except that ``Pull`` answers bytes it serialized itself and
    ``Push`` reads the bytes of its request itself (:mod:`fedenc.ps.wire`)."""
    messages: dict[str, tuple[Any, Any]] = {
        "Pull": (pspb.PullRequest, None),
        "Push": (None, pspb.PushResponse),
        "Stats": (pspb.StatsRequest, pspb.StatsResponse),
        "Snapshot": (pspb.SnapshotRequest, pspb.SnapshotResponse),
        "Restore": (pspb.RestoreRequest, pspb.RestoreResponse),
    }
    methods = pspb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name
    if set(methods) != set(messages):  # a method added to the .proto must be registered here
        raise RuntimeError(f"ParameterServer methods {sorted(methods)} != {sorted(messages)}")
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=_already_serialized if request is None else request.FromString,
            response_serializer=_already_serialized
            if response is None
            else response.SerializeToString,
        )
        for name, (request, response) in messages.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def serve(
    table: ShardTable,
    listen: str,
    *,
    credentials: Any = None,
    snapshot_every: int = 0,
    max_workers: int = 4,
) -> tuple[grpc.Server, int]:
    """Start a shard server on ``listen`` (``HOST:PORT``, port 0 = any free one); returns the
    started server and the bound port. ``credentials``: ``grpc.ServerCredentials`` for TLS."""
    tune_allocator()  # every request allocates row-sized buffers: reuse their pages
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_OPTIONS)
    add_servicer(ShardServicer(table, snapshot_every), server)
    port = bind(server, listen, credentials)
    server.start()
    return server, port
