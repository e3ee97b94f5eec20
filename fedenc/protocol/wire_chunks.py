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

from dataclasses import dataclass

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.proto.fedenc.v1 import tensor_pb2 as pb

_VARINT, _LEN = 0, 2


def _field_number(message: type, name: str) -> int:
    number: int = message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]
    return number


# Both stream directions lay the chunk frame out the same way; the hand-written codec relies on
# it, so a change in the .proto fails here, at import, rather than on the wire.
_ID = _field_number(spb.MasterMessage, "message_id")
_BODY = _field_number(spb.MasterMessage, "chunk")
if (_ID, _BODY) != (
    _field_number(spb.ChildMessage, "message_id"),
    _field_number(spb.ChildMessage, "chunk"),
):
    raise ImportError("MasterMessage and ChildMessage must number message_id and chunk alike")
_REPLY_TO = _field_number(spb.MasterMessage, "reply_to")
if _REPLY_TO != _field_number(spb.ChildMessage, "reply_to"):
    raise ImportError("MasterMessage and ChildMessage must number reply_to alike")
_NAME = _field_number(pb.TensorChunk, "name")
_OFFSET = _field_number(pb.TensorChunk, "offset")
_DATA = _field_number(pb.TensorChunk, "data")
_LAST = _field_number(pb.TensorChunk, "last")


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

    def to_proto(self) -> pb.TensorChunk:
        """The same chunk as a generated message (copies the data)."""
        data = bytes(self.data)
        return pb.TensorChunk(name=self.name, offset=self.offset, data=data, last=self.last)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


_ID_TAG = _tag(_ID, _VARINT)
_BODY_TAG = _tag(_BODY, _LEN)
_NAME_TAG = _tag(_NAME, _LEN)
_OFFSET_TAG = _tag(_OFFSET, _VARINT)
_DATA_TAG = _tag(_DATA, _LEN)
_LAST_TRUE = _tag(_LAST, _VARINT) + b"\x01"


def chunk_frame(message_id: int, chunk: RawChunk) -> bytes:
    """The serialized ``MasterMessage`` / ``ChildMessage`` ``{message_id, chunk}``: one copy of
    the data. Default values are left out, as protobuf does."""
    name = chunk.name.encode("utf-8")
    data = chunk.data if chunk.data.format == "B" else chunk.data.cast("B")
    body_head = bytearray()
    if name:
        body_head += _NAME_TAG + _varint(len(name)) + name
    if chunk.offset:
        body_head += _OFFSET_TAG + _varint(chunk.offset)
    if chunk.last:
        body_head += _LAST_TRUE
    if len(data):
        body_head += _DATA_TAG + _varint(len(data))
    head = bytearray()
    if message_id:
        head += _ID_TAG + _varint(message_id)
    head += _BODY_TAG + _varint(len(body_head) + len(data))
    return b"".join((head, body_head, data))


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, pos) if value < 1 << 64 else None
        shift += 7
    return None


def _scan(
    buf: memoryview, varints: tuple[int, ...], lengths: tuple[int, ...]
) -> tuple[dict[int, int], dict[int, memoryview]] | None:
    """The fields of the message in ``buf``: the values of the varint fields ``varints`` and
    the bytes (views) of the length-delimited fields ``lengths``; None for any other field, a
    field seen twice, or a truncated one."""
    values: dict[int, int] = {}
    views: dict[int, memoryview] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key = _read_varint(buf, pos, end)
        if key is None:
            return None
        tag, pos = key
        number, wire_type = tag >> 3, tag & 7
        if number in values or number in views:
            return None
        value = _read_varint(buf, pos, end)
        if value is None:
            return None
        if wire_type == _VARINT and number in varints:
            values[number], pos = value
        elif wire_type == _LEN and number in lengths and value[0] <= end - value[1]:
            start, pos = value[1], value[1] + value[0]
            views[number] = buf[start:pos]
        else:
            return None
    return values, views


def parse_chunk_frame(frame: bytes) -> tuple[int, int, RawChunk] | None:
    """``(message_id, reply_to, chunk)`` of a chunk frame, its data a view of ``frame``; None
    when ``frame`` is anything else or anything unusual (parse it with the generated class)."""
    outer = _scan(memoryview(frame), (_ID, _REPLY_TO), (_BODY,))
    if outer is None or _BODY not in outer[1]:
        return None
    body = outer[1][_BODY]
    inner = _scan(body, (_OFFSET, _LAST), (_NAME, _DATA))
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
