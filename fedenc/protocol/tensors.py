"""torch tensors <-> ``fedenc.v1`` ``Tensor`` and ``ParameterSet`` messages.

On the wire a tensor is its spec (name, dtype, shape) and its element bytes in row-major order,
always little-endian (big-endian hosts swap bytes on both sides), optionally compressed:

* ``COMPRESSION_NONE`` (also what an unset field means): the raw bytes;
* ``COMPRESSION_ZLIB``: the raw bytes as one zlib stream, lossless;
* ``COMPRESSION_FLOAT16``: lossy, floating-point values rounded to binary16 (2 bytes each) and
  converted back to the spec's dtype by the receiver; values beyond binary16's range are refused.

Decoding validates everything a peer controls and raises :class:`TensorDecodeError` (a
``ValueError``) naming the tensor: unknown dtype or compression, an invalid shape, a byte length
that does not match the shape, a shape or dtype other than expected, missing, extra or duplicate
names, bool bytes other than 0/1 and, on request, NaN/Inf values.

Copies: protobuf ``bytes`` fields are immutable, so a decoded tensor costs one copy of the data
(``torch.frombuffer`` on the bytes, then one clone so that the tensor owns writable memory). A
``bytearray`` (as reassembled from chunks by :mod:`fedenc.protocol.chunking`) is wrapped without
any copy. Encoding copies once into the message (protobuf accepts only ``bytes``).
"""

from __future__ import annotations

import math
import sys
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

from fedenc.proto.fedenc.v1 import tensor_pb2 as pb

__all__ = [
    "DTYPES",
    "MAX_DIMS",
    "ExpectedSpecs",
    "TensorDecodeError",
    "TensorEncodeError",
    "check_expected",
    "check_names",
    "check_shape",
    "decode_tensor",
    "dtype_from_proto",
    "dtype_to_proto",
    "encoded_size",
    "expected_specs",
    "parameters_from_proto",
    "parameters_to_proto",
    "raw_view",
    "tensor_from_proto",
    "tensor_spec",
    "tensor_to_proto",
    "wire_view",
]

DTypeValue: TypeAlias = pb.DType.ValueType
CompressionValue: TypeAlias = pb.Compression.ValueType
#: Expected tensors by name: shape and dtype.
ExpectedSpecs: TypeAlias = Mapping[str, tuple[Sequence[int], torch.dtype]]

#: Wire dtype -> torch dtype.
DTYPES: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_INT16: torch.int16,
    pb.DTYPE_INT8: torch.int8,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_BOOL: torch.bool,
}
_WIRE_DTYPES: dict[torch.dtype, DTypeValue] = {v: pb.DType.ValueType(k) for k, v in DTYPES.items()}
_FLOATING = frozenset({torch.float32, torch.float64, torch.float16, torch.bfloat16})
_NO_COMPRESSION = frozenset({pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE})
_KNOWN_COMPRESSIONS = frozenset(
    {pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE, pb.COMPRESSION_ZLIB, pb.COMPRESSION_FLOAT16}
)

#: Most dimensions a wire tensor may have.
MAX_DIMS = 32
#: Bound on every dimension and on the product of the non-zero dimensions (int64-safe strides).
_MAX_EXTENT = 1 << 62

# Read at call time, so tests can simulate a big-endian host on a little-endian one.
_LITTLE_ENDIAN = sys.byteorder == "little"


class TensorDecodeError(ValueError):
    """A tensor or parameter set received from a peer is invalid. ``tensor`` names the tensor."""

    def __init__(self, tensor: str | None, message: str) -> None:
        self.tensor = tensor
        self.reason = message
        super().__init__(f"tensor {tensor!r}: {message}" if tensor is not None else message)


class TensorEncodeError(ValueError):
    """A tensor cannot be put on the wire as asked (unsupported dtype, float16 overflow...)."""


# --- dtypes and specs -------------------------------------------------------------------------


