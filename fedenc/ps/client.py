"""The sharded client of the gRPC distributed PS.

Keys are routed to their shards (:mod:`.routing`), every shard's part is split into requests
that stay below gRPC's default 4 MiB, and the shards are served concurrently: one thread per
shard sends that shard's requests one after the other. One in-flight request per shard keeps
push sequences in order (a retried push is recognised as such and not applied twice) and is
enough to keep loopback busy; more shards mean more parallel streams.

A shard that is down (``UNAVAILABLE``, e.g. being restarted from its snapshot) is retried with
a backoff for ``retry_seconds``; a refused request (``INVALID_ARGUMENT``) raises
:class:`~fedenc.ps.table.PSError` with the shard's message at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedenc.proto.fedenc.v1 import parameter_server_pb2 as pspb
from fedenc.proto.fedenc.v1 import parameter_server_pb2_grpc as psgrpc
from fedenc.ps.routing import split_by_shard
from fedenc.ps.server import MAX_MESSAGE_BYTES, SERVICE
from fedenc.ps.table import PSError, as_keys, check_push
from fedenc.ps.wire import keys_to_proto, push_request_bytes, read_pull_response

T = TypeVar("T")
#: Row bytes per request: under gRPC's default 4 MiB receive limit with room for the envelope.
REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
log = logging.getLogger(__name__)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class ShardUnavailableError(ConnectionError):
    """A shard stayed unreachable for longer than the client's ``retry_seconds``."""


