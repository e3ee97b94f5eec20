"""Parameter sets streamed as ``TensorChunk`` messages, and their reassembly.

A streamed parameter set is one ``ParameterSetHeader`` (every tensor's spec, compression and
encoded byte length, in order) followed by ``TensorChunk`` messages: tensor after tensor in header
order, each tensor's chunks by increasing offset, each chunk's data at most ``max_chunk_bytes``
(default 4 MiB - 64 KiB, so that a chunk plus its envelope stays below gRPC's default 4 MiB
message limit), ``last`` set on the chunk that ends a tensor. A tensor whose encoded data is empty
has exactly one chunk, empty and last.

:func:`stream_tensors` produces the stream lazily from torch tensors (memory: one chunk beyond the
tensors themselves, except with zlib, which must compress a tensor before its header is known).
:class:`ParameterSetAssembler` takes the chunks one by one into one buffer per tensor, allocated
at the tensor's first chunk (memory: one copy of the data; decoding wraps the buffers without
another copy) and validates the stream as it goes. By default it requires the order above; with
``ordered=False`` it accepts chunks in any order, still refusing overlaps and duplicates. Every
problem raises :class:`ChunkError` (a :class:`~fedenc.protocol.tensors.TensorDecodeError`)
naming the tensor, and the assembler then refuses any further chunk.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol.tensors import (
    ExpectedSpecs,
    TensorDecodeError,
    TensorEncodeError,
    check_expected,
    check_names,
    check_shape,
    decode_tensor,
    dtype_from_proto,
    encoded_size,
    tensor_spec,
    wire_view,
)
from fedenc.protocol.wire_chunks import RawChunk

__all__ = [
    "DEFAULT_MAX_CHUNK_BYTES",
    "GRPC_DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_NAME_BYTES",
    "MIN_CHUNK_BYTES",
    "ChunkError",
    "ParameterSetAssembler",
    "assemble",
    "stream_parameter_set",
    "stream_tensor_chunks",
    "stream_tensors",
]

#: gRPC's default limit on a received message, framing included.
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
#: Default bound on a chunk's data: 64 KiB of headroom for the chunk's other fields and envelope.
DEFAULT_MAX_CHUNK_BYTES = GRPC_DEFAULT_MAX_MESSAGE_BYTES - 64 * 1024
#: The smallest chunk a peer may ask for: smaller ones only multiply the frames (a 1-byte chunk
#: would make a 17 MB encoder 17 million frames of the sender's work).
MIN_CHUNK_BYTES = 64 * 1024
#: Longest tensor name (UTF-8) a sender accepts, which keeps a chunk's framing small.
MAX_NAME_BYTES = 1024

_KNOWN_COMPRESSIONS = frozenset(
    {pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE, pb.COMPRESSION_ZLIB, pb.COMPRESSION_FLOAT16}
)


class ChunkError(TensorDecodeError):
    """A streamed parameter set is malformed (header or chunks)."""


# --- sending ----------------------------------------------------------------------------------


def _check_max_chunk(max_chunk_bytes: int) -> None:
    if max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be >= 1 (got {max_chunk_bytes})")


def _check_name(name: str) -> None:
    if not name:
        raise TensorEncodeError("tensor name must not be empty")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise TensorEncodeError(f"tensor name longer than {MAX_NAME_BYTES} bytes: {name[:80]!r}...")


def _split(name: str, data: memoryview, max_chunk_bytes: int) -> Iterator[RawChunk]:
    size = len(data)
    if size == 0:
        yield RawChunk(name=name, offset=0, data=data, last=True)
        return
    for start in range(0, size, max_chunk_bytes):
        end = min(start + max_chunk_bytes, size)
        yield RawChunk(name=name, offset=start, data=data[start:end], last=end == size)


def _chunks(
    plan: list[tuple[str, int, Tensor | memoryview]], compression: int, max_chunk_bytes: int
) -> Iterator[RawChunk]:
    for name, size, source in plan:
        data = source if isinstance(source, memoryview) else wire_view(source, compression)
        if len(data) != size:  # a tensor modified while streaming
            raise TensorEncodeError(f"tensor {name!r}: {len(data)} bytes, header said {size}")
        yield from _split(name, data, max_chunk_bytes)
        del data


def stream_tensors(
    params: Mapping[str, Tensor],
    *,
    compression: int = pb.COMPRESSION_NONE,
    metadata: Mapping[str, str] | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    zlib_level: int = 1,
) -> tuple[pb.ParameterSetHeader, Iterator[pb.TensorChunk]]:
    """:func:`stream_tensor_chunks` with each chunk as a generated ``TensorChunk`` message."""
    header, chunks = stream_tensor_chunks(
        params,
        compression=compression,
        metadata=metadata,
        max_chunk_bytes=max_chunk_bytes,
        zlib_level=zlib_level,
    )
    return header, (chunk.to_proto() for chunk in chunks)


def stream_tensor_chunks(
    params: Mapping[str, Tensor],
    *,
    compression: int = pb.COMPRESSION_NONE,
    metadata: Mapping[str, str] | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    zlib_level: int = 1,
) -> tuple[pb.ParameterSetHeader, Iterator[RawChunk]]:
    """The header and (lazily) the chunks of named tensors, in mapping order, each chunk's data a
    view of the tensor's bytes (:func:`fedenc.protocol.wire_chunks.chunk_frame` puts it on the
    wire with one copy).

    The tensors must stay unchanged until the chunks are consumed. Without zlib, each tensor is
    encoded when its first chunk is due (float16 overflow then raises ``TensorEncodeError`` from
    the iterator); with zlib every tensor is compressed here, to know its length.
    """
    _check_max_chunk(max_chunk_bytes)
    if compression not in _KNOWN_COMPRESSIONS:
        raise TensorEncodeError(f"unknown compression {compression}")
    headers: list[pb.TensorHeader] = []
    plan: list[tuple[str, int, Tensor | memoryview]] = []  # memoryview: already encoded
    for name, t in params.items():
        _check_name(name)
        size = encoded_size(t.dtype, t.shape, compression)
        if size is None:
            data = wire_view(t, compression, zlib_level=zlib_level)
            size = len(data)
            plan.append((name, size, data))
        else:
            plan.append((name, size, t))
        headers.append(
            pb.TensorHeader(
                spec=tensor_spec(name, t),
                compression=pb.Compression.ValueType(compression),
                byte_length=size,
            )
        )
    header = pb.ParameterSetHeader(tensors=headers, metadata=dict(metadata or {}))
    return header, _chunks(plan, compression, max_chunk_bytes)


def stream_parameter_set(
    ps: pb.ParameterSet, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> tuple[pb.ParameterSetHeader, Iterator[pb.TensorChunk]]:
    """Splits an inline :class:`ParameterSet` (already encoded) into a header and chunks."""
    _check_max_chunk(max_chunk_bytes)
    headers = []
    for t in ps.tensors:
        _check_name(t.spec.name)
        headers.append(
            pb.TensorHeader(spec=t.spec, compression=t.compression, byte_length=len(t.data))
        )
    header = pb.ParameterSetHeader(tensors=headers, metadata=dict(ps.metadata))

    def chunks() -> Iterator[pb.TensorChunk]:
        for t in ps.tensors:
            for chunk in _split(t.spec.name, memoryview(t.data), max_chunk_bytes):
                yield chunk.to_proto()

    return header, chunks()


# --- receiving --------------------------------------------------------------------------------


@dataclass
class _Slot:
    """One tensor being received."""

    header: pb.TensorHeader
    expected: tuple[tuple[int, ...], torch.dtype] | None
    byte_length: int
    buffer: bytearray | None = None
    received: int = 0
    prefix: bytes = b""  # written before the data in the same buffer (see ``prefix`` below)
    # Unordered mode: received byte ranges, disjoint, sorted, adjacent ones merged.
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.header.spec.name

    complete: bool = False  # every byte received (stays true once the buffer is handed over)


class ParameterSetAssembler:
    """Reassembles a streamed parameter set from its header and chunks, validating both.

    ``expected`` (names -> (shape, dtype)) is checked against the header before any data
    arrives. ``max_total_bytes`` bounds the sum of the declared byte lengths (the memory the
    assembler may allocate). ``max_chunk_bytes`` bounds each chunk's data. ``ordered`` requires the
    sender's order (see the module docstring); ``ordered=False`` accepts any order.

    ``prefix`` may give, per tensor header, bytes to put in front of that tensor's data in the
    same buffer (e.g. a ``.npy`` header, so the received buffer can become a Flower ``Array``
    without another copy); :meth:`finish` then keeps those whole buffers in :attr:`buffers`.
    """

    def __init__(
        self,
        header: pb.ParameterSetHeader,
        *,
        expected: ExpectedSpecs | None = None,
        ordered: bool = True,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_total_bytes: int | None = None,
        check_finite: bool = False,
        prefix: Callable[[pb.TensorHeader], bytes | None] | None = None,
    ) -> None:
        _check_max_chunk(max_chunk_bytes)
        self.metadata: dict[str, str] = dict(header.metadata)
        self.ordered = ordered
        self.max_chunk_bytes = max_chunk_bytes
        self.check_finite = check_finite
        self._failed: ChunkError | None = None
        self._finished = False
        self._cursor = 0
        self._slots: list[_Slot] = []
        headers = list(header.tensors)
        try:
            check_names([h.spec.name for h in headers], expected, what="streamed parameter set")
        except TensorDecodeError as err:
            raise ChunkError(err.tensor, err.reason) from None
        for h in headers:
            slot = self._check_header(h, expected)
            if prefix is not None:
                slot.prefix = prefix(h) or b""
            self._slots.append(slot)
        #: Whole buffers (prefix + data) of the prefixed tensors, filled by :meth:`finish`.
        self.buffers: dict[str, bytearray] = {}
        self._by_name = {s.name: s for s in self._slots}
        self.total_bytes = sum(s.byte_length for s in self._slots)
        if max_total_bytes is not None and self.total_bytes > max_total_bytes:
            raise ChunkError(
                None, f"header declares {self.total_bytes} bytes, more than {max_total_bytes}"
            )
        self.received_bytes = 0

    @staticmethod
    def _check_header(h: pb.TensorHeader, expected: ExpectedSpecs | None) -> _Slot:
        name = h.spec.name
        try:
            dtype = dtype_from_proto(h.spec.dtype, name)
            shape = check_shape(name, h.spec.shape)
            want = None if expected is None else expected[name]
            check_expected(name, dtype, shape, want)
        except TensorDecodeError as err:
            raise ChunkError(name, err.reason) from None
        if h.compression not in _KNOWN_COMPRESSIONS:
            raise ChunkError(name, f"unknown compression {h.compression}")
        exact = encoded_size(dtype, shape, h.compression)
        if exact is not None and h.byte_length != exact:
            raise ChunkError(
                name,
                f"header declares {h.byte_length} bytes, expected {exact} for "
                f"{pb.Compression.Name(h.compression)} shape {list(shape)}",
            )
        if exact is None:  # zlib: never more than the raw size plus zlib's worst-case expansion
            raw = dtype.itemsize * math.prod(shape)
            bound = raw + raw // 1000 + 1024
            if h.byte_length > bound:
                raise ChunkError(name, f"header declares {h.byte_length} zlib bytes for {raw} raw")
        fixed = None if want is None else (tuple(want[0]), want[1])
        return _Slot(header=h, expected=fixed, byte_length=h.byte_length)

    # -- state --

    @property
    def complete(self) -> bool:
        """True once every byte of every tensor has arrived."""
        return all(s.complete for s in self._slots)

    @property
    def names(self) -> list[str]:
        """Tensor names in header order."""
        return [s.name for s in self._slots]

    # -- feeding --

    def add(self, chunk: pb.TensorChunk | RawChunk) -> None:
        """Takes one chunk; :class:`ChunkError` when it does not fit the stream."""
        if self._failed is not None:
            raise ChunkError(self._failed.tensor, f"stream already refused ({self._failed.reason})")
        if self._finished:
            raise ChunkError(chunk.name, "chunk after the parameter set was finished")
        try:
            self._add(chunk)
        except ChunkError as err:
            self._fail(err)
            raise

    def add_all(self, chunks: Iterable[pb.TensorChunk | RawChunk]) -> None:
        """Takes every chunk of an iterable."""
        for chunk in chunks:
            self.add(chunk)

    def _fail(self, err: ChunkError) -> None:
        self._failed = err
        for s in self._slots:
            s.buffer = None  # release memory at once

    def _add(self, chunk: pb.TensorChunk | RawChunk) -> None:
        name = chunk.name
        data = chunk.data  # protobuf copies on every access: read once
        offset, size = chunk.offset, len(data)
        slot = self._by_name.get(name)
        if slot is None:
            raise ChunkError(name, "chunk of a tensor that is not in the header")
        if size > self.max_chunk_bytes:
            raise ChunkError(
                name, f"chunk of {size} bytes exceeds the limit of {self.max_chunk_bytes}"
            )
        end = offset + size
        if slot.complete:
            raise ChunkError(name, f"chunk at offset {offset} after the tensor was complete")
        if end > slot.byte_length:
            raise ChunkError(
                name,
                f"chunk [{offset}, {end}) past the end of the tensor ({slot.byte_length} bytes)",
            )
        if size == 0 and slot.byte_length != 0:
            raise ChunkError(name, f"empty chunk at offset {offset}")
        if chunk.last != (end == slot.byte_length):
            raise ChunkError(
                name,
                f"chunk [{offset}, {end}) has last={chunk.last} but the tensor has "
                f"{slot.byte_length} bytes",
            )
        if self.ordered:
            self._check_order(slot, offset)
        else:
            self._claim(slot, offset, end)
        skip = len(slot.prefix)
        if slot.buffer is None:
            slot.buffer = bytearray(skip + slot.byte_length)
            slot.buffer[:skip] = slot.prefix
        slot.buffer[skip + offset : skip + end] = data
        slot.received += size
        slot.complete = slot.received == slot.byte_length
        self.received_bytes += size
        if self.ordered and slot.complete:
            self._cursor += 1

    def _check_order(self, slot: _Slot, offset: int) -> None:
        current = self._slots[self._cursor] if self._cursor < len(self._slots) else None
        if slot is not current:
            want = "no more chunks" if current is None else f"{current.name!r}"
            raise ChunkError(
                slot.name, f"out of order: chunk at offset {offset}, expected a chunk of {want}"
            )
        if offset < slot.received:
            raise ChunkError(
                slot.name,
                f"chunk at offset {offset} overlaps bytes already received (up to {slot.received})",
            )
        if offset > slot.received:
            raise ChunkError(
                slot.name,
                f"chunk at offset {offset} leaves bytes [{slot.received}, {offset}) missing",
            )

    @staticmethod
    def _claim(slot: _Slot, start: int, end: int) -> None:
        """Records [start, end) as received; refuses any overlap (duplicates included)."""
        i = bisect.bisect_right(slot.starts, start)
        overlaps_prev = i > 0 and slot.ends[i - 1] > start
        overlaps_next = i < len(slot.starts) and slot.starts[i] < end
        if overlaps_prev or overlaps_next:
            j = i - 1 if overlaps_prev else i
            kind = (
                "duplicate"
                if 0 <= j < len(slot.starts) and (slot.starts[j], slot.ends[j]) == (start, end)
                else "overlapping"
            )
            raise ChunkError(slot.name, f"{kind} chunk [{start}, {end})")
        slot.starts.insert(i, start)
        slot.ends.insert(i, end)
        # Merge with the neighbours it touches, so that the lists stay short.
        if i + 1 < len(slot.starts) and slot.starts[i + 1] == end:
            slot.ends[i] = slot.ends.pop(i + 1)
            del slot.starts[i + 1]
        if i > 0 and slot.ends[i - 1] == start:
            slot.ends[i - 1] = slot.ends.pop(i)
            del slot.starts[i]

    # -- result --

    def finish(self) -> dict[str, Tensor]:
        """The decoded tensors in header order; :class:`ChunkError` when bytes are missing.

        The buffers become the tensors' memory (no copy, except for compressed tensors).
        """
        if self._failed is not None:
            raise ChunkError(self._failed.tensor, f"stream already refused ({self._failed.reason})")
        if self._finished:
            raise ChunkError(None, "finish() called twice")
        missing = [s for s in self._slots if not s.complete]
        if missing:
            detail = ", ".join(f"{s.name!r} {s.received}/{s.byte_length} bytes" for s in missing)
            err = ChunkError(missing[0].name, f"stream ended incomplete: {detail}")
            self._fail(err)
            raise err
        out: dict[str, Tensor] = {}
        try:
            for s in self._slots:
                buf, s.buffer = s.buffer, None
                assert buf is not None  # complete slots got at least one chunk
                out[s.name] = decode_tensor(
                    s.header.spec,
                    memoryview(buf)[len(s.prefix) :] if s.prefix else buf,
                    s.header.compression,
                    expected=s.expected,
                    check_finite=self.check_finite,
                )
                if s.prefix:
                    self.buffers[s.name] = buf
                del buf
        except TensorDecodeError as err:
            chunk_err = ChunkError(err.tensor, err.reason)
            self._fail(chunk_err)
            raise chunk_err from None
        self._finished = True
        return out


def assemble(
    header: pb.ParameterSetHeader,
    chunks: Iterable[pb.TensorChunk],
    *,
    expected: ExpectedSpecs | None = None,
    ordered: bool = True,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    max_total_bytes: int | None = None,
    check_finite: bool = False,
) -> dict[str, Tensor]:
    """Reassembles a whole stream at once (options as for :class:`ParameterSetAssembler`)."""
    assembler = ParameterSetAssembler(
        header,
        expected=expected,
        ordered=ordered,
        max_chunk_bytes=max_chunk_bytes,
        max_total_bytes=max_total_bytes,
        check_finite=check_finite,
    )
    assembler.add_all(chunks)
    return assembler.finish()
