"""Flower ``Message`` <-> Federation stream frames (``FlowerMessage`` + ``TensorChunk``).

A Flower Message travels as one ``FlowerMessage`` frame, Flower's own serialized message with
every ArrayRecord left empty, followed by the tensors of those ArrayRecords as ``TensorChunk``
frames (:mod:`fedenc.protocol.chunking`: raw little-endian bytes, at most ~4 MiB a frame), so
a parameter set of any size crosses the stream without gRPC's 4 MiB or protobuf's 2 GiB limit.

Sending is lazy (:func:`encode_message`): the header is built at once, the chunks are cut from
the Arrays' bytes only when the stream pulls them, without copying a whole tensor (an Array of
NumPy type is Flower's ``np.save`` bytes; the tensor is a view on the part after its header).

Receiving writes each uncompressed tensor's chunks behind the ``.npy`` header ``np.save``
would write, in one buffer that then becomes the Flower Array's data as it is (no copy between
the wire's chunks and the Array; :func:`fedenc.protocol.flower_arrays.array_over`).

Receiving (:class:`FrameReader`) validates everything the peer controls and raises
:class:`FrameError` naming the problem: undecodable bytes, a Flower message that does not
parse, an ArrayRecord sent inline or announced twice, chunks out of order, missing, oversized or
of a tensor not in the header, dtypes, shapes and byte lengths that disagree, and, when the
caller gives the tensors it expects (a reply must mirror the instruction's arrays), other names,
shapes or dtypes. The reader refuses any other frame while a message's chunks are due.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import chain

import torch
from flwr.app import ArrayRecord, Message

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.proto.fedenc.v1 import tensor_pb2 as tpb
from fedenc.protocol.chunking import (
    DEFAULT_MAX_CHUNK_BYTES,
    ChunkError,
    ParameterSetAssembler,
    stream_tensor_chunks,
)
from fedenc.protocol.flower_arrays import array_over, array_to_tensor, npy_header, tensor_to_array
from fedenc.protocol.tensors import (
    ExpectedSpecs,
    TensorDecodeError,
    TensorEncodeError,
    dtype_from_proto,
)
from fedenc.protocol.wire_chunks import RawChunk
from fedenc.runtime import flower_compat as fc

__all__ = [
    "ArraySpecs",
    "EncodedMessage",
    "FrameError",
    "FrameReader",
    "MessageAssembler",
    "array_to_tensor",
    "encode_message",
    "tensor_to_array",
]

#: Expected tensors per ArrayRecord key: {record key: {array key: (shape, dtype)}}.
ArraySpecs = dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]


class FrameError(ValueError):
    """A frame (or a sequence of frames) from the peer is invalid; the text says why."""


# -- sending ---------------------------------------------------------------------------------------


@dataclass
class EncodedMessage:
    """A Flower Message ready for the wire: the ``FlowerMessage`` frame, then ``chunks``."""

    frame: spb.FlowerMessage
    chunks: Iterator[RawChunk]
    #: The tensors of each ArrayRecord (names, shapes, dtypes): what a reply must mirror.
    specs: ArraySpecs = field(default_factory=dict)
    #: Bytes of tensor data that the chunks will carry.
    array_bytes: int = 0


def encode_message(
    message: Message, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> EncodedMessage:
    """``message`` as a ``FlowerMessage`` frame and its (lazy) chunks.

    :class:`~fedenc.protocol.tensors.TensorEncodeError` when an array has a dtype the wire does
    not carry. The Arrays must stay unchanged until the chunks are consumed (Flower's Arrays hold
    immutable ``bytes``, so replacing a record afterwards is harmless).
    """
    skeleton, records = fc.message_without_arrays(message)
    headers: list[spb.ArrayRecordHeader] = []
    streams: list[Iterator[RawChunk]] = []
    specs: ArraySpecs = {}
    total = 0
    for key, record in records:
        tensors: dict[str, torch.Tensor] = {}
        for name, array in record.items():
            try:
                tensors[name] = array_to_tensor(array)
            except (ValueError, TypeError) as err:
                raise TensorEncodeError(f"array {key}/{name}: {err}") from None
        try:
            header, chunks = stream_tensor_chunks(tensors, max_chunk_bytes=max_chunk_bytes)
        except TensorEncodeError as err:
            raise TensorEncodeError(f"ArrayRecord {key!r}: {err}") from None
        headers.append(spb.ArrayRecordHeader(key=key, tensors=header))
        # Each chunk names the Array bytes it came from, so streams sending the same Array can
        # share its serialized frames.
        streams.append(_with_sources(chunks, {name: a.data for name, a in record.items()}))
        specs[key] = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        total += sum(h.byte_length for h in header.tensors)
    frame = spb.FlowerMessage(message=skeleton, array_records=headers)
    return EncodedMessage(frame=frame, chunks=chain(*streams), specs=specs, array_bytes=total)


def _with_sources(chunks: Iterator[RawChunk], sources: Mapping[str, object]) -> Iterator[RawChunk]:
    for chunk in chunks:
        yield replace(chunk, source=sources[chunk.name])


# -- receiving -------------------------------------------------------------------------------------


def _skeleton(data: bytes) -> Message:
    try:
        return fc.message_from_bytes(data)
    except Exception as err:  # any parse failure of peer bytes is the peer's fault
        raise FrameError(f"undecodable Flower message ({type(err).__name__}: {err})") from None


def _npy_prefix(header: tpb.TensorHeader) -> bytes | None:
    """The ``.npy`` header to receive an uncompressed tensor behind, so that its buffer becomes
    the Flower Array's data as it is (None: the tensor is converted with a copy instead)."""
    if header.compression != tpb.COMPRESSION_NONE or sys.byteorder != "little":
        return None
    try:
        dtype = torch.empty(0, dtype=dtype_from_proto(header.spec.dtype)).numpy().dtype
    except (TypeError, TensorDecodeError):  # e.g. bfloat16 has no NumPy dtype
        return None
    return npy_header(dtype, tuple(int(d) for d in header.spec.shape))