class ShardedClient:
    """:class:`~fedenc.ps.service.DistributedPS` over the shards at ``addresses`` (shard i at
    ``addresses[i]``); checks on connect that each shard is the one expected."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        credentials: Any = None,
        options: Sequence[tuple[str, Any]] = (),
        client_id: str | None = None,
        retry_seconds: float = 30.0,
        timeout: float = 30.0,
    ) -> None:
        if not addresses:
            raise ValueError("give the address of every shard (shard i at position i)")
        from fedenc.runtime.grpc.transport import parse_address

        for address in addresses:  # at once: a malformed one would be retried for 30 s
            parse_address(address)
        self.addresses = list(addresses)
        self.client_id = client_id or uuid.uuid4().hex
        self.retry_seconds = retry_seconds
        self.timeout = timeout
        self._down: set[int] = set()  # shards in an outage (logged once each)
        self._push_versions = [0] * len(self.addresses)  # each shard's version after our push
        self._acked = [0] * len(self.addresses)  # each shard's last sequence it acknowledged
        opts = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # A restarted shard must be found again within a second, not after gRPC's default
            # reconnect backoff (up to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            *options,
        ]
        self.channels = [
            grpc.insecure_channel(a, options=opts)
            if credentials is None
            else grpc.secure_channel(a, credentials, options=opts)
            for a in self.addresses
        ]
        self.stubs = [psgrpc.ParameterServerStub(c) for c in self.channels]
        # Pull answers are read straight from their bytes (fedenc.ps.wire.read_pull_response).
        self._pulls = [
            c.unary_unary(
                f"/{SERVICE}/Pull",
                request_serializer=pspb.PullRequest.SerializeToString,
                response_deserializer=None,
            )
            for c in self.channels
        ]
        self._pushes = [
            c.unary_unary(
                f"/{SERVICE}/Push",
                request_serializer=None,  # push_request_bytes
                response_deserializer=pspb.PushResponse.FromString,
            )
            for c in self.channels
        ]
        self._pool = ThreadPoolExecutor(max_workers=len(addresses), thread_name_prefix="ps-shard")
        self._sequence = itertools.count(1)
        self._seq_lock = threading.Lock()
        try:
            self._check_shards()
        except BaseException:  # nothing else would close the channels and the pool
            self.close()
            raise
        self.rows_per_request = max(1, REQUEST_BYTES // (4 * self._width + 8))  # rows + keys
        self.bytes_pulled = 0
        self.bytes_pushed = 0

    def _check_shards(self) -> None:
        """Read the table's size from shard 0 and check that every shard serves its part."""
        first = self.stats()
        self._num_keys = int(first[0]["num_keys"])
        self._width = int(first[0]["width"])
        for i, s in enumerate(first):
            if s["shard_index"] != i or s["num_shards"] != len(self.addresses):
                raise PSError(
                    f"{self.addresses[i]} serves shard {s['shard_index']}/{s['num_shards']}, "
                    f"expected shard {i}/{len(self.addresses)}: list the shards in order"
                )
            if (s["num_keys"], s["width"]) != (self._num_keys, self._width):
                raise PSError(
                    f"{self.addresses[i]} serves another table: {s} vs shard 0 {first[0]}"
                )

    @property
    def num_keys(self) -> int:
        return self._num_keys

    @property
    def width(self) -> int:
        return self._width

    # -- one call, retried while the shard is down --------------------------------------------

    def _call(self, shard: int, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.retry_seconds
        pause = 0.05
        while True:
            try:
                result = fn()
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise PSError(err.details()) from None
                if code in _RETRYABLE and shard not in self._down:  # once per outage
                    self._down.add(shard)
                    log.warning(
                        "PS shard %d at %s unreachable (%s): retrying for up to %g s",
                        shard,
                        self.addresses[shard],
                        code.name,
                        self.retry_seconds,
                    )
                if code not in _RETRYABLE or time.monotonic() >= deadline:
                    if code in _RETRYABLE:
                        raise ShardUnavailableError(
                            f"PS shard {shard} at {self.addresses[shard]} unreachable for "
                            f"{self.retry_seconds:g} s: {err.details()}"
                        ) from None
                    raise PSError(f"shard {shard}: {code.name}: {err.details()}") from None
                time.sleep(pause)
                pause = min(pause * 2, 1.0)
            else:
                if shard in self._down:
                    self._down.discard(shard)
                    log.warning("PS shard %d at %s is back", shard, self.addresses[shard])
                return result

    def _batches(self, pos: NDArray[np.int64]) -> list[NDArray[np.int64]]:
        n = self.rows_per_request
        return [pos[lo : lo + n] for lo in range(0, pos.size, n)]

    def _per_shard(
        self, keys: NDArray[np.int64], work: Callable[[int, NDArray[np.int64]], None]
    ) -> None:
        parts = split_by_shard(keys, len(self.stubs))
        if len(parts) == 1:
            work(*parts[0])
            return
        for f in [self._pool.submit(work, shard, pos) for shard, pos in parts]:
            f.result()

    # -- the interface -------------------------------------------------------------------------

    def pull(self, keys: NDArray[np.int64]) -> Tensor:
        keys = as_keys(keys)
        out = torch.empty(keys.size, self._width)
        target = out.numpy()

        def work(shard: int, pos: NDArray[np.int64]) -> None:
            pull = self._pulls[shard]
            for batch in self._batches(pos):
                request = pspb.PullRequest(keys=keys_to_proto(keys[batch]))
                data = self._call(shard, partial(pull, request, timeout=self.timeout))
                rows, version = read_pull_response(data, batch.size, self._width)
                self._check_version(shard, version, pushed=False)
                target[batch] = rows

        self._per_shard(keys, work)
        self.bytes_pulled += out.numel() * 4
        return out

    def push(self, keys: NDArray[np.int64], rows: Tensor, overwrite: bool = False) -> int:
        keys = as_keys(keys)
        if rows.dim() != 2 or rows.shape[0] != keys.size:
            raise PSError(f"{list(rows.shape)} rows for {keys.size} keys")
        # Checked here for the whole push, so that no shard applies its part of a push that
        # another shard would refuse (the shards check again: other clients exist).
        check_push(keys, rows, self._num_keys, self._width)
        mode = pspb.PUSH_MODE_OVERWRITE if overwrite else pspb.PUSH_MODE_DELTA
        # NumPy, not torch, gathers each request's rows in the pool threads: a torch op there
        # would start an OpenMP team per pool thread, and once a process holds more OpenMP
        # threads than cores libgomp stops spin-waiting in every team, the trainer's included
        # (every parallel op of the training step then ran about 2x slower).
        table = rows.detach().contiguous().numpy()
        applied = [0]
        lock = threading.Lock()

        def work(shard: int, pos: NDArray[np.int64]) -> None:
            push = self._pushes[shard]
            for batch in self._batches(pos):
                with self._seq_lock:
                    seq = next(self._sequence)
                request = push_request_bytes(
                    keys[batch], torch.from_numpy(table[batch]), mode, self.client_id, seq
                )
                reply = self._call(shard, partial(push, request, timeout=self.timeout))
                with lock:
                    applied[0] += reply.rows_applied
                    self._check_version(shard, reply.version, pushed=True)
                    if reply.HasField("previous_sequence"):
                        self._check_sequence(shard, reply.previous_sequence, seq)

        self._per_shard(keys, work)
        self.bytes_pushed += rows.numel() * 4
        return applied[0]

    def _check_version(self, shard: int, version: int, pushed: bool) -> None:
        """A shard's version grows by one with every push it applies and only then: a push must
        come back above what this client's earlier push got, a pull at least at it. Anything
        less means the shard restarted without acknowledged pushes (``--fresh``, no snapshot,
        or an older one), and training on would mix a reset table with the rest."""
        with self._seq_lock:
            last = self._push_versions[shard]
            if version < last or (pushed and version == last and last > 0):
                raise PSError(
                    f"PS shard {shard} at {self.addresses[shard]} is at version {version}"
                    f"{' after this push' if pushed else ''}, but this client's earlier push "
                    f"left it at {last}: it restarted and lost acknowledged pushes (started "
                    "--fresh, without --snapshot, or from an older snapshot); restart it from "
                    "its latest snapshot (--snapshot-every 1 loses none)"
                )
            if pushed:
                self._push_versions[shard] = version

    def _check_sequence(self, shard: int, previous: int, sequence: int) -> None:
        """The shard's record of this client's pushes must reach the last one it acknowledged:
        unlike the version, other clients' pushes cannot make up for a lost one here."""
        with self._seq_lock:
            acked = self._acked[shard]
            if previous < acked:
                raise PSError(
                    f"PS shard {shard} at {self.addresses[shard]} had applied this client's "
                    f"pushes only up to #{previous}, but it acknowledged #{acked}: it restarted "
                    "and lost acknowledged pushes of this client (started --fresh, without "
                    "--snapshot, or from an older snapshot); restart it from its latest "
                    "snapshot (--snapshot-every 1 loses none)"
                )
            self._acked[shard] = max(acked, sequence)

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for i, stub in enumerate(self.stubs):
            r = self._call(i, partial(stub.Stats, pspb.StatsRequest(), timeout=self.timeout))
            row = {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields}
            row["optimizer"] = pspb.RowOptimizer.Name(r.optimizer).split("_")[-1].lower()
            out.append(row)
        return out

    def snapshot(self) -> list[str]:
        return [
            self._call(i, partial(s.Snapshot, pspb.SnapshotRequest(), timeout=self.timeout)).path
            for i, s in enumerate(self.stubs)
        ]

    def restore(self) -> list[int]:
        request = pspb.RestoreRequest()
        versions = [
            self._call(i, partial(s.Restore, request, timeout=self.timeout)).version
            for i, s in enumerate(self.stubs)
        ]
        self._push_versions = list(versions)  # asked for: the versions go back on purpose
        self._acked = [0] * len(self.addresses)  # ... and so do the sequences applied
        return versions

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for c in self.channels:
            c.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
