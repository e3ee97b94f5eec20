"""Streamed parameter sets: chunk sizes, reassembly, and every malformed-stream refusal."""

from __future__ import annotations

import random

import pytest
import torch

from fedenc.proto.fedenc.v1 import federation_service_pb2 as svc
from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol.chunking import (
    DEFAULT_MAX_CHUNK_BYTES,
    GRPC_DEFAULT_MAX_MESSAGE_BYTES,
    ChunkError,
    ParameterSetAssembler,
    assemble,
    stream_parameter_set,
    stream_tensors,
)
from fedenc.protocol.tensors import TensorDecodeError, expected_specs, parameters_to_proto

PARAMS = {
    "gnn.w": torch.arange(30, dtype=torch.float32).reshape(5, 6),
    "gnn.b": torch.arange(7, dtype=torch.int64),
    "empty": torch.zeros(0, 3),
    "flag": torch.tensor(True),
}


def _stream(
    max_chunk_bytes: int = 16, **kw: object
) -> tuple[pb.ParameterSetHeader, list[pb.TensorChunk]]:
    header, chunks = stream_tensors(PARAMS, max_chunk_bytes=max_chunk_bytes, **kw)  # type: ignore[arg-type]
    return header, list(chunks)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_in_order() -> None:
    header, chunks = _stream(metadata={"round": "3"})
    assert [h.spec.name for h in header.tensors] == list(PARAMS)
    assert header.metadata["round"] == "3"
    assembler = ParameterSetAssembler(header, expected=expected_specs(PARAMS))
    for c in chunks:
        assert not assembler.complete
        assembler.add(c)
    assert assembler.complete
    assert assembler.received_bytes == assembler.total_bytes == 120 + 56 + 0 + 1
    assert _equal(assembler.finish(), PARAMS)
    assert assembler.complete


def test_chunk_layout() -> None:
    _, chunks = _stream(max_chunk_bytes=16)
    w = [c for c in chunks if c.name == "gnn.w"]
    assert [c.offset for c in w] == list(range(0, 120, 16))
    assert [c.last for c in w] == [False] * 7 + [True]
    empty = [c for c in chunks if c.name == "empty"]
    assert len(empty) == 1 and empty[0].last and empty[0].data == b""
    assert all(len(c.data) <= 16 for c in chunks)