class MessageAssembler:
    """Rebuilds one Flower Message from its ``FlowerMessage`` frame and the chunks that follow.

    ``expected`` gives, per ArrayRecord key, the tensors that record must hold (others are not
    checked); ``max_array_bytes`` bounds the tensor bytes a message may announce (memory).
    """

    def __init__(
        self,
        frame: spb.FlowerMessage,
        *,
        expected: Mapping[str, ExpectedSpecs] | None = None,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_array_bytes: int | None = None,
    ) -> None:
        self.message = _skeleton(frame.message)
        empty: set[str] = set()
        if self.message.has_content():
            for key, record in self.message.content.items():
                if not isinstance(record, ArrayRecord):
                    continue
                if len(record):  # inline arrays would dodge the chunk limits and checks
                    raise FrameError(f"ArrayRecord {key!r} carries inline arrays; stream them")
                empty.add(key)
        self._parts: list[tuple[str, ParameterSetAssembler]] = []
        budget = max_array_bytes
        for h in frame.array_records:
            if h.key not in empty:
                raise FrameError(f"array record {h.key!r} is no empty ArrayRecord of the message")
            if any(k == h.key for k, _ in self._parts):
                raise FrameError(f"array record {h.key!r} announced twice")
            want = None if expected is None else expected.get(h.key)
            try:
                part = ParameterSetAssembler(
                    h.tensors,
                    expected=want,
                    max_chunk_bytes=max_chunk_bytes,
                    max_total_bytes=budget,
                    prefix=_npy_prefix,
                )
            except ChunkError as err:
                raise FrameError(f"array record {h.key!r}: {err}") from None
            if budget is not None:
                budget -= part.total_bytes
            self._parts.append((h.key, part))
        missing = empty - {k for k, _ in self._parts}
        if missing:
            raise FrameError(f"ArrayRecord(s) {sorted(missing)} announced without a header")
        self._cursor = 0
        self._skip_complete()

    def _skip_complete(self) -> None:
        while self._cursor < len(self._parts) and self._parts[self._cursor][1].complete:
            self._cursor += 1

    @property
    def complete(self) -> bool:
        """True once every tensor byte has arrived."""
        return self._cursor >= len(self._parts)

    def add(self, chunk: tpb.TensorChunk | RawChunk) -> None:
        """Takes the next chunk; :class:`FrameError` when it does not fit."""
        if self.complete:
            raise FrameError(f"chunk of {chunk.name!r} after the message was complete")
        key, part = self._parts[self._cursor]
        try:
            part.add(chunk)
        except ChunkError as err:
            raise FrameError(f"array record {key!r}: {err}") from None
        self._skip_complete()

    def finish(self) -> Message:
        """The Flower Message, its ArrayRecords filled in (content order kept)."""
        if not self.complete:
            key, part = self._parts[self._cursor]
            raise FrameError(
                f"array record {key!r} incomplete: {part.received_bytes}/{part.total_bytes} bytes"
            )
        for key, part in self._parts:
            try:
                tensors = part.finish()
                # Item by item: ArrayRecord(dict) rebuilds each Array and insists on bytes.
                record = ArrayRecord()
                for name, t in tensors.items():
                    buf = part.buffers.get(name)
                    record[name] = (
                        array_over(buf, t.numpy().dtype, tuple(t.shape))
                        if buf is not None
                        else tensor_to_array(t)
                    )
            except (TensorDecodeError, TypeError, RuntimeError) as err:
                raise FrameError(f"array record {key!r}: {err}") from None
            self.message.content[key] = record
        return self.message


