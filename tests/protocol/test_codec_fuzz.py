"""Fuzzing: whatever a peer sends, the decoders raise TensorDecodeError (a ValueError) or succeed,
and never fail in any other way."""

from __future__ import annotations

import random

import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol.chunking import ChunkError, ParameterSetAssembler, stream_tensors
from fedenc.protocol.tensors import (
    TensorDecodeError,
    parameters_from_proto,
    tensor_from_proto,
    tensor_to_proto,
)

FUZZ = settings(
    max_examples=120,
    derandomize=True,  # the same examples on every run (CI); raise max_examples to explore
    deadline=None,
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.too_slow],
)

dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([1 << 31, 1 << 62, (1 << 62) + 1, 1 << 63, (1 << 64) - 1]),
)
tensor_messages = st.builds(
    lambda name, dtype, shape, data, compression: pb.Tensor(
        spec=pb.TensorSpec(name=name, dtype=dtype, shape=shape),
        data=data,
        compression=compression,
    ),
    name=st.text(max_size=8),
    dtype=st.integers(0, 12),
    shape=st.lists(dims, max_size=4),
    data=st.binary(max_size=64),
    compression=st.integers(0, 4),
)


def _decodes_or_refuses(msg: pb.Tensor, check_finite: bool) -> None:
    try:
        t = tensor_from_proto(msg, check_finite=check_finite)
    except TensorDecodeError as err:
        assert err.tensor == msg.spec.name
        return
    assert list(t.shape) == list(msg.spec.shape)
    # What decodes re-encodes to a tensor that decodes the same (bit-exact, NaN payloads too).
    again = tensor_from_proto(tensor_to_proto("x", t))
    assert again.shape == t.shape
    assert torch.equal(again.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


@FUZZ
@example(
    msg=pb.Tensor(spec=pb.TensorSpec(name="s", dtype=pb.DTYPE_FLOAT32), data=b"\0\0\xc0\x7f"),
    check_finite=True,
)
@example(
    msg=pb.Tensor(spec=pb.TensorSpec(name="b", dtype=pb.DTYPE_BOOL, shape=[2]), data=b"\1\2"),
    check_finite=False,
)
@given(msg=tensor_messages, check_finite=st.booleans())
def test_tensor_decoder_on_random_fields(msg: pb.Tensor, check_finite: bool) -> None:
    _decodes_or_refuses(msg, check_finite)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_parameter_set_decoder_on_random_bytes(raw: bytes) -> None:
    try:
        ps = pb.ParameterSet.FromString(raw)
    except DecodeError:
        return  # refused by protobuf itself
    try:
        parameters_from_proto(ps, check_finite=True)
    except TensorDecodeError:
        pass


HEADER, _chunks = stream_tensors(
    {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, dtype=torch.int64)},
    max_chunk_bytes=8,
)
CHUNKS = list(_chunks)
random_chunks = st.builds(
    pb.TensorChunk,
    name=st.sampled_from(["a", "b", "c", ""]),
    offset=st.integers(0, 48),
    data=st.binary(max_size=12),
    last=st.booleans(),
)


@FUZZ
@given(
    chunks=st.lists(st.one_of(st.sampled_from(CHUNKS), random_chunks), max_size=16),
    ordered=st.booleans(),
)
def test_assembler_on_random_chunk_streams(chunks: list[pb.TensorChunk], ordered: bool) -> None:
    assembler = ParameterSetAssembler(HEADER, ordered=ordered, max_chunk_bytes=8)
    try:
        assembler.add_all(chunks)
        out = assembler.finish()
    except ChunkError:
        return
    assert set(out) == {"a", "b"}
    assert out["a"].shape == (10,) and out["b"].shape == (3,)


@pytest.mark.parametrize("seed", range(3))
def test_assembler_accepts_every_permutation_when_unordered(seed: int) -> None:
    chunks = CHUNKS[:]
    random.Random(seed).shuffle(chunks)
    assembler = ParameterSetAssembler(HEADER, ordered=False, max_chunk_bytes=8)
    assembler.add_all(chunks)
    assert torch.equal(assembler.finish()["a"], torch.arange(10, dtype=torch.float32))