def test_default_chunks_fit_grpc_limit_with_envelope() -> None:
    big = {"e" * 1024: torch.zeros(DEFAULT_MAX_CHUNK_BYTES // 4 + 1000)}  # > 1 chunk, long name
    header, chunks = stream_tensors(big)
    sizes = []
    for i, c in enumerate(chunks):
        assert len(c.data) <= DEFAULT_MAX_CHUNK_BYTES
        envelope = svc.ChildMessage(message_id=2**64 - 1, reply_to=2**64 - 1, chunk=c)
        sizes.append(envelope.ByteSize())
        assert envelope.ByteSize() < GRPC_DEFAULT_MAX_MESSAGE_BYTES, i
    assert len(sizes) == 2
    assert header.tensors[0].byte_length == DEFAULT_MAX_CHUNK_BYTES + 4000


@pytest.mark.parametrize("limit", [1, 3, 7, 64, 10_000])
def test_chunk_sizes_never_exceed_limit(limit: int) -> None:
    header, chunks = _stream(max_chunk_bytes=limit)
    assert all(len(c.data) <= limit for c in chunks)
    assert _equal(assemble(header, chunks, max_chunk_bytes=limit), PARAMS)


@pytest.mark.parametrize("compression", [pb.COMPRESSION_ZLIB, pb.COMPRESSION_FLOAT16])
def test_compressed_streams(compression: int) -> None:
    params = {"a": torch.zeros(100), "b": torch.ones(3, 3, dtype=torch.float64)}
    header, chunks = stream_tensors(params, compression=compression, max_chunk_bytes=32)
    out = assemble(header, chunks, expected=expected_specs(params))
    assert _equal(out, params)


def test_parameter_set_splits_like_tensors() -> None:
    ps = parameters_to_proto(PARAMS, metadata={"k": "v"})
    header, chunks = stream_parameter_set(ps, max_chunk_bytes=16)
    direct_header, direct_chunks = _stream(max_chunk_bytes=16)
    assert header.tensors == direct_header.tensors
    assert list(chunks) == direct_chunks
    assert header.metadata["k"] == "v"


def test_shuffled_chunks_refused_in_order_mode_accepted_otherwise() -> None:
    header, chunks = _stream(max_chunk_bytes=8)
    shuffled = chunks[:]
    random.Random(1).shuffle(shuffled)
    assert shuffled != chunks
    with pytest.raises(ChunkError, match=r"out of order|missing"):
        assemble(header, shuffled)
    assert _equal(assemble(header, shuffled, ordered=False), PARAMS)


def test_finished_result_owns_writable_memory() -> None:
    header, chunks = _stream()
    out = assemble(header, chunks)
    out["gnn.w"] += 1
    assert torch.equal(out["gnn.w"], PARAMS["gnn.w"] + 1)


# --- refusals ---------------------------------------------------------------------------------


def _refused(chunks: list[pb.TensorChunk], match: str, *, ordered: bool = True) -> ChunkError:
    header, _ = _stream()
    assembler = ParameterSetAssembler(header, ordered=ordered, max_chunk_bytes=16)
    with pytest.raises(ChunkError, match=match) as info:
        assembler.add_all(chunks)
        assembler.finish()
    with pytest.raises(ChunkError, match="already refused"):  # poisoned afterwards
        assembler.add(chunks[0])
    assert isinstance(info.value, TensorDecodeError)
    return info.value


def _chunk(
    name: str = "gnn.w", offset: int = 0, size: int = 16, last: bool = False
) -> pb.TensorChunk:
    return pb.TensorChunk(name=name, offset=offset, data=b"\x00" * size, last=last)


@pytest.mark.parametrize("ordered", [True, False])
def test_refusals_in_both_modes(ordered: bool) -> None:
    _, good = _stream()
    err = _refused([_chunk(name="nope")], "not in the header", ordered=ordered)
    assert err.tensor == "nope"
    _refused([_chunk(size=17)], "exceeds the limit of 16", ordered=ordered)
    _refused([_chunk(offset=112, size=16, last=True)], r"past the end", ordered=ordered)
    _refused([_chunk(size=0)], "empty chunk", ordered=ordered)
    _refused([_chunk(offset=104, size=16, last=False)], "last=False", ordered=ordered)
    _refused([_chunk(offset=0, size=16, last=True)], "last=True", ordered=ordered)
    err = _refused(good[:-1], "incomplete", ordered=ordered)
    assert err.tensor == "flag"
    _refused([*good, good[-1]], "after the tensor was complete", ordered=ordered)


def test_ordered_mode_refusals() -> None:
    _, good = _stream()
    _refused([good[1]], "leaves bytes \\[0, 16\\) missing")
    _refused([good[0], good[0]], "overlaps bytes already received")
    _refused([good[-1]], "out of order: .* expected a chunk of 'gnn.w'")


def test_unordered_mode_overlap_and_duplicate() -> None:
    _, good = _stream()
    _refused([good[2], good[0], good[2]], r"duplicate chunk \[32, 48\)", ordered=False)
    _refused([good[1], _chunk(offset=8, size=16)], r"overlapping chunk \[8, 24\)", ordered=False)
    _refused([good[1], _chunk(offset=24, size=16)], r"overlapping chunk \[24, 40\)", ordered=False)
    # Adjacent ranges merge; the whole tensor in reverse order is fine.
    header, chunks = _stream()
    assert _equal(assemble(header, chunks[::-1], ordered=False), PARAMS)


def test_header_refusals() -> None:
    header, _ = _stream()
    wrong_shape = dict(expected_specs(PARAMS), **{"gnn.b": ((8,), torch.int64)})
    with pytest.raises(ChunkError, match=r"'gnn.b'.*shape \[7\], expected \[8\]"):
        ParameterSetAssembler(header, expected=wrong_shape)
    wrong_dtype = dict(expected_specs(PARAMS), **{"flag": ((), torch.float32)})
    with pytest.raises(ChunkError, match="dtype bool, expected float32"):
        ParameterSetAssembler(header, expected=wrong_dtype)
    missing = dict(expected_specs(PARAMS), extra=((1,), torch.float32))
    with pytest.raises(ChunkError, match=r"missing \['extra'\]"):
        ParameterSetAssembler(header, expected=missing)
    fewer = expected_specs(PARAMS)
    del fewer["empty"]
    with pytest.raises(ChunkError, match=r"unexpected \['empty'\]"):
        ParameterSetAssembler(header, expected=fewer)
    with pytest.raises(ChunkError, match="more than 100"):
        ParameterSetAssembler(header, max_total_bytes=100)

    lying = pb.ParameterSetHeader()
    lying.CopyFrom(header)
    lying.tensors[0].byte_length = 1 << 40
    with pytest.raises(ChunkError, match="expected 120"):
        ParameterSetAssembler(lying)
    bomb = pb.ParameterSetHeader()
    bomb.CopyFrom(header)
    bomb.tensors[0].compression = pb.COMPRESSION_ZLIB
    bomb.tensors[0].byte_length = 1 << 40
    with pytest.raises(ChunkError, match="zlib bytes"):
        ParameterSetAssembler(bomb)
    dup = pb.ParameterSetHeader(tensors=[header.tensors[0], header.tensors[0]])
    with pytest.raises(ChunkError, match="appears twice"):
        ParameterSetAssembler(dup)
    unknown = pb.ParameterSetHeader()
    unknown.CopyFrom(header)
    unknown.tensors[1].spec.dtype = 77  # type: ignore[assignment]
    with pytest.raises(ChunkError, match=r"'gnn\.b': unknown dtype 77"):
        ParameterSetAssembler(unknown)


def test_bad_data_found_at_finish() -> None:
    header, chunks = stream_tensors({"m": torch.tensor([True, False])})
    bad = [pb.TensorChunk(name="m", offset=0, data=b"\x01\x05", last=True)]
    with pytest.raises(ChunkError, match="'m': bool data"):
        assemble(header, bad)
    nan = {"w": torch.tensor([1.0, float("nan")])}
    header, chunks = stream_tensors(nan)
    with pytest.raises(ChunkError, match="NaN/Inf"):
        assemble(header, chunks, check_finite=True)


def test_finish_twice_and_chunks_after_finish_refused() -> None:
    header, chunks = _stream()
    assembler = ParameterSetAssembler(header)
    assembler.add_all(chunks)
    assembler.finish()
    with pytest.raises(ChunkError, match="twice"):
        assembler.finish()
    with pytest.raises(ChunkError, match="after the parameter set was finished"):
        assembler.add(chunks[0])
