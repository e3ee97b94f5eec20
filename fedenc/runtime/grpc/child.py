"""A child of fedenc's gRPC runtime: a long-lived process that dials the master, holds one
``fedenc.v1.Federation/Connect`` stream and runs a ClientApp (``nodes/child.py``'s by default) on
the Flower Messages the master pushes.

* **State across rounds.** One Flower ``Context`` per run, kept for the life of the process (the
  ClientApp's ``context.state`` persists from round to round; fedenc's child also keeps its data,
  model and optimizer in memory). Messages are handled one at a time, in order, like a SuperNode.
* **Push, no polling.** A reader thread takes frames as they come; a worker thread calls the
  ClientApp; replies and heartbeats leave through one outbound queue that gRPC drains.
* **Liveness.** A Heartbeat every interval, also while the ClientApp trains for minutes (its own
  thread); the master is considered gone after the heartbeat timeout without a frame, and gRPC
  keepalive pings watch the connection underneath.
* **Reconnects.** A lost stream is dialled again with backoff (a new node id each time; the
  master queries the child again and it rejoins the running job at the next round). The child
  gives up after ``connect_timeout`` seconds without a welcome (exit code 1; 0 = never), and
  stops for good when refused for its identity or version (exit code 3), with a readable
  reason: the master's identity refusal (revoked, not allowlisted, unknown, a Hello naming
  someone else), a master this child does not trust, or, with TLS, a handshake the master cuts
  short three times in a row (its certificate was rejected: expired, from another CA).
* **Shutdown.** :meth:`GrpcChild.stop` (SIGINT/SIGTERM in the CLI) sends a goodbye (Close
  SHUTDOWN) and ends the stream; when the master closes with SHUTDOWN, the child exits (code 0)
  unless it was told to stay for the next federation. A master stopped with a checkpoint to
  resume closes with RESTART instead: the child keeps the job's state and dials again (within
  ``connect_timeout``), so that the resumed job continues as if never stopped.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from google.protobuf.message import DecodeError

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.protocol.tensors import TensorEncodeError
from fedenc.protocol.wire_chunks import RawChunk, chunk_frame, parse_chunk_frame
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.clientapp import ClientCallable, call_client_app
from fedenc.runtime.grpc.frames import FrameError, FrameReader, encode_message
from fedenc.runtime.grpc.transport import (
    AGENT,
    CAPABILITIES,
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_HEARTBEAT_TIMEOUT,
    PROTOCOL_VERSION,
    SERVICE_METHOD,
    ChannelSecurity,
    channel_options,
    parse_address,
)
from fedenc.security.rpc_errors import explain_rpc_error, refusal_reason
from fedenc.training.allocator import tune_allocator

log = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_UNREACHABLE: Final = 1
EXIT_REFUSED: Final = 3
_FATAL = frozenset({spb.CLOSE_REASON_UNAUTHORIZED, spb.CLOSE_REASON_INCOMPATIBLE})
# TLS failures that retrying cannot heal: this child does not trust the master, the dialled
# name is not in the master's certificate, the master speaks plaintext.
_TLS_FATAL = ("CERTIFICATE_VERIFY_FAILED", "Hostname Verification", "WRONG_VERSION_NUMBER")
# With TLS 1.3 a master that rejects this child's certificate just closes the socket; a master
# that is down refuses the connection instead. Three such closes in a row are a refusal.
_HANDSHAKE_CLOSES = 3
# While the master stays unreachable, a line this often (each failed dial is logged at debug).
_QUIET_NOTE_S = 60.0


@dataclass(frozen=True)
class _CloseError:
    """The master's Close, shaped like a ``grpc.RpcError`` for ``explain``."""

    reason: str
    detail: str

    def code(self) -> str:
        return self.reason

    def details(self) -> str:
        return self.detail


