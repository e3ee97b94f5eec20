"""The master's end of one child's Federation stream.

A :class:`ChildConnection` owns two directions:

* **outbound** (:meth:`ChildConnection.frames`, iterated by gRPC in the RPC's thread): a FIFO of
  items, each a run of frames sent back to back (a FlowerMessage and all its chunks, so nothing
  can slip between them). Frames get their ``message_id`` as they leave, so ids increase on the
  wire; chunk frames carry 0 (they belong to the message before them), so the serialized frames
  of an encoder sent to several children are shared (:mod:`.shared_frames`). A FlowerMessage is
  recorded as *sent* (wire id -> instruction id, expected tensors) just before it leaves, so a
  reply can never beat its record.
* **inbound** (:meth:`ChildConnection.read`, on its own thread): the Hello first, then
  heartbeats, a goodbye, and Flower Messages with their chunks (:class:`FrameReader`).

Any frame that breaks the protocol closes the stream with ``CLOSE_REASON_PROTOCOL_ERROR`` and a
logged reason; the master and the other children go on. The owner (:class:`FederationServer`)
is told through :class:`ConnectionOwner` when a child is welcome, sends a reply, or is gone.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeAlias

from flwr.app import Message
from google.protobuf.message import DecodeError

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.protocol.peer_text import clip
from fedenc.protocol.wire_chunks import RawChunk, parse_chunk_frame
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.grpc.frames import ArraySpecs, EncodedMessage, FrameError, FrameReader
from fedenc.runtime.grpc.send_turns import SendTurns, Turn
from fedenc.runtime.grpc.shared_frames import SharedFrames
from fedenc.runtime.grpc.transport import (
    CAPABILITIES,
    DEFAULT_HEARTBEAT_INTERVAL,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    REQUIRED_CAPABILITIES,
    AuthContext,
)

log = logging.getLogger(__name__)

CloseReason: TypeAlias = spb.CloseReason.ValueType


@dataclass
class Sent:
    """A FlowerMessage that left on this stream and awaits its reply."""

    message_id: str
    run_id: int
    specs: ArraySpecs = field(default_factory=dict)


#: What a reply may carry on top of its instruction's tensors, which it mirrors: the records the
#: instruction did not have (a shared table's row weights, the federation PS's sparse rows, the
#: Adam moments of cyclic training) are not checked tensor by tensor, so their bytes are bounded.
REPLY_EXTRA_BYTES: Final = 256 * 1024 * 1024
#: ChildMessage variants that protocol 1 does not use, and what carries their content.
_UNUSED: Final = {
    "confirmation": "a Confirmation inside the FlowerMessage reply to a 'query'",
    "train_result": "a train reply as a FlowerMessage",
    "evaluate_result": "an evaluate reply as a FlowerMessage",
    "encoder_request": "no encoder requests on this stream: use Control.RequestEncoder",
}
#: The longest Hello.agent kept (it is logged and listed by the Control API's ListChildren).
MAX_AGENT_CHARS: Final = 256
#: A reply that holds the master's inbound slot must keep arriving at this many bytes per second
#: once SLOT_GRACE_S have passed: one child trickling a byte at a time had held the slot, and
#: kept every other child's replies out, for whole rounds.
MIN_SLOT_RATE: Final = 64 * 1024
SLOT_GRACE_S: Final = 30.0


def reply_budget(specs: ArraySpecs) -> int:
    """The tensor bytes a reply to a message that sent ``specs`` may announce: four times the
    sent tensors (the updated tensors, and two Adam moments for each with carry-optimizer)
    plus :data:`REPLY_EXTRA_BYTES`. A reply announcing more is refused before any buffer is
    allocated: an announced size is otherwise allocated up front."""
    sent = sum(
        math.prod(shape) * dtype.itemsize
        for record in specs.values()
        for shape, dtype in record.values()
    )
    return 4 * sent + REPLY_EXTRA_BYTES


@dataclass
class _Item:
    frames: Iterable[spb.MasterMessage | RawChunk]
    sent: Sent | None = None  # recorded under the first frame's wire id
    counted: bool = False  # Flower traffic (bytes_sent)
    queued: bool = False  # sent in its turn (:mod:`.send_turns`)


def heartbeat_frame() -> spb.MasterMessage:
    """A master heartbeat, stamped now."""
    return spb.MasterMessage(heartbeat=spb.Heartbeat(sent_at_unix_ms=int(time.time() * 1000)))


class ConnectionOwner(Protocol):
    """What a connection reports to the server that owns it."""

    def welcome(self, conn: ChildConnection, hello: spb.Hello) -> spb.Close | None:
        """Register the child; a Close refuses it."""

    def reply(self, conn: ChildConnection, message: Message, sent: Sent) -> None:
        """A complete, checked reply from the child."""

    def gone(self, conn: ChildConnection, reason: str) -> None:
        """The stream is over (called once)."""

    def count(self, sent: int, received: int) -> None:
        """Flower-message bytes on the wire."""


class ChildConnection:
    """One child's stream, seen from the master."""

    def __init__(
        self,
        owner: ConnectionOwner,
        peer: str,
        auth: AuthContext,
        *,
        max_chunk_bytes: int,
        max_array_bytes: int | None,
        strict_arrays: bool = True,
        inbound: threading.BoundedSemaphore | None = None,
        shared_frames: SharedFrames | None = None,
        turns: SendTurns | None = None,
        keepalive: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        self.owner = owner
        self._turns = turns
        self._keepalive = keepalive  # heartbeat interval while a message waits for its turn
        self._shared = shared_frames or SharedFrames(0)
        self.peer = peer
        self.auth = auth
        self.name = ""
        self.node_id = 0
        #: The child name the stream's credentials prove (None without TLS identities).
        self.identity: str | None = None
        #: Group id (round) of the last message before which the identity was re-checked.
        self.checked_group: str | None = None
        self.strict_arrays = strict_arrays
        self.created = self.last_seen = time.monotonic()
        self.welcomed = False
        self.busy = False
        self.close_reason = ""
        self._out: queue.Queue[_Item | None] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._sent: dict[int, Sent] = {}
        self._reader = FrameReader(max_chunk_bytes=max_chunk_bytes, max_array_bytes=max_array_bytes)
        #: The largest chunk sent to this child: the master's, or less if its Hello asked.
        self.send_chunk_bytes = max_chunk_bytes
        # Inbound admission (shared by the master's streams): a reply's tensors are assembled
        # only while this stream holds a slot; the others stop reading, and gRPC's flow control
        # holds their children's sends. Eight 1 GiB replies arriving together then cost the
        # master a slot's worth of buffers, not 8 GiB.
        self._inbound = inbound
        self._holding = False
        self._held_since = 0.0  # when this stream took the inbound slot
        self._held_bytes = 0  # bytes it has sent since

    def label(self) -> str:
        return f"{self.name or '?'} (node {self.node_id}, {self.peer})"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- outbound ----------------------------------------------------------------------------------

    def _put(self, item: _Item) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._out.put(item)
            return True

    def send(self, frame: spb.MasterMessage) -> bool:
        """Queues one control frame; False when the stream is closed."""
        return self._put(_Item([frame]))

    def send_message(self, encoded: EncodedMessage, sent: Sent) -> bool:
        """Queues a Flower message (frame + chunks); False when the stream is closed."""

        def frames() -> Iterator[spb.MasterMessage | RawChunk]:
            yield spb.MasterMessage(flower=encoded.frame)
            yield from encoded.chunks  # serialized in frames(), shared between streams

        # A message of more than one frame of tensors waits for its turn to start (send_turns).
        big = self._turns is not None and encoded.array_bytes > self._reader.max_chunk_bytes
        return self._put(_Item(frames(), sent=sent, counted=True, queued=big))

    def frames(self) -> Iterator[bytes]:
        """The outbound frames, serialized, until the stream is closed (gRPC iterates this)."""
        while True:
            item = self._out.get()
            if item is None:
                return
            if item.queued and self._turns is not None:
                with self._turns.turn() as turn:
                    if not (yield from self._wait_turn(turn)):
                        return
                    yield from self._serialize(item, turn.progress)
            else:
                yield from self._serialize(item, None)

    def _wait_turn(self, turn: Turn) -> Generator[bytes, None, bool]:
        """Wait until ``turn`` may start (True), yielding heartbeats meanwhile so the child never
        sees the master go silent, however long the line; False when the stream closed."""
        beat_at = time.monotonic() + self._keepalive
        while not turn.wait(min(0.25, self._keepalive)):
            if self._closed:
                return False
            if time.monotonic() >= beat_at:
                yield from self._serialize(_Item([heartbeat_frame()]), None)
                beat_at = time.monotonic() + self._keepalive
        return True

    def _serialize(self, item: _Item, progress: Callable[[], None] | None) -> Iterator[bytes]:
        first = True
        for frame in item.frames:
            if isinstance(frame, RawChunk):
                # No id of its own: it belongs to the FlowerMessage before it, and so its bytes
                # are the same on every stream that sends this encoder.
                data = self._shared.frame(frame)
            else:
                message_id = next(self._ids)
                if first and item.sent is not None:
                    with self._lock:
                        self._sent[message_id] = item.sent
                frame.message_id = message_id
                data = frame.SerializeToString()
            first = False
            if item.counted:
                self.owner.count(len(data), 0)
            if progress is not None:
                progress()
            yield data

    def close(self, reason: CloseReason, detail: str) -> None:
        """Sends a Close (once) and ends the outbound stream; the owner hears of it."""
        with self._lock:
            if self._closed:
                return
            self._out.put(_Item([spb.MasterMessage(close=spb.Close(reason=reason, detail=detail))]))
            self._out.put(None)
            self._closed = True
            self.close_reason = detail
        self.owner.gone(self, detail)

    def ended(self, detail: str) -> None:
        """The RPC is over (peer gone, cancelled): no Close can be sent any more."""
        with self._lock:
            if self._closed:
                return
            self._out.put(None)
            self._closed = True
            self.close_reason = detail
        self.owner.gone(self, detail)

    def _admit(self) -> None:
        """Wait for an inbound slot before a reply's chunks are read (no-op without admission)."""
        if self._inbound is None or self._holding:
            return
        while not self._inbound.acquire(timeout=0.2):
            if self._closed:
                return
            self.last_seen = time.monotonic()  # alive, only held back by the master itself
        self._holding = True
        self._held_since, self._held_bytes = time.monotonic(), 0

    def _check_slot_rate(self, nbytes: int) -> None:
        """Refuse a stream that holds the inbound slot while sending too slowly."""
        self._held_bytes += nbytes
        held = time.monotonic() - self._held_since
        if held > SLOT_GRACE_S and self._held_bytes < MIN_SLOT_RATE * held:
            raise FrameError(
                f"a reply arriving at {self._held_bytes / held:,.0f} bytes/s held the master's "
                f"inbound slot for {held:.0f} s (at least {MIN_SLOT_RATE:,} bytes/s are needed)"
            )

    def _release(self) -> None:
        if self._holding and self._inbound is not None:
            self._holding = False
            self._inbound.release()

    def refuse(self, detail: str) -> None:
        log.warning("refusing the stream of %s: %s", self.label(), detail)
        self.close(spb.CLOSE_REASON_PROTOCOL_ERROR, detail)

    # -- inbound -----------------------------------------------------------------------------------

    def read(self, requests: Iterator[bytes]) -> None:
        """Reads the child's frames until the stream ends (run on a thread of its own)."""
        try:
            for data in requests:
                if self._closed:
                    break
                self.last_seen = time.monotonic()
                try:
                    self._frame(data)
                except FrameError as err:
                    self.refuse(str(err))
                    break
        except Exception as err:  # gRPC ends an aborted stream's iterator with an exception
            self.ended(f"stream broken ({type(err).__name__}: {err})")
            return
        finally:
            self._release()  # a stream that ends mid-message gives its slot back
        self.ended("the child closed its stream")

    def _frame(self, data: bytes) -> None:
        if len(data) > MAX_FRAME_BYTES:
            raise FrameError(
                f"a frame of {len(data):,} bytes, over the {MAX_FRAME_BYTES:,}-byte limit (cut "
                "messages into chunks of at most Hello.max_chunk_bytes)"
            )
        if self._holding:
            self._check_slot_rate(len(data))
        raw = parse_chunk_frame(data) if self.welcomed else None
        if raw is not None:  # the bulk of the traffic: its data goes straight to the buffer
            self.owner.count(0, len(data))
            reply_to = self._reader.tag
            message = self._reader.chunk(raw[2])
            if message is not None:
                self._release()
            self._done(message, reply_to)
            return
        try:
            frame = spb.ChildMessage.FromString(data)
        except DecodeError as err:
            raise FrameError(f"undecodable frame of {len(data)} bytes ({err})") from None
        kind = frame.WhichOneof("body")
        if not self.welcomed:
            if kind != "hello":
                raise FrameError(f"first frame must be a Hello, got {kind or 'an empty frame'}")
            self._hello(frame.hello)
            return
        if kind == "chunk":
            self.owner.count(0, len(data))
            reply_to = self._reader.tag
            message = self._reader.chunk(frame.chunk)
            if message is not None:
                self._release()
            self._done(message, reply_to)
            return
        if kind == "flower":
            self.owner.count(0, len(data))
            sent = self._sent_for(frame)
            expected = dict(sent.specs) if self.strict_arrays else None
            message = self._reader.flower(
                frame.flower, frame.reply_to, expected, reply_budget(sent.specs)
            )
            if message is None:  # its tensors follow: assemble them only with a slot
                self._admit()
            self._done(message, frame.reply_to)
            return
        self._reader.other(kind or "an empty")
        if kind == "heartbeat":
            self.busy = frame.heartbeat.busy
        elif kind == "close":
            detail = clip(frame.close.detail) or spb.CloseReason.Name(frame.close.reason)
            log.info("%s says goodbye: %s", self.label(), detail)
            self.close(spb.CLOSE_REASON_SHUTDOWN, f"goodbye from the child: {detail}")
        elif kind in _UNUSED:
            raise FrameError(
                f"unexpected {kind} frame from a child: protocol {PROTOCOL_VERSION} carries "
                f"{_UNUSED[kind]} (docs/wire-protocol.md)"
            )
        else:
            raise FrameError(f"unexpected {kind or 'empty'} frame from a child")

    def _sent_for(self, frame: spb.ChildMessage) -> Sent:
        """The message a reply answers (its ArrayRecords must hold the tensors it sent)."""
        with self._lock:
            sent = self._sent.get(frame.reply_to)
        if sent is None:
            raise FrameError(
                f"FlowerMessage replies to frame {frame.reply_to}, which is no message the master "
                "sent on this stream (or one already answered)"
            )
        return sent

    def _done(self, message: Message | None, reply_to: int) -> None:
        if message is None:
            return
        with self._lock:
            sent = self._sent.pop(reply_to, None)
        if sent is None:  # defensive: _expect checked it when the message began
            raise FrameError("reply to a message never sent on this stream")
        meta = message.metadata
        problems = []
        if meta.reply_to_message_id != sent.message_id:
            problems.append(
                f"reply_to_message_id {meta.reply_to_message_id!r}, expected {sent.message_id!r}"
            )
        if meta.src_node_id != self.node_id:
            problems.append(f"src_node_id {meta.src_node_id}, this child is node {self.node_id}")
        if meta.run_id != sent.run_id:
            problems.append(f"run_id {meta.run_id}, expected {sent.run_id}")
        if meta.dst_node_id != fc.SUPERLINK_NODE_ID:
            problems.append(f"dst_node_id {meta.dst_node_id}, expected {fc.SUPERLINK_NODE_ID}")
        if problems:
            raise FrameError("reply does not match its instruction: " + "; ".join(problems))
        self.owner.reply(self, message, sent)

    def _hello(self, hello: spb.Hello) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            detail = (
                f"protocol version {hello.protocol_version}, the master speaks {PROTOCOL_VERSION}"
            )
            log.warning("refusing %s: %s", self.peer, detail)
            self.close(spb.CLOSE_REASON_INCOMPATIBLE, detail)
            return
        missing = REQUIRED_CAPABILITIES - set(hello.capabilities)
        if missing:
            detail = f"child lacks required capabilities {sorted(missing)}"
            log.warning("refusing %s: %s", self.peer, detail)
            self.close(spb.CLOSE_REASON_INCOMPATIBLE, detail)
            return
        if not hello.name or len(hello.name) > 256 or not hello.name.isprintable():
            raise FrameError(
                f"invalid child name {hello.name[:80]!r}: 1 to 256 printable characters "
                "(with certificates: the certificate's name, [A-Za-z0-9._-], at most 64)"
            )
        if len(hello.agent) > MAX_AGENT_CHARS:
            raise FrameError(
                f"Hello.agent has {len(hello.agent)} characters, at most {MAX_AGENT_CHARS}"
            )
        self.name = hello.name
        refusal = self.owner.welcome(self, hello)
        if refusal is not None:
            log.warning("refusing %s: %s", self.label(), refusal.detail)
            self.close(refusal.reason, refusal.detail)
            return
        self.welcomed = True

    @staticmethod
    def shared_capabilities(hello: spb.Hello) -> list[str]:
        return [c for c in CAPABILITIES if c in set(hello.capabilities)]