class FrameReader:
    """One stream's inbound state: the message whose chunks are due, if any.

    :meth:`flower` takes a ``FlowerMessage`` frame and :meth:`chunk` a ``TensorChunk`` frame;
    each returns the finished Flower Message once its last chunk is in (``None`` before).
    :meth:`other` must be called for any other frame, which is refused while chunks are due.
    ``tag`` (the caller's, e.g. the frame id a reply answers) is kept with the pending message.
    """

    def __init__(
        self,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_array_bytes: int | None = None,
    ) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.max_array_bytes = max_array_bytes
        self._pending: MessageAssembler | None = None
        self.tag = 0  # the caller's tag of the message being assembled (its wire id)

    @property
    def busy(self) -> bool:
        return self._pending is not None

    def flower(
        self,
        frame: spb.FlowerMessage,
        tag: int = 0,
        expected: Mapping[str, ExpectedSpecs] | None = None,
        max_array_bytes: int | None = None,
    ) -> Message | None:
        """``max_array_bytes``: this message's bound, on top of the reader's own."""
        self.other("a FlowerMessage")
        bounds = [b for b in (self.max_array_bytes, max_array_bytes) if b is not None]
        assembler = MessageAssembler(
            frame,
            expected=expected,
            max_chunk_bytes=self.max_chunk_bytes,
            max_array_bytes=min(bounds) if bounds else None,
        )
        if assembler.complete:
            return assembler.finish()
        self._pending, self.tag = assembler, tag
        return None

    def chunk(self, chunk: tpb.TensorChunk | RawChunk) -> Message | None:
        if self._pending is None:
            raise FrameError(f"chunk of {chunk.name!r} without a FlowerMessage announcing it")
        self._pending.add(chunk)
        if not self._pending.complete:
            return None
        pending, self._pending = self._pending, None
        return pending.finish()

    def other(self, what: str) -> None:
        """Refuses ``what`` (a frame kind) while a message's chunks are due."""
        if self._pending is not None:
            raise FrameError(f"{what} frame while the chunks of a message were due")