def run_config_from_proto(values: Mapping[str, spb.ConfigValue]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        kind = value.WhichOneof("kind")
        out[key] = getattr(value, kind) if kind else ""
    return out


@dataclass
class _Session:
    """One stream to the master."""

    out: queue.Queue[list[spb.ChildMessage] | Iterator[spb.ChildMessage | RawChunk] | None] = field(
        default_factory=queue.Queue
    )
    done: threading.Event = field(default_factory=threading.Event)
    node_id: int = 0
    welcomed: bool = False
    close: spb.Close | None = None  # the master's Close, if it sent one
    error: str = ""
    rpc_error: Any = None  # the grpc.RpcError that ended the stream, if one did
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    call: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ended: bool = False

    def send(self, frames: list[spb.ChildMessage] | Iterator[spb.ChildMessage | RawChunk]) -> bool:
        with self._lock:
            if self._ended:
                return False
            self.out.put(frames)
            return True

    def end(self) -> None:
        """Half-closes the outbound stream (after what is queued)."""
        with self._lock:
            if not self._ended:
                self._ended = True
                self.out.put(None)


class GrpcChild:
    """A child process's runtime (see the module docstring)."""

    def __init__(
        self,
        address: str,
        name: str,
        client_app: ClientApp | ClientCallable,
        node_config: Mapping[str, Any] | None = None,
        security: ChannelSecurity | None = None,
        *,
        connect_timeout: float = 60.0,
        stay: bool = False,
        max_array_bytes: int | None = None,
    ) -> None:
        parse_address(address)
        if not name:
            raise ValueError("a child needs a name")
        tune_allocator()  # every instruction lands in model-sized buffers: reuse their pages
        self.address = address
        self.name = name
        self.client_app = client_app
        self.node_config: dict[str, Any] = dict(node_config or {})
        self.security = security or ChannelSecurity()
        self.security.check()
        self.connect_timeout = connect_timeout
        self.stay = stay
        self.max_array_bytes = max_array_bytes
        self.contexts: dict[int, Context] = {}
        self.handled = 0
        self.sessions = 0
        self._runs: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._goodbye = "the child stops"
        self._busy = False
        self._inbox: queue.Queue[tuple[_Session, int, Message]] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="fedenc-clientapp", daemon=True)
        self._session: _Session | None = None
        self._handshake_closes = 0
        #: Why the master refused this child (exit code 3), for the CLI and tests.
        self.refusal = ""

    # -- control -----------------------------------------------------------------------------------

    def stop(self, detail: str = "the child stops") -> None:
        """Asks :meth:`run` to say goodbye and return (safe from a signal handler)."""
        self._goodbye = detail
        self._stop.set()

    def run(self) -> int:
        """Connects, serves, reconnects; returns the exit code (see the module docstring)."""
        self._worker.start()
        patience = self.connect_timeout or math.inf  # 0: never give up
        deadline = time.monotonic() + patience
        backoff = 0.2
        ever_welcomed = False
        awaiting_resume = False  # the master closed with RESTART and has not come back yet
        warned = False  # the current outage was announced (reset by each welcome)
        down_since = time.monotonic()
        next_note = time.monotonic() + _QUIET_NOTE_S
        while not self._stop.is_set():
            session = self._connect_once()
            if self._stop.is_set():
                return EXIT_OK
            if session.welcomed:
                ever_welcomed = True
                deadline = time.monotonic() + patience
                backoff = 0.2
                awaiting_resume = False
            # An outage starts (a welcomed stream ended, or the first dial failed): it is said
            # once, then quietly.
            outage_starts = session.welcomed or not warned
            close = session.close
            if close is not None and close.reason in _FATAL:
                reason = spb.CloseReason.Name(close.reason).removeprefix("CLOSE_REASON_")
                return self._refused(_CloseError(reason, close.detail))
            if close is None and self._fatal(session):
                return self._refused(session.rpc_error)
            if close is not None and close.reason == spb.CLOSE_REASON_RESTART:
                awaiting_resume = True
                wait = "without end" if math.isinf(patience) else f"for up to {patience:.0f} s"
                log.warning(
                    "%s: the master stopped to resume its job (%s): keeping the job's state and "
                    "dialling again %s",
                    self.name,
                    close.detail,
                    wait,
                )
            elif close is not None and close.reason == spb.CLOSE_REASON_SHUTDOWN:
                log.info("%s: the master closed the federation: %s", self.name, close.detail)
                if not self.stay:
                    return EXIT_OK
            elif close is not None:
                log.warning("%s: the master closed the stream: %s", self.name, close.detail)
            elif outage_starts:
                log.warning("%s: stream lost: %s", self.name, session.error or "no reason")
            elif time.monotonic() >= next_note:
                # Not a warning every few seconds for as long as a master is down: one a minute.
                waited = time.monotonic() - down_since
                log.info("%s: still no connection to %s after %.0f s: %s", self.name,
                         self.address, waited, session.error or "no reason")  # fmt: skip
                next_note = time.monotonic() + _QUIET_NOTE_S
            else:
                log.debug("%s: no connection: %s", self.name, session.error or "no reason")
            if outage_starts:
                down_since = time.monotonic()
                next_note = down_since + _QUIET_NOTE_S
            warned = True
            if time.monotonic() >= deadline and awaiting_resume:
                # The master ended the session on purpose; not coming back is not a failure.
                log.warning("%s: the master did not resume its job within %.0f s: exiting",
                            self.name, patience)  # fmt: skip
                return EXIT_OK
            if time.monotonic() >= deadline:
                why = ""
                lost = str(session.error or "")
                if (
                    self.security.credentials is None
                    and not ever_welcomed
                    and "Socket closed" in lost
                ):
                    # What a TLS master's handshake makes of a plaintext connection (a master that
                    # is not there gives "Connection refused" instead).
                    why = " (the master closes plaintext connections: it runs with --certs?)"
                elif "Connection refused" in lost:
                    # Not started yet, or gone: the same to a dialler. Say what can be done.
                    why = (
                        " (connection refused: no master listens there yet; a master that "
                        "starts later is found if --connect-timeout waits long enough)"
                    )
                elif "UNIMPLEMENTED" in lost or "status: 404" in lost:
                    why = " (something answers there, but it is not a fedenc master)"
                if close is not None and close.reason == spb.CLOSE_REASON_DUPLICATE_IDENTITY:
                    # Retried until now: a restarted child's old stream lasts until the master's
                    # heartbeat timeout drops it.
                    why = (
                        f" (the master still has a child named {self.name!r}: another process "
                        "with this --name, or this child's old stream)"
                    )
                log.error(
                    "%s: no connection to %s within %.0f s%s: giving up",
                    self.name,
                    self.address,
                    self.connect_timeout,
                    why,
                )
                return EXIT_UNREACHABLE
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)
        return EXIT_OK

    def _fatal(self, session: _Session) -> bool:
        """Whether the error that ended an unwelcomed stream is a refusal (see _TLS_FATAL)."""
        err = session.rpc_error
        if session.welcomed or err is None:
            self._handshake_closes = 0
            return False
        if refusal_reason(err) is not None:
            return True
        if self.security.credentials is None:
            return False
        details = err.details() if callable(getattr(err, "details", None)) else str(err)
        if any(marker in details for marker in _TLS_FATAL):
            return True
        if "Socket closed" in details or "handshake" in details.lower():
            self._handshake_closes += 1
            return self._handshake_closes >= _HANDSHAKE_CLOSES
        self._handshake_closes = 0
        return False

    def _refused(self, err: Any) -> int:
        explain = self.security.explain or (lambda e: explain_rpc_error(e, target=self.address))
        self.refusal = explain(err)
        log.error("%s: refused: %s", self.name, self.refusal)
        return EXIT_REFUSED

    # -- one stream --------------------------------------------------------------------------------

    def _connect_once(self) -> _Session:
        session = _Session()
        self._session = session
        self.sessions += 1
        channel = self.security.channel(self.address, channel_options())
        try:
            ids = itertools.count(1)

            def requests() -> Iterator[bytes]:
                while True:
                    item = session.out.get()
                    if item is None:
                        return
                    for frame in item:
                        if isinstance(frame, RawChunk):
                            yield chunk_frame(next(ids), frame)
                        else:
                            frame.message_id = next(ids)
                            yield frame.SerializeToString()

            hello = spb.Hello(
                name=self.name,
                protocol_version=PROTOCOL_VERSION,
                capabilities=list(CAPABILITIES),
                agent=AGENT,
            )
            session.send([spb.ChildMessage(hello=hello)])
            session.call = channel.stream_stream(SERVICE_METHOD)(requests())
            reader = threading.Thread(
                target=self._read, args=(session,), name="fedenc-master-reader", daemon=True
            )
            beats = threading.Thread(
                target=self._beat, args=(session,), name="fedenc-heartbeat", daemon=True
            )
            reader.start()
            beats.start()
            while not session.done.wait(0.2):
                if self._stop.is_set():
                    self._say_goodbye(session)
                    break
            reader.join(timeout=5.0)
        finally:
            session.end()
            if session.call is not None:
                session.call.cancel()
            channel.close()
        return session

    @property
    def working(self) -> bool:
        """True while a ClientApp call runs (its work cannot be interrupted, only abandoned)."""
        return self._busy

    def _say_goodbye(self, session: _Session) -> None:
        log.info("%s: goodbye (%s)", self.name, self._goodbye)
        close = spb.Close(reason=spb.CLOSE_REASON_SHUTDOWN, detail=self._goodbye)
        session.send([spb.ChildMessage(close=close)])
        session.end()
        session.done.wait(3.0)  # the master answers with its own Close and ends the stream

    def _read(self, session: _Session) -> None:
        reader = FrameReader(max_array_bytes=self.max_array_bytes)
        try:
            for data in session.call:
                session.last_seen = time.monotonic()
                try:
                    if not self._frame(session, reader, data):
                        break
                except FrameError as err:
                    log.error("%s: refusing the master's stream: %s", self.name, err)
                    detail = str(err)
                    close = spb.Close(reason=spb.CLOSE_REASON_PROTOCOL_ERROR, detail=detail)
                    session.send([spb.ChildMessage(close=close)])
                    session.error = f"protocol error: {detail}"
                    break
            else:
                session.error = session.error or "the master ended the stream"
        except grpc.RpcError as err:
            session.rpc_error = err
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else str(err)
            session.error = session.error or f"{code}: {details}"
        finally:
            session.end()
            session.done.set()

    def _frame(self, session: _Session, reader: FrameReader, data: bytes) -> bool:
        """Handles one frame; False when the stream is over."""
        raw = parse_chunk_frame(data)
        if raw is not None:  # the bulk of the traffic: its data goes straight to the buffer
            tag = reader.tag
            message = reader.chunk(raw[2])
            if message is not None:
                self._inbox.put((session, tag, message))
            return True
        try:
            frame = spb.MasterMessage.FromString(data)
        except DecodeError as err:
            raise FrameError(f"undecodable frame of {len(data)} bytes ({err})") from None
        kind = frame.WhichOneof("body")
        if kind == "chunk":
            tag = reader.tag
            message = reader.chunk(frame.chunk)
            if message is not None:
                self._inbox.put((session, tag, message))
            return True
        if kind == "flower":
            if not session.welcomed:
                raise FrameError("FlowerMessage before the Welcome")
            message = reader.flower(frame.flower, frame.message_id)
            if message is not None:
                self._inbox.put((session, frame.message_id, message))
            return True
        reader.other(kind or "an empty")
        if kind == "close":
            session.close = frame.close
            return False
        if kind == "welcome":
            welcome = frame.welcome
            session.node_id = int(welcome.node_id)
            session.heartbeat_interval = welcome.heartbeat_interval_s or session.heartbeat_interval
            session.heartbeat_timeout = welcome.heartbeat_timeout_s or session.heartbeat_timeout
            session.welcomed = True
            for context in self.contexts.values():
                context.node_id = session.node_id
            log.info("%s: connected to %s as node %d", self.name, self.address, session.node_id)
        elif kind == "run":
            self._runs[int(frame.run.run_id)] = run_config_from_proto(frame.run.run_config)
        elif kind != "heartbeat":
            raise FrameError(f"unexpected {kind or 'empty'} frame from the master")
        return True

    def _beat(self, session: _Session) -> None:
        # A short tick, not the interval: the Welcome may shorten the interval after we start.
        next_beat = 0.0
        while not session.done.wait(min(0.25, session.heartbeat_interval)):
            now = time.monotonic()
            silent = now - session.last_seen
            if silent > session.heartbeat_timeout:
                session.error = f"no frame from the master for {silent:.1f} s"
                log.warning("%s: %s: reconnecting", self.name, session.error)
                session.call.cancel()
                return
            if now >= next_beat:
                beat = spb.Heartbeat(sent_at_unix_ms=int(time.time() * 1000), busy=self._busy)
                session.send([spb.ChildMessage(heartbeat=beat)])
                next_beat = now + session.heartbeat_interval

    # -- the ClientApp -----------------------------------------------------------------------------

    def _context(self, session: _Session, run_id: int) -> Context:
        context = self.contexts.get(run_id)
        if context is None:
            context = Context(
                run_id=run_id,
                node_id=session.node_id,
                node_config=dict(self.node_config),
                state=RecordDict(),
                run_config=dict(self._runs.get(run_id, {})),
            )
            self.contexts[run_id] = context
        return context

    def _work(self) -> None:
        while True:
            session, wire_id, message = self._inbox.get()
            if session.done.is_set():
                log.info("%s: dropping a message of a closed stream", self.name)
                continue
            run_id = message.metadata.run_id
            if run_id not in self._runs:
                reason = f"no RunInfo for run {run_id} before its message"
                reply = fc.error_reply(message, fc.CLIENT_APP_RAISED_EXCEPTION, reason)
            else:
                self._busy = True
                try:
                    reply = call_client_app(
                        self.client_app, message, self._context(session, run_id), self.name
                    )
                finally:
                    self._busy = False
                self.handled += 1
            fc.set_message_id(reply, "res-" + message.metadata.message_id.removeprefix("ins-"))
            try:
                encoded = encode_message(reply)
            except TensorEncodeError as err:
                reason = f"the reply cannot go on the wire: {err}"
                reply = fc.error_reply(message, fc.CLIENT_APP_RAISED_EXCEPTION, reason)
                encoded = encode_message(reply)

            def frames(
                e: Any = encoded, to: int = wire_id
            ) -> Iterator[spb.ChildMessage | RawChunk]:
                yield spb.ChildMessage(reply_to=to, flower=e.frame)
                yield from e.chunks  # serialized by chunk_frame: one copy of the data

            if not session.send(frames()):
                log.info("%s: the stream closed before the reply could be sent", self.name)
