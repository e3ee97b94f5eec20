"""The master of fedenc's gRPC runtime: a server that children dial, and a Flower ``Grid`` over
their streams, so that ``nodes/master.py``'s ServerApp
(:func:`~fedenc.federation.master.run_master`) runs unchanged.

* :class:`FederationServer` serves ``fedenc.v1.Federation/Connect``: one
  :class:`~fedenc.runtime.grpc.connection.ChildConnection` per child stream, the handshake (one
  stream per child name; with an ``identify`` callback, only the name the child's credentials
  allow), heartbeats both ways, and a Close on shutdown.
* :class:`GrpcGrid` is the Grid. It behaves as :class:`~fedenc.runtime.inprocess.InProcessGrid`:
  ids ``ins-N``, one encoding per destination, ``send_and_receive`` waits on a condition (no
  polling) up to its timeout and drops later replies, a message for an unknown node gets an
  immediate ``NODE_UNAVAILABLE`` error reply, and a child that goes away (killed, refused,
  silent past the heartbeat timeout, goodbye) turns every message it still owes into a
  ``NODE_UNAVAILABLE`` error reply at once, so a round ends with the others. A child that comes
  back gets a new node id: ``run_master`` sees a new node and queries it at the next round.
  ``bytes_sent`` / ``bytes_received`` count the Flower messages' frames on the wire.
* :func:`run_server_app` runs a ServerApp on the grid, as
  :func:`~fedenc.runtime.inprocess.run_inprocess` does in-process.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, Protocol

import grpc
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import ServerApp

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.protocol.chunking import DEFAULT_MAX_CHUNK_BYTES, MIN_CHUNK_BYTES
from fedenc.protocol.tensors import TensorEncodeError
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.grpc.connection import ChildConnection, Sent, heartbeat_frame
from fedenc.runtime.grpc.frames import encode_message
from fedenc.runtime.grpc.send_turns import DEFAULT_PATIENCE, SendTurns
from fedenc.runtime.grpc.shared_frames import DEFAULT_BUDGET_BYTES, SharedFrames
from fedenc.runtime.grpc.transport import (
    AGENT,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    PROTOCOL_VERSION,
    AuthContext,
    Refused,
    ServerSecurity,
    bind,
    parse_address,
    server_options,
)
from fedenc.runtime.instructions import stamp_instruction
from fedenc.runtime.replies import stream_replies
from fedenc.security.errors import IDENTITY_ERROR_PREFIX
from fedenc.training.allocator import tune_allocator

log = logging.getLogger(__name__)

#: Concurrent RPCs the server takes beside its children's streams (Control calls, at most
#: ``fedenc.control.service.MAX_WATCHERS`` of them long-lived).
SERVICE_RPC_SLOTS: Final = 16

UserConfig = dict[str, bool | int | float | str]


class ChildObserver(Protocol):
    """Told when a child is welcome and when it is gone (the Control API's child registry)."""

    def child_joined(self, conn: ChildConnection, hello: spb.Hello) -> None: ...

    def child_left(self, conn: ChildConnection, reason: str) -> None: ...


def run_config_to_proto(run_config: Mapping[str, Any]) -> dict[str, spb.ConfigValue]:
    out: dict[str, spb.ConfigValue] = {}
    for key, value in run_config.items():
        if isinstance(value, bool):
            out[key] = spb.ConfigValue(bool_value=value)
        elif isinstance(value, int):
            out[key] = spb.ConfigValue(int_value=value)
        elif isinstance(value, float):
            out[key] = spb.ConfigValue(double_value=value)
        elif isinstance(value, str):
            out[key] = spb.ConfigValue(string_value=value)
        else:
            raise ValueError(
                f"run config {key!r}: {type(value).__name__} is not bool/int/float/str"
            )
    return out


#: Hello names kept by node id after their streams end (to name children in reports).
_NAMES_KEPT = 100_000


class FederationServer:
    """The gRPC server children connect to, and the registry of the connected children."""

    def __init__(
        self,
        address: str,
        security: ServerSecurity,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        hello_timeout: float = 10.0,
        max_children: int = 256,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_array_bytes: int | None = None,
        strict_arrays: bool = True,
        inbound_slots: int = 1,
        shared_frame_bytes: int = DEFAULT_BUDGET_BYTES,
        send_patience: float | None = DEFAULT_PATIENCE,
    ) -> None:
        parse_address(address)
        security.check()
        tune_allocator()  # every reply lands in model-sized buffers: reuse their pages
        if not 0 < heartbeat_interval < heartbeat_timeout:
            raise ValueError(
                f"need 0 < heartbeat_interval ({heartbeat_interval}) < heartbeat_timeout "
                f"({heartbeat_timeout})"
            )
        self.security = security
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.hello_timeout = hello_timeout
        self.max_children = max_children
        #: Certificate names that may not join as children (the Control API's operators).
        self.reserved_names: frozenset[str] = frozenset()
        self._names: OrderedDict[int, str] = OrderedDict()  # node id -> Hello name, kept
        self.max_chunk_bytes = max_chunk_bytes
        self.max_array_bytes = max_array_bytes
        self.strict_arrays = strict_arrays
        if inbound_slots < 0:
            raise ValueError(f"inbound_slots must be >= 0 (0 = no limit), got {inbound_slots}")
        # Replies whose tensors are assembled at once (ChildConnection._admit); 0 = no limit.
        self.inbound_slots = inbound_slots
        self._inbound = threading.BoundedSemaphore(inbound_slots) if inbound_slots else None
        # Large messages leave one after another (send_turns); None sends them side by side.
        self.turns = None if send_patience is None else SendTurns(send_patience)
        # The chunk frames of an encoder sent to several children are serialized once.
        self.shared_frames = SharedFrames(shared_frame_bytes)
        self._lock = threading.Condition()
        self._all: set[ChildConnection] = set()
        self._by_node: dict[int, ChildConnection] = {}
        self._by_name: dict[str, ChildConnection] = {}
        self._node_ids = itertools.count(fc.SUPERLINK_NODE_ID + 1)
        self._run: spb.RunInfo | None = None
        self._grid: GrpcGrid | None = None
        self._stopping = False
        self._stopped = threading.Event()
        self.bytes_sent = 0
        self.bytes_received = 0
        self.observer: ChildObserver | None = None
        # Every child's stream holds a thread; Control calls (watch streams capped at
        # MAX_WATCHERS) get their own slots beyond them, so they cannot lock children out.
        slots = max_children + SERVICE_RPC_SLOTS
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=slots, thread_name_prefix="fedenc-rpc"),
            options=server_options(heartbeat_interval),
            maximum_concurrent_rpcs=slots,
        )
        handler = grpc.method_handlers_generic_handler(
            "fedenc.v1.Federation",
            {"Connect": grpc.stream_stream_rpc_method_handler(self._connect)},  # raw bytes
        )
        self._server.add_generic_rpc_handlers((handler,))
        port = bind(self._server, address, security.credentials)
        self.port = port
        self.address = f"{parse_address(address)[0]}:{port}"
        self._monitor = threading.Thread(target=self._watch, name="fedenc-heartbeat", daemon=True)

    @property
    def grpc_server(self) -> grpc.Server:
        """The underlying server, to add services next to Federation (before :meth:`start`)."""
        return self._server

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FederationServer:
        self._server.start()
        self._monitor.start()
        log.info("master listening on %s", self.address)
        return self

    def stop(
        self,
        detail: str = "the master shuts down",
        grace: float = 3.0,
        reason: int = spb.CLOSE_REASON_SHUTDOWN,
    ) -> None:
        """Says goodbye to every child (Close ``reason``: SHUTDOWN, or RESTART when the job
        will resume and the children should wait for it), then stops serving."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            conns = list(self._all)
        for conn in conns:
            conn.close(reason, detail)  # type: ignore[arg-type]
        self._server.stop(grace).wait(grace + 1.0)
        self._stopped.set()

    def __enter__(self) -> FederationServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- registry ----------------------------------------------------------------------------------

    def node_ids(self) -> list[int]:
        with self._lock:
            return list(self._by_node)

    def children(self) -> dict[str, int]:
        """Connected children: name -> node id."""
        with self._lock:
            return {name: conn.node_id for name, conn in self._by_name.items()}

    def connection(self, node_id: int) -> ChildConnection | None:
        with self._lock:
            return self._by_node.get(node_id)

    def name_of(self, node_id: int) -> str | None:
        """The Hello name of node ``node_id``, also after its stream ended (a report about a
        child that left, or was revoked, names it, not "node-3"); None for an unknown node."""
        with self._lock:
            conn = self._by_node.get(node_id)
            if conn is not None:  # connected: its own name, whatever the history kept
                return conn.name
            return self._names.get(node_id)

    def wait_for_children(self, count: int, timeout: float | None = None) -> bool:
        """Blocks until ``count`` children are connected (False at the timeout)."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._by_node) >= count, timeout)

    def set_run(self, run_id: int, run_config: Mapping[str, Any], grid: GrpcGrid | None) -> None:
        """Announces a run (RunInfo) to every child, now and on connect; ``grid`` gets the
        replies and losses."""
        info = spb.RunInfo(run_id=run_id, run_config=run_config_to_proto(run_config))
        with self._lock:
            self._run, self._grid = info, grid
            for conn in self._by_node.values():
                conn.send(spb.MasterMessage(run=info))

    def count(self, sent: int, received: int) -> None:
        with self._lock:
            self.bytes_sent += sent
            self.bytes_received += received

    # -- ConnectionOwner ---------------------------------------------------------------------------

    def welcome(self, conn: ChildConnection, hello: spb.Hello) -> spb.Close | None:
        # The identity was proved when the stream opened (_connect); a Hello naming someone
        # else is refused: the name in the certificate is the child's name, never a claimed one.
        if conn.identity is not None and conn.identity in self.reserved_names:
            return spb.Close(
                reason=spb.CLOSE_REASON_UNAUTHORIZED,
                detail=f"certificate {conn.identity!r} is an operator's (the Control API's), not "
                "a child's: issue the child a certificate of its own",
            )
        if conn.identity is not None and conn.identity != hello.name:
            return spb.Close(
                reason=spb.CLOSE_REASON_UNAUTHORIZED,
                detail=f"the certificate of {conn.peer} names child {conn.identity!r}, "
                f"the Hello claims {hello.name!r}",
            )
        with self._lock:
            if self._stopping:
                return spb.Close(reason=spb.CLOSE_REASON_SHUTDOWN, detail="the master shuts down")
            other = self._by_name.get(hello.name)
            if other is not None:
                return spb.Close(
                    reason=spb.CLOSE_REASON_DUPLICATE_IDENTITY,
                    detail=f"a child named {hello.name!r} is already connected "
                    f"(node {other.node_id}, {other.peer})",
                )
            if len(self._by_node) >= self.max_children:
                return spb.Close(
                    reason=spb.CLOSE_REASON_FULL,
                    detail=f"the master takes at most {self.max_children} children",
                )
            asked = int(hello.max_chunk_bytes)
            if 0 < asked < MIN_CHUNK_BYTES:
                return spb.Close(
                    reason=spb.CLOSE_REASON_INCOMPATIBLE,
                    detail=f"Hello.max_chunk_bytes {asked} is below the {MIN_CHUNK_BYTES} bytes "
                    "a master sends at the least",
                )
            # The child's limit on what it receives: the master cuts its messages to it.
            conn.send_chunk_bytes = min(self.max_chunk_bytes, asked or self.max_chunk_bytes)
            conn.node_id = next(self._node_ids)
            # Queued before the node is visible, so Welcome and RunInfo precede any message.
            conn.send(
                spb.MasterMessage(
                    welcome=spb.Welcome(
                        node_id=conn.node_id,
                        protocol_version=PROTOCOL_VERSION,
                        capabilities=ChildConnection.shared_capabilities(hello),
                        heartbeat_interval_s=self.heartbeat_interval,
                        heartbeat_timeout_s=self.heartbeat_timeout,
                        max_chunk_bytes=conn.send_chunk_bytes,
                        agent=AGENT,
                    )
                )
            )
            if self._run is not None:
                conn.send(spb.MasterMessage(run=self._run))
            self._by_node[conn.node_id] = conn
            self._by_name[hello.name] = conn
            self._names[conn.node_id] = hello.name
            while len(self._names) > _NAMES_KEPT:  # a long-lived master: the oldest go
                self._names.popitem(last=False)
            self._lock.notify_all()
        log.info("child %s connected (%s)", conn.label(), hello.agent or "unknown agent")
        if self.observer is not None:
            self.observer.child_joined(conn, hello)
        return None

    def reply(self, conn: ChildConnection, message: Message, sent: Sent) -> None:
        grid = self._grid
        if grid is None:
            log.info("reply from %s outside any run: dropped", conn.label())
            return
        grid.deliver(message, sent.message_id)

    def gone(self, conn: ChildConnection, reason: str) -> None:
        with self._lock:
            self._all.discard(conn)
            registered = self._by_node.get(conn.node_id) is conn
            if registered:
                del self._by_node[conn.node_id]
                del self._by_name[conn.name]
            grid = self._grid
            self._lock.notify_all()
        if registered:
            log.info("child %s left: %s", conn.label(), reason)
            if self.observer is not None:
                self.observer.child_left(conn, reason)
            if grid is not None:
                grid.node_lost(conn.node_id, f"child {conn.name!r} is gone: {reason}")

    # -- gRPC --------------------------------------------------------------------------------------

    def _connect(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            open_streams = len(self._all)
        if open_streams >= self.max_children:
            # Streams before their Hello hold server slots too: without this, a flood of them
            # took the Control API's slots as well (RESOURCE_EXHAUSTED for every call).
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{open_streams} streams are open; the master takes at most "
                f"{self.max_children} children",
            )
        auth = {k: list(v) for k, v in (context.auth_context() or {}).items()}
        identity = self._identify(auth, context)
        conn = ChildConnection(
            self,
            context.peer(),
            auth,
            max_chunk_bytes=self.max_chunk_bytes,
            max_array_bytes=self.max_array_bytes,
            strict_arrays=self.strict_arrays,
            inbound=self._inbound,
            shared_frames=self.shared_frames,
            turns=self.turns,
            keepalive=self.heartbeat_interval,
        )
        conn.identity = identity
        with self._lock:
            if self._stopping:
                return
            self._all.add(conn)
        context.add_callback(lambda: conn.ended("the stream ended"))
        reader = threading.Thread(
            target=conn.read, args=(requests,), name="fedenc-child-reader", daemon=True
        )
        reader.start()
        yield from conn.frames()

    def _identify(self, auth: AuthContext, context: grpc.ServicerContext) -> str | None:
        """The child name the stream's credentials prove (None without an identify callback);
        a refused peer's stream is aborted with the refusal's status and message, which the
        child turns into a readable error (fedenc.security.rpc_errors)."""
        identify = self.security.identify
        if identify is None:
            return None
        try:
            name = identify(auth)
        except Refused as err:
            log.warning("refusing the stream of %s: %s", context.peer(), err)
            context.abort(err.code, str(err))
            raise  # unreachable: abort raises
        if name is None:
            detail = (
                f"{IDENTITY_ERROR_PREFIX} (unknown): the credentials of {context.peer()} "
                "name no child"
            )
            log.warning("refusing the stream of %s: %s", context.peer(), detail)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, detail)
        return name

    def recheck(self, conn: ChildConnection) -> str | None:
        """Verify an admitted child's credentials again (revocation, allowlist and expiry change
        while a stream lives for days); the reason of a refusal, or None."""
        identify = self.security.identify
        if identify is None or conn.identity is None:
            return None
        try:
            name = identify(conn.auth)
        except Refused as err:
            return str(err)
        if name != conn.identity:
            return (
                f"{IDENTITY_ERROR_PREFIX} (unknown): the credentials of {conn.peer} no longer "
                "name a child"
            )
        return None

    def _watch(self) -> None:
        """Heartbeats out, silent or handshake-less streams closed."""
        next_beat: dict[ChildConnection, float] = {}
        tick = min(0.5, self.heartbeat_interval / 2)
        while not self._stopped.wait(tick):
            now = time.monotonic()
            with self._lock:
                conns = list(self._all)
            for conn in conns:
                if not conn.welcomed:
                    if now - conn.created > self.hello_timeout:
                        conn.refuse(f"no Hello within {self.hello_timeout:g} s")
                    continue
                silent = now - conn.last_seen
                if silent > self.heartbeat_timeout:
                    log.warning("child %s silent for %.1f s: dropped", conn.label(), silent)
                    conn.close(
                        spb.CLOSE_REASON_TIMEOUT,
                        f"no frame for {silent:.1f} s (heartbeat timeout "
                        f"{self.heartbeat_timeout:g} s)",
                    )
                    continue
                if now >= next_beat.get(conn, 0.0):
                    conn.send(heartbeat_frame())
                    next_beat[conn] = now + self.heartbeat_interval
            for conn in [c for c in next_beat if c.closed]:
                del next_beat[conn]


