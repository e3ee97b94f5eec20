"""The hand-written chunk-frame codec agrees with the generated protobuf classes, both ways, and
its reader declines (None) whatever it does not fully understand."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol.wire_chunks import RawChunk, chunk_frame, parse_chunk_frame

FRAMES = [spb.MasterMessage, spb.ChildMessage]
U64 = st.integers(min_value=0, max_value=2**64 - 1)
CHUNKS = st.builds(
    RawChunk,
    name=st.text(max_size=40),
    offset=U64,
    data=st.binary(max_size=300).map(memoryview),
    last=st.booleans(),
)


def _fields(chunk: pb.TensorChunk | RawChunk) -> tuple[str, int, bytes, bool]:
    return chunk.name, chunk.offset, bytes(chunk.data), bool(chunk.last)


@pytest.mark.parametrize("frame_type", FRAMES)
@given(message_id=U64, chunk=CHUNKS)
@settings(max_examples=150, deadline=None)
def test_written_frames_parse_with_the_generated_class(
    frame_type: type, message_id: int, chunk: RawChunk
) -> None:
    data = chunk_frame(message_id, chunk)
    frame = frame_type.FromString(data)
    assert frame.WhichOneof("body") == "chunk"
    assert frame.message_id == message_id
    assert _fields(frame.chunk) == _fields(chunk)
    # the same bytes as protobuf's own encoding, up to field order: equal after a round trip
    assert frame_type.FromString(frame.SerializeToString()) == frame


@pytest.mark.parametrize("frame_type", FRAMES)
@given(message_id=U64, reply_to=U64, chunk=CHUNKS)
@settings(max_examples=150, deadline=None)
def test_generated_frames_parse_with_the_fast_reader(
    frame_type: type, message_id: int, reply_to: int, chunk: RawChunk
) -> None:
    frame = frame_type(message_id=message_id, reply_to=reply_to, chunk=chunk.to_proto())
    got = parse_chunk_frame(frame.SerializeToString())
    assert got is not None
    assert got[:2] == (message_id, reply_to)
    assert _fields(got[2]) == _fields(chunk)


def test_the_data_is_a_view_of_the_frame_not_a_copy() -> None:
    data = chunk_frame(7, RawChunk("w", 0, memoryview(b"x" * 1000), True))
    got = parse_chunk_frame(data)
    assert got is not None
    assert got[2].data.obj is data and bytes(got[2].data) == b"x" * 1000


@pytest.mark.parametrize(
    "frame",
    [
        spb.ChildMessage(hello=spb.Hello(name="a")),
        spb.MasterMessage(heartbeat=spb.Heartbeat()),
        spb.ChildMessage(message_id=3),
        spb.ChildMessage(),
    ],
)
def test_other_frames_are_left_to_the_generated_class(frame: object) -> None:
    assert parse_chunk_frame(frame.SerializeToString()) is None  # type: ignore[attr-defined]


GOOD = chunk_frame(5, RawChunk("layer.weight", 8, memoryview(bytes(range(64))), False))


@pytest.mark.parametrize(
    "data",
    [
        GOOD[:-1],  # truncated data
        GOOD[:3],  # truncated length
        GOOD + GOOD,  # every field twice
        GOOD + b"\x08\x01",  # message_id again
        GOOD + b"\xff",  # a dangling varint
        b"\x6a\x02\x98\x01",  # unknown field (19) in the chunk
        b"\x6a\x02\x0a\x01",  # the name's length runs past the chunk
        b"\x6a\x03\x0a\x01\xff",  # a name that is not UTF-8
        b"\x08" + b"\xff" * 10 + b"\x7f",  # a varint of more than 64 bits
        b"\x0d\x00\x00\x00\x00",  # message_id with the wrong wire type
    ],
)
def test_anything_unusual_is_declined(data: bytes) -> None:
    assert parse_chunk_frame(data) is None


@given(st.binary(max_size=80), st.integers(min_value=0, max_value=len(GOOD)))
@settings(max_examples=400, deadline=None)
def test_whatever_the_fast_reader_accepts_protobuf_reads_alike(noise: bytes, at: int) -> None:
    data = GOOD[:at] + noise + GOOD[at:]
    got = parse_chunk_frame(data)
    if got is None:
        return
    try:
        frame = spb.ChildMessage.FromString(data)
    except DecodeError:  # pragma: no cover - the property under test
        pytest.fail(f"fast reader accepted {data!r}, which protobuf refuses")
    assert frame.WhichOneof("body") == "chunk"
    assert (frame.message_id, frame.reply_to) == got[:2]
    assert _fields(frame.chunk) == _fields(got[2])
