"""Tensor chunks on the wire without protobuf message objects in between.

A chunk frame of the federation stream is ``MasterMessage`` / ``ChildMessage`` with a
``message_id`` and a ``TensorChunk`` body (name, offset, data, last). Built and read through the
generated classes, each 4 MiB of tensor data is copied four times on the way out (the slice into a
``bytes``, the body into the frame, ``SerializeToString``, then gRPC) and three times on the way in
(gRPC, ``FromString``, reading ``chunk.data``). This module writes and reads exactly those frames in
the protobuf wire format itself, so the data is copied once by Python on each side: into the
outgoing frame, and from the incoming frame into the receiving buffer.

Writing emits a valid encoding of the same message (fields in the order
message_id, body{name, offset, last, data}), which any protobuf parser reads. Reading is a fast
path only: anything but a well-formed chunk frame with the fields above, each at most once, gives
``None`` and the caller parses the frame with the generated class, whose errors are the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol.wire_format import VARINT, field_number, len_prefix, scan, tag, varint

# Both stream directions lay the chunk frame out the same way; the hand-written codec relies on
# it, so a change in the .proto fails here, at import, rather than on the wire.
_ID = field_number(spb.MasterMessage, "message_id")
_BODY = field_number(spb.MasterMessage, "chunk")
_REPLY_TO = field_number(spb.MasterMessage, "reply_to")
if (_ID, _BODY, _REPLY_TO) != (
    field_number(spb.ChildMessage, "message_id"),
    field_number(spb.ChildMessage, "chunk"),
    field_number(spb.ChildMessage, "reply_to"),
):
    raise ImportError("MasterMessage and ChildMessage must number their chunk frames alike")
_NAME = field_number(pb.TensorChunk, "name")
_OFFSET = field_number(pb.TensorChunk, "offset")
_DATA = field_number(pb.TensorChunk, "data")
_LAST = field_number(pb.TensorChunk, "last")


@dataclass(frozen=True, slots=True)
class RawChunk:
    """One ``TensorChunk`` whose data is a view (no copy) of the sender's or the frame's bytes.

    It has the attributes of ``TensorChunk`` that the assembler reads, so either can be added.
    The view keeps its buffer alive; the buffer must not change until the chunk is consumed.
    """

    name: str
    offset: int
    data: memoryview
    last: bool
    #: What the data was cut from (e.g. a Flower Array's bytes), when frames may be shared
    #: between streams (:mod:`fedenc.runtime.grpc.shared_frames`); not part of the chunk.
    source: object = field(default=None, compare=False)

    def to_proto(self) -> pb.TensorChunk:
        """The same chunk as a generated message (copies the data)."""
        data = bytes(self.data)
        return pb.TensorChunk(name=self.name, offset=self.offset, data=data, last=self.last)


_ID_TAG = tag(_ID, VARINT)
_OFFSET_TAG = tag(_OFFSET, VARINT)
_LAST_TRUE = tag(_LAST, VARINT) + b"\x01"


def chunk_frame(message_id: int, chunk: RawChunk) -> bytes:
    """The serialized ``MasterMessage`` / ``ChildMessage`` ``{message_id, chunk}``: one copy of
    the data. Default values are left out, as protobuf does."""
    name = chunk.name.encode("utf-8")
    data = chunk.data if chunk.data.format == "B" else chunk.data.cast("B")
    body_head = bytearray()
    if name:
        body_head += len_prefix(_NAME, len(name)) + name
    if chunk.offset:
        body_head += _OFFSET_TAG + varint(chunk.offset)
    if chunk.last:
        body_head += _LAST_TRUE
    if len(data):
        body_head += len_prefix(_DATA, len(data))
    head = bytearray()
    if message_id:
        head += _ID_TAG + varint(message_id)
    head += len_prefix(_BODY, len(body_head) + len(data))
    return b"".join((head, body_head, data))


def parse_chunk_frame(frame: bytes) -> tuple[int, int, RawChunk] | None:
    """``(message_id, reply_to, chunk)`` of a chunk frame, its data a view of ``frame``; None
    when ``frame`` is anything else or anything unusual (parse it with the generated class)."""
    outer = scan(memoryview(frame), (_ID, _REPLY_TO), (_BODY,))
    if outer is None or _BODY not in outer[1]:
        return None
    body = outer[1][_BODY]
    inner = scan(body, (_OFFSET, _LAST), (_NAME, _DATA))
    if inner is None:
        return None
    values, views = inner
    try:
        name = bytes(views.get(_NAME, b"")).decode("utf-8")
    except UnicodeDecodeError:
        return None
    data = views.get(_DATA, body[0:0])
    chunk = RawChunk(name, values.get(_OFFSET, 0), data, bool(values.get(_LAST, 0)))
    return outer[0].get(_ID, 0), outer[0].get(_REPLY_TO, 0), chunk
