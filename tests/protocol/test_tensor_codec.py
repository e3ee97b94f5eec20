"""torch <-> fedenc.v1 Tensor / ParameterSet: round trips, byte order, and every refusal."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol import tensors as codec
from fedenc.protocol.tensors import (
    TensorDecodeError,
    TensorEncodeError,
    decode_tensor,
    expected_specs,
    parameters_from_proto,
    parameters_to_proto,
    tensor_from_proto,
    tensor_to_proto,
)

ALL_DTYPES = sorted(codec.DTYPES.values(), key=str)


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (7,), (2, 3, 4)], ids=str)
def test_round_trip_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(dtype, shape)
    msg = pb.Tensor.FromString(tensor_to_proto("w", t).SerializeToString())
    assert msg.spec.name == "w"
    assert list(msg.spec.shape) == list(shape)
    assert len(msg.data) == t.numel() * dtype.itemsize
    back = tensor_from_proto(msg)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_wire_bytes_are_little_endian() -> None:
    msg = tensor_to_proto("x", torch.tensor([1.5, -2.0], dtype=torch.float32))
    assert msg.data == struct.pack("<2f", 1.5, -2.0)
    msg = tensor_to_proto("i", torch.tensor([1, -2], dtype=torch.int64))
    assert msg.data == struct.pack("<2q", 1, -2)


def test_decoded_tensor_owns_writable_memory() -> None:
    msg = tensor_to_proto("x", torch.arange(6.0).reshape(2, 3))
    t = tensor_from_proto(msg)
    t += 1  # no "non-writable buffer" problem, and the message is untouched
    assert torch.equal(tensor_from_proto(msg), torch.arange(6.0).reshape(2, 3))


def test_bytearray_is_taken_over_without_copy() -> None:
    spec = pb.TensorSpec(name="x", dtype=pb.DTYPE_INT32, shape=[2])
    buf = bytearray(struct.pack("<2i", 1, 2))
    t = decode_tensor(spec, buf)
    buf[0:4] = struct.pack("<i", 9)
    assert t.tolist() == [9, 2]


def test_non_contiguous_gradient_and_views_encode() -> None:
    base = torch.arange(12.0).reshape(3, 4).requires_grad_()
    t = base.t()[1:]  # non-contiguous view of a leaf that requires grad
    back = tensor_from_proto(tensor_to_proto("v", t))
    assert torch.equal(back, t.detach())
    assert not back.requires_grad


def test_big_endian_host_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    values = torch.tensor([1.0, -2.5, 3.25], dtype=torch.float64)
    le = tensor_to_proto("x", values).data
    monkeypatch.setattr(codec, "_LITTLE_ENDIAN", False)
    # On a big-endian host the native bytes are reversed per element: the codec swaps them, so
    # here (a little-endian host pretending) the output is the per-element reversal of ``le``.
    swapped = tensor_to_proto("x", values).data
    assert swapped == b"".join(le[i : i + 8][::-1] for i in range(0, len(le), 8))
    assert torch.equal(tensor_from_proto(tensor_to_proto("x", values)), values)
    # Decoding swaps too: true little-endian bytes read as "native big-endian" are reversed.
    reread = decode_tensor(pb.TensorSpec(name="x", dtype=pb.DTYPE_FLOAT64, shape=[3]), swapped)
    assert torch.equal(reread, values)
    for dtype in ALL_DTYPES:
        t = _sample(dtype, (5,))
        assert torch.equal(tensor_from_proto(tensor_to_proto("t", t)), t), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
def test_zlib_round_trip(dtype: torch.dtype) -> None:
    t = torch.zeros(1000, dtype=dtype)
    msg = tensor_to_proto("z", t, compression=pb.COMPRESSION_ZLIB)
    assert msg.compression == pb.COMPRESSION_ZLIB
    assert len(msg.data) < t.numel() * dtype.itemsize // 10
    assert torch.equal(tensor_from_proto(msg), t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_float16_compression_is_lossy_but_close(dtype: torch.dtype) -> None:
    t = torch.randn(64, dtype=torch.float64).to(dtype)
    msg = tensor_to_proto("h", t, compression=pb.COMPRESSION_FLOAT16)
    assert len(msg.data) == 64 * 2
    back = tensor_from_proto(msg)
    assert back.dtype == dtype
    torch.testing.assert_close(back, t, rtol=1e-2, atol=1e-3)


def test_float16_compression_refusals() -> None:
    with pytest.raises(TensorEncodeError, match="float16 range"):
        tensor_to_proto("big", torch.tensor([1e6]), compression=pb.COMPRESSION_FLOAT16)
    with pytest.raises(TensorEncodeError, match="floating"):
        tensor_to_proto("ints", torch.tensor([1, 2]), compression=pb.COMPRESSION_FLOAT16)
    msg = pb.Tensor(
        spec=pb.TensorSpec(name="i", dtype=pb.DTYPE_INT32, shape=[1]),
        data=b"\x00\x3c",
        compression=pb.COMPRESSION_FLOAT16,
    )
    with pytest.raises(TensorDecodeError, match="non-floating"):
        tensor_from_proto(msg)


def test_unsupported_dtype_and_empty_name_refused_on_encode() -> None:
    with pytest.raises(TensorEncodeError, match="complex64"):
        tensor_to_proto("c", torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(TensorEncodeError, match="empty"):
        tensor_to_proto("", torch.zeros(2))


def test_parameter_set_round_trip_with_metadata_and_order() -> None:
    params = {"b": torch.randn(3), "a": torch.arange(4), "m": torch.tensor([True, False])}
    ps = parameters_to_proto(params, metadata={"encoder": "srgnn"})
    assert ps.metadata["encoder"] == "srgnn"
    out = parameters_from_proto(ps)
    assert list(out) == ["b", "a", "m"]
    expected = {"m": ((2,), torch.bool), "a": ((4,), torch.int64), "b": ((3,), torch.float32)}
    out = parameters_from_proto(ps, expected)
    assert list(out) == ["m", "a", "b"]  # expected's order
    assert all(torch.equal(out[k], params[k]) for k in params)
    assert expected_specs(params)["a"] == ((4,), torch.int64)


# --- refusals ---------------------------------------------------------------------------------


def _msg(
    dtype: int = pb.DTYPE_FLOAT32,
    shape: tuple[int, ...] = (2,),
    data: bytes = b"\x00" * 8,
    compression: int = pb.COMPRESSION_NONE,
    name: str = "w",
) -> pb.Tensor:
    return pb.Tensor(
        spec=pb.TensorSpec(name=name, dtype=dtype, shape=shape),  # type: ignore[arg-type]
        data=data,
        compression=compression,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (_msg(dtype=pb.DTYPE_UNSPECIFIED), "unknown dtype DTYPE_UNSPECIFIED"),
        (_msg(dtype=99), "unknown dtype 99"),
        (_msg(data=b"\x00" * 7), "7 bytes of data, expected 8"),
        (_msg(shape=(3,)), "expected 12"),
        (_msg(compression=42), "unknown compression 42"),
        (_msg(shape=(1,) * 33, data=b"\x00" * 4), "33 dimensions"),
        (_msg(shape=(1 << 63,), data=b""), "invalid dimension"),
        (_msg(shape=(0, 1 << 40, 1 << 40), data=b""), "too large"),
        (_msg(dtype=pb.DTYPE_BOOL, data=b"\x00\x02"), "other than 0 and 1"),
        (_msg(compression=pb.COMPRESSION_ZLIB, data=b"not zlib"), "corrupt zlib"),
        (_msg(compression=pb.COMPRESSION_ZLIB, data=zlib.compress(b"\x00" * 4)), "exactly 8"),
        (
            _msg(compression=pb.COMPRESSION_ZLIB, data=zlib.compress(b"\x00" * 8) + b"x"),
            "exactly 8",
        ),
        (_msg(compression=pb.COMPRESSION_FLOAT16, data=b"\x00" * 8), "expected 4"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_decode_refusals_name_the_tensor(msg: pb.Tensor, match: str) -> None:
    with pytest.raises(TensorDecodeError, match=match) as info:
        tensor_from_proto(msg)
    assert info.value.tensor == "w"
    assert "'w'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_expected_spec_mismatches() -> None:
    msg = _msg()
    spec = pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[2])
    assert tensor_from_proto(msg, spec).shape == (2,)
    with pytest.raises(TensorDecodeError, match=r"shape \[2\], expected \[1, 2\]"):
        tensor_from_proto(msg, pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[1, 2]))
    with pytest.raises(TensorDecodeError, match="dtype float32, expected int64"):
        tensor_from_proto(msg, pb.TensorSpec(name="w", dtype=pb.DTYPE_INT64, shape=[2]))
    with pytest.raises(TensorDecodeError, match="expected tensor 'v'"):
        tensor_from_proto(msg, pb.TensorSpec(name="v", dtype=pb.DTYPE_FLOAT32, shape=[2]))


def test_parameter_set_name_refusals() -> None:
    ps = parameters_to_proto({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(TensorDecodeError, match=r"missing \['c'\]; unexpected \['b'\]"):
        parameters_from_proto(ps, {"a": ((2,), torch.float32), "c": ((3,), torch.float32)})
    with pytest.raises(TensorDecodeError, match=r"missing \['c'\]") as info:
        parameters_from_proto(
            ps,
            {"a": ((2,), torch.float32), "b": ((3,), torch.float32), "c": ((1,), torch.float32)},
        )
    assert info.value.tensor == "c"
    with pytest.raises(TensorDecodeError, match=r"unexpected \['b'\]"):
        parameters_from_proto(ps, {"a": ((2,), torch.float32)})
    with pytest.raises(TensorDecodeError, match="shape"):
        parameters_from_proto(ps, {"a": ((2,), torch.float32), "b": ((4,), torch.float32)})
    dup = pb.ParameterSet(tensors=[ps.tensors[0], ps.tensors[0]])
    with pytest.raises(TensorDecodeError, match="appears twice"):
        parameters_from_proto(dup)
    unnamed = pb.ParameterSet(tensors=[_msg(name="")])
    with pytest.raises(TensorDecodeError, match="empty tensor name"):
        parameters_from_proto(unnamed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_inf_refused_on_request(bad: float) -> None:
    ps = parameters_to_proto({"ok": torch.ones(2), "w": torch.tensor([1.0, bad])})
    parameters_from_proto(ps)  # accepted by default
    with pytest.raises(TensorDecodeError, match="1 NaN/Inf") as info:
        parameters_from_proto(ps, check_finite=True)
    assert info.value.tensor == "w"
    ints = parameters_to_proto({"i": torch.arange(3)})
    parameters_from_proto(ints, check_finite=True)  # integers are always finite