class GrpcGrid(fc.RunGrid):
    """A Flower ``Grid`` over the children connected to a :class:`FederationServer`."""

    def __init__(
        self, server: FederationServer, run_id: int, run_config: Mapping[str, Any] | None = None
    ) -> None:
        self._server = server
        self._run = fc.empty_run(run_id)
        self._lock = threading.Condition()
        self._replies: dict[str, Message] = {}
        # instruction id -> (node id, instruction), until replied to or expired
        self._pending: dict[str, tuple[int, Message]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._sent0, self._received0 = server.bytes_sent, server.bytes_received
        server.set_run(run_id, dict(run_config or {}), self)

    @property
    def bytes_sent(self) -> int:
        return self._server.bytes_sent - self._sent0

    @property
    def bytes_received(self) -> int:
        return self._server.bytes_received - self._received0

    # -- Grid -------------------------------------------------------------------------------------

    def get_node_ids(self) -> list[int]:
        return self._server.node_ids()

    def node_name(self, node_id: int) -> str | None:
        """The name the child gave in its Hello (kept after its stream ends)."""
        return self._server.name_of(node_id)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids: list[str] = []
        for message in messages:
            meta = message.metadata
            message_id = stamp_instruction(message, self._run.run_id, self._ids)
            with self._lock:
                if self._closed:
                    raise RuntimeError("the gRPC grid is closed")
                self._pending[message_id] = (meta.dst_node_id, message)
            ids.append(message_id)
            conn = self._server.connection(meta.dst_node_id)
            if conn is None:
                reason = f"node {meta.dst_node_id} is not connected"
                self.deliver(fc.error_reply(message, fc.NODE_UNAVAILABLE, reason), message_id)
                continue
            if conn.checked_group != meta.group_id:
                # Before each round (a new group id) the child's certificate is checked again:
                # a revocation ends a stream that opened before it.
                conn.checked_group = meta.group_id
                refusal = self._server.recheck(conn)
                if refusal is not None:
                    log.warning("closing the stream of %s: %s", conn.label(), refusal)
                    conn.close(spb.CLOSE_REASON_UNAUTHORIZED, refusal)
                    reason = f"child {conn.name!r} is refused: {refusal}"
                    self.deliver(fc.error_reply(message, fc.NODE_UNAVAILABLE, reason), message_id)
                    continue
            try:
                encoded = encode_message(message, max_chunk_bytes=conn.send_chunk_bytes)
            except TensorEncodeError as err:
                with self._lock:
                    self._pending.pop(message_id, None)
                raise ValueError(f"message {message_id} cannot go on the wire: {err}") from None
            sent = Sent(message_id, self._run.run_id, encoded.specs)
            if not conn.send_message(encoded, sent):
                reason = f"child {conn.name!r} is gone: {conn.close_reason}"
                self.deliver(fc.error_reply(message, fc.NODE_UNAVAILABLE, reason), message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        with self._lock:
            out = [self._replies.pop(mid) for mid in message_ids if mid in self._replies]
        return out

    def receive(self, message_ids: Sequence[str], timeout: float | None) -> Iterator[Message]:
        """Yield each reply to ``message_ids`` as soon as its stream delivers it (no polling),
        until all have come or ``timeout`` seconds have passed; the rest are forgotten (a late
        reply is dropped). The master folds each reply while the others are still training."""
        return stream_replies(
            self._lock, self._replies, message_ids, timeout, self._forget, self._stop_check()
        )

    def _forget(self, message_ids: list[str]) -> None:
        """Under the lock: stop expecting replies to ``message_ids`` (late ones are dropped)."""
        for mid in message_ids:
            self._pending.pop(mid, None)

    def _stop_check(self) -> Callable[[], None] | None:
        """What may end a :meth:`receive` early by raising (None: only its timeout does)."""
        return None

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        ids = self.push_messages(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not all(mid in self._replies for mid in ids):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left)
            out = [self._replies.pop(mid) for mid in ids if mid in self._replies]
            self._forget(ids)  # whatever did not come in time: a late reply is dropped
        late = len(ids) - len(out)
        if late:
            log.info("%d of %d replies did not come within %s s", late, len(ids), timeout)
        return out

    # -- from the server ---------------------------------------------------------------------------

    def deliver(self, reply: Message, message_id: str) -> None:
        with self._lock:
            if self._pending.pop(message_id, None) is None:
                log.info(
                    "late or unexpected reply to %s from node %s dropped",
                    message_id,
                    reply.metadata.src_node_id,
                )
                return
            self._replies[message_id] = reply
            self._lock.notify_all()

    def node_lost(self, node_id: int, reason: str) -> None:
        """Every message still owed by ``node_id`` gets a NODE_UNAVAILABLE error reply now."""
        with self._lock:
            owed = [mid for mid, (nid, _) in self._pending.items() if nid == node_id]
            for mid in owed:
                _, message = self._pending.pop(mid)
                self._replies[mid] = fc.error_reply(message, fc.NODE_UNAVAILABLE, reason)
            if owed:
                self._lock.notify_all()

    def close(self) -> None:
        """No more messages; waiting calls return what they have (with error replies)."""
        with self._lock:
            self._closed = True
            for mid, (_, message) in self._pending.items():
                self._replies[mid] = fc.error_reply(message, fc.NODE_UNAVAILABLE, "the grid closed")
            self._pending.clear()
            self._lock.notify_all()
        self._server.set_run(self._run.run_id, {}, None)


# -- entry point -------------------------------------------------------------------------------


@dataclass
class ServerRun:
    """What :func:`run_server_app` leaves behind (as ``InProcessRun`` does in-process)."""

    run_id: int
    server_context: Context
    bytes_sent: int
    bytes_received: int
    seconds: float


def run_server_app(
    server_app: ServerApp,
    server: FederationServer,
    run_config: Mapping[str, Any] | None = None,
    *,
    run_id: int | None = None,
    grid_class: Callable[[FederationServer, int, Mapping[str, Any]], GrpcGrid] | None = None,
) -> ServerRun:
    """Runs ``server_app`` once on a :class:`GrpcGrid` over ``server``'s children
    (``grid_class``: a subclass, e.g. the Control API's, which watches and can cancel the run)."""
    from fedenc.runtime.inprocess import new_run_id

    rid = run_id if run_id is not None else new_run_id()
    config: UserConfig = dict(run_config or {})
    context = Context(
        run_id=rid,
        node_id=fc.SUPERLINK_NODE_ID,
        node_config={},
        state=RecordDict(),
        run_config=config,
    )
    grid = (grid_class or GrpcGrid)(server, rid, config)
    t0 = time.perf_counter()
    try:
        with fc.task_identity(rid):
            server_app(grid, context)
    finally:
        grid.close()
    return ServerRun(
        run_id=rid,
        server_context=context,
        bytes_sent=grid.bytes_sent,
        bytes_received=grid.bytes_received,
        seconds=time.perf_counter() - t0,
    )