def dtype_to_proto(dtype: torch.dtype) -> DTypeValue:
    """The wire dtype of a torch dtype; :class:`TensorEncodeError` when it has none."""
    try:
        return _WIRE_DTYPES[dtype]
    except KeyError:
        known = ", ".join(str(d).removeprefix("torch.") for d in _WIRE_DTYPES)
        raise TensorEncodeError(f"dtype {dtype} cannot be sent (supported: {known})") from None


def dtype_from_proto(value: int, name: str | None = None) -> torch.dtype:
    """The torch dtype of a wire dtype; :class:`TensorDecodeError` naming ``name`` if unknown."""
    try:
        return DTYPES[value]
    except KeyError:
        label = pb.DType.Name(pb.DType.ValueType(value)) if value == 0 else str(value)
        raise TensorDecodeError(name, f"unknown dtype {label}") from None


def tensor_spec(name: str, t: Tensor) -> pb.TensorSpec:
    """The wire spec of a tensor."""
    return pb.TensorSpec(name=name, dtype=dtype_to_proto(t.dtype), shape=list(t.shape))


def expected_specs(params: Mapping[str, Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Expected shapes and dtypes taken from reference tensors (for example a model's state)."""
    return {name: (tuple(t.shape), t.dtype) for name, t in params.items()}


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """A wire shape as a tuple; :class:`TensorDecodeError` when too large or malformed."""
    if len(shape) > MAX_DIMS:
        raise TensorDecodeError(name, f"{len(shape)} dimensions (at most {MAX_DIMS})")
    extent = 1
    for d in shape:
        if d < 0 or d > _MAX_EXTENT:
            raise TensorDecodeError(name, f"invalid dimension {d} in shape {list(shape)}")
        extent *= max(d, 1)
        if extent > _MAX_EXTENT:
            raise TensorDecodeError(name, f"shape {list(shape)} is too large")
    return tuple(int(d) for d in shape)


def check_expected(
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    expected: tuple[Sequence[int], torch.dtype] | None,
) -> None:
    """Refuses a dtype or shape other than ``expected`` (when given)."""
    if expected is None:
        return
    want_shape, want_dtype = tuple(expected[0]), expected[1]
    if dtype != want_dtype:
        raise TensorDecodeError(name, f"dtype {_short(dtype)}, expected {_short(want_dtype)}")
    if shape != want_shape:
        raise TensorDecodeError(name, f"shape {list(shape)}, expected {list(want_shape)}")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encoded_size(dtype: torch.dtype, shape: Sequence[int], compression: int) -> int | None:
    """Exact byte length of the encoded data, or ``None`` when it depends on the values (zlib)."""
    numel = math.prod(shape)
    if compression in _NO_COMPRESSION:
        return numel * dtype.itemsize
    if compression == pb.COMPRESSION_FLOAT16:
        return numel * 2
    return None


# --- byte order -------------------------------------------------------------------------------


def _swapped(buf: bytes | bytearray | memoryview, itemsize: int) -> bytearray:
    """A copy of ``buf`` with the bytes of every ``itemsize``-byte element reversed."""
    out = bytearray(len(buf))
    if len(buf):
        src = np.frombuffer(buf, dtype=np.uint8).reshape(-1, itemsize)
        np.copyto(np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize), src[:, ::-1])
    return out


def raw_view(t: Tensor) -> memoryview:
    """The tensor's elements as little-endian bytes, row-major; no copy when already contiguous
    on the CPU of a little-endian host. Valid while ``t`` is not modified."""
    dtype_to_proto(t.dtype)  # refuse unsupported dtypes early
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    view = flat.view(torch.uint8).numpy()
    if not _LITTLE_ENDIAN and t.dtype.itemsize > 1:
        return memoryview(_swapped(view.data, t.dtype.itemsize))
    return view.data.cast("B")


def wire_view(
    t: Tensor, compression: int = pb.COMPRESSION_NONE, *, zlib_level: int = 1
) -> memoryview:
    """The encoded data of ``t`` as it goes on the wire (see the module docstring)."""
    if compression in _NO_COMPRESSION:
        return raw_view(t)
    if compression == pb.COMPRESSION_ZLIB:
        return memoryview(zlib.compress(raw_view(t), zlib_level))
    if compression == pb.COMPRESSION_FLOAT16:
        if t.dtype not in _FLOATING:
            raise TensorEncodeError(f"float16 compression needs a floating tensor, not {t.dtype}")
        src = t.detach()
        half = src.to(torch.float16)
        if t.dtype != torch.float16:
            overflow = torch.isinf(half) & torch.isfinite(src)
            if bool(overflow.any()):
                raise TensorEncodeError(
                    f"{int(overflow.sum())} finite value(s) beyond the float16 range (±65504)"
                )
        return raw_view(half)
    raise TensorEncodeError(f"unknown compression {compression}")


# --- encoding ---------------------------------------------------------------------------------


def tensor_to_proto(
    name: str, t: Tensor, *, compression: int = pb.COMPRESSION_NONE, zlib_level: int = 1
) -> pb.Tensor:
    """Encodes one tensor (any device, any layout; a CPU copy is made when needed)."""
    if not name:
        raise TensorEncodeError("tensor name must not be empty")
    try:
        data = wire_view(t, compression, zlib_level=zlib_level)
    except TensorEncodeError as err:
        raise TensorEncodeError(f"tensor {name!r}: {err}") from None
    return pb.Tensor(
        spec=tensor_spec(name, t),
        data=data.tobytes(),
        compression=pb.Compression.ValueType(compression),
    )


def parameters_to_proto(
    params: Mapping[str, Tensor],
    *,
    compression: int = pb.COMPRESSION_NONE,
    metadata: Mapping[str, str] | None = None,
    zlib_level: int = 1,
) -> pb.ParameterSet:
    """Encodes named tensors, in mapping order, as one inline :class:`ParameterSet`."""
    return pb.ParameterSet(
        tensors=[
            tensor_to_proto(name, t, compression=compression, zlib_level=zlib_level)
            for name, t in params.items()
        ],
        metadata=dict(metadata or {}),
    )


# --- decoding ---------------------------------------------------------------------------------


def _inflate(name: str, data: bytes | bytearray | memoryview, size: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, size + 1)  # bounded: a zlib bomb cannot grow past it
    except zlib.error as err:
        raise TensorDecodeError(name, f"corrupt zlib data ({err})") from None
    if len(raw) != size or not inflater.eof or inflater.unused_data:
        raise TensorDecodeError(
            name, f"zlib data does not decompress to exactly {size} bytes (shape x item size)"
        )
    return raw


def _from_le(
    name: str, buf: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]
) -> Tensor:
    """A tensor over little-endian bytes whose length is already checked; owns writable memory."""
    if len(buf) == 0:
        try:
            return torch.empty(shape, dtype=dtype)
        except RuntimeError as err:  # defensive: shapes are bounded by check_shape
            raise TensorDecodeError(name, f"cannot build shape {list(shape)} ({err})") from None
    if dtype == torch.bool:
        as_bytes = np.frombuffer(buf, dtype=np.uint8)
        if int(as_bytes.max()) > 1:
            raise TensorDecodeError(name, "bool data holds bytes other than 0 and 1")
    copy = isinstance(buf, bytes)
    if not _LITTLE_ENDIAN and dtype.itemsize > 1:
        buf, copy = _swapped(buf, dtype.itemsize), False
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        t = torch.frombuffer(buf, dtype=dtype)
    if copy:
        t = t.clone()
    return t.reshape(shape)


def decode_tensor(
    spec: pb.TensorSpec,
    data: bytes | bytearray | memoryview,
    compression: int = pb.COMPRESSION_NONE,
    *,
    expected: tuple[Sequence[int], torch.dtype] | None = None,
    check_finite: bool = False,
) -> Tensor:
    """Decodes a tensor's encoded bytes, fully validated (see the module docstring).

    ``bytes`` are copied once; a ``bytearray`` (or a writable ``memoryview`` of one) is taken
    over without a copy (do not reuse it).
    """
    name = spec.name
    dtype = dtype_from_proto(spec.dtype, name)
    shape = check_shape(name, spec.shape)
    check_expected(name, dtype, shape, expected)
    if compression not in _KNOWN_COMPRESSIONS:
        raise TensorDecodeError(name, f"unknown compression {compression}")
    numel = math.prod(shape)
    raw_size = numel * dtype.itemsize
    if compression == pb.COMPRESSION_ZLIB:
        data = _inflate(name, data, raw_size)
    if compression == pb.COMPRESSION_FLOAT16:
        if dtype not in _FLOATING:
            raise TensorDecodeError(name, f"float16 compression on non-floating dtype {dtype}")
        if len(data) != numel * 2:
            raise TensorDecodeError(
                name,
                f"{len(data)} bytes of float16 data, expected {numel * 2} for shape {list(shape)}",
            )
        t = _from_le(name, data, torch.float16, shape).to(dtype)
    else:
        if len(data) != raw_size:
            raise TensorDecodeError(
                name,
                f"{len(data)} bytes of data, expected {raw_size} "
                f"({numel} x {dtype.itemsize}-byte {_short(dtype)} for shape {list(shape)})",
            )
        t = _from_le(name, data, dtype, shape)
    if check_finite and dtype in _FLOATING:
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            raise TensorDecodeError(name, f"{int(bad.sum())} NaN/Inf value(s)")
    return t


def tensor_from_proto(
    msg: pb.Tensor, expected: pb.TensorSpec | None = None, *, check_finite: bool = False
) -> Tensor:
    """Decodes one :class:`Tensor` message, optionally checked against an expected spec."""
    want: tuple[Sequence[int], torch.dtype] | None = None
    if expected is not None:
        if expected.name and msg.spec.name != expected.name:
            raise TensorDecodeError(msg.spec.name, f"expected tensor {expected.name!r}")
        want = (
            check_shape(expected.name, expected.shape),
            dtype_from_proto(expected.dtype, expected.name),
        )
    return decode_tensor(
        msg.spec, msg.data, msg.compression, expected=want, check_finite=check_finite
    )


def check_names(
    names: Sequence[str], expected: ExpectedSpecs | None, what: str = "parameter set"
) -> None:
    """Refuses empty or duplicate names and, given ``expected``, missing or extra ones."""
    seen: set[str] = set()
    for name in names:
        if not name:
            raise TensorDecodeError(name, f"empty tensor name in the {what}")
        if name in seen:
            raise TensorDecodeError(name, f"appears twice in the {what}")
        seen.add(name)
    if expected is None:
        return
    missing = [n for n in expected if n not in seen]
    extra = [n for n in names if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        first = (missing or extra)[0]
        raise TensorDecodeError(first, f"{what} does not match: " + "; ".join(parts))


def parameters_from_proto(
    ps: pb.ParameterSet, expected: ExpectedSpecs | None = None, *, check_finite: bool = False
) -> dict[str, Tensor]:
    """Decodes a :class:`ParameterSet`; with ``expected``, names, shapes and dtypes must match
    exactly and the result follows ``expected``'s order (else the message's order)."""
    tensors = list(ps.tensors)
    check_names([t.spec.name for t in tensors], expected)
    out = {t.spec.name: _decode_entry(t, expected, check_finite=check_finite) for t in tensors}
    if expected is not None:
        out = {name: out[name] for name in expected}
    return out


def _decode_entry(
    msg: pb.Tensor, expected: ExpectedSpecs | None, *, check_finite: bool = False
) -> Tensor:
    """Decodes one tensor checked against its entry in ``expected`` (if given)."""
    want = None if expected is None else expected.get(msg.spec.name)
    return decode_tensor(
        msg.spec, msg.data, msg.compression, expected=want, check_finite=check_finite
    )
