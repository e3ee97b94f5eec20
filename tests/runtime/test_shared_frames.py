"""Chunk frames shared between the master's streams: the same bytes for the same source and
place, never for another source, within a byte budget, and readable as chunk frames with id 0."""

from __future__ import annotations

import pytest

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.protocol.wire_chunks import RawChunk, parse_chunk_frame
from fedenc.runtime.grpc.shared_frames import SharedFrames


def chunk(source: bytes, offset: int = 0, size: int = 4, name: str = "w") -> RawChunk:
    view = memoryview(source)[offset : offset + size]
    return RawChunk(name, offset, view, offset + size == len(source), source=source)


def test_the_same_source_and_place_give_the_same_frame_object() -> None:
    frames = SharedFrames()
    data = bytes(range(16))
    first = frames.frame(chunk(data))
    assert frames.frame(chunk(data)) is first  # a second stream reuses it: no copy
    assert (frames.hits, frames.misses) == (1, 1)
    parsed = parse_chunk_frame(first)
    assert parsed is not None and parsed[:2] == (0, 0)  # no message id of its own
    assert bytes(parsed[2].data) == data[:4] and parsed[2].name == "w"
    assert spb.MasterMessage.FromString(first).chunk.data == data[:4]


def test_other_sources_places_and_names_get_their_own_frames() -> None:
    frames = SharedFrames()
    a, b = bytes(8), bytes(8)  # equal content, different objects
    assert a is not b or pytest.skip("the interpreter interned the bytes")
    base = frames.frame(chunk(a))
    assert frames.frame(chunk(b)) is not base
    assert frames.frame(chunk(a, offset=4)) is not base
    assert frames.frame(chunk(a, name="v")) is not base
    assert frames.hits == 0


def test_the_budget_bounds_what_is_kept() -> None:
    data = bytes(range(64))
    one = len(SharedFrames(0).frame(chunk(data, size=16)))
    frames = SharedFrames(budget_bytes=2 * one + 8)  # two frames (an offset field adds 2)
    for offset in (0, 16, 32):
        frames.frame(chunk(data, offset=offset, size=16))
    assert frames.cached_bytes <= 2 * one + 8
    frames.frame(chunk(data, offset=0, size=16))  # the oldest was dropped: made again
    assert frames.hits == 0 and frames.misses == 4
    frames.frame(chunk(data, offset=32, size=16))
    assert frames.hits == 1


def test_chunks_without_a_source_are_not_kept() -> None:
    frames = SharedFrames()
    plain = RawChunk("w", 0, memoryview(b"abcd"), True)
    assert frames.frame(plain) == frames.frame(plain)
    assert frames.cached_bytes == 0 and frames.hits == 0
