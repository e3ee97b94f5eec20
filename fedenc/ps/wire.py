"""Keys and rows on the wire, through fedenc's tensor codec (:mod:`fedenc.protocol.tensors`):
keys are a 1-D int64 ``Tensor`` message, rows a 2-D float32 one.

Pulls are the PS's bulk traffic, so a ``PullResponse`` is written and read in the protobuf wire
format directly (:mod:`fedenc.protocol.wire_format`): the shard copies the rows once into the
response, the client once out of it into the rows it returns. Anything the fast reader does not
expect goes through the generated class and the full tensor decoder, whose errors stay the
reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from google.protobuf.message import DecodeError
from numpy.typing import NDArray
from torch import Tensor

from fedenc.proto.fedenc.v1 import parameter_server_pb2 as pspb
from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol.tensors import (
    TensorDecodeError,
    decode_tensor,
    raw_view,
    tensor_spec,
    tensor_to_proto,
)
from fedenc.protocol.wire_format import VARINT, field_number, len_prefix, scan, tag, varint
from fedenc.ps.table import PSError

_ROWS = field_number(pspb.PullResponse, "rows")
_VERSION = field_number(pspb.PullResponse, "version")
_P_KEYS = field_number(pspb.PushRequest, "keys")
_P_ROWS = field_number(pspb.PushRequest, "rows")
_P_MODE = field_number(pspb.PushRequest, "mode")
_P_CLIENT = field_number(pspb.PushRequest, "client_id")
_P_SEQUENCE = field_number(pspb.PushRequest, "sequence")
_SPEC = field_number(pb.Tensor, "spec")
_DATA = field_number(pb.Tensor, "data")
_COMPRESSION = field_number(pb.Tensor, "compression")
_COMPRESSION_NONE = tag(_COMPRESSION, VARINT) + varint(pb.COMPRESSION_NONE)


def keys_to_proto(keys: NDArray[np.int64]) -> pb.Tensor:
    return tensor_to_proto("keys", torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64)))


def keys_from_proto(msg: pb.Tensor) -> NDArray[np.int64]:
    if msg.spec.dtype != pb.DTYPE_INT64 or len(msg.spec.shape) != 1:
        raise PSError(
            f"keys must be a 1-D int64 tensor, got dtype {msg.spec.dtype} "
            f"shape {list(msg.spec.shape)}"
        )
    keys: NDArray[np.int64] = decode_tensor(msg.spec, msg.data, msg.compression).numpy()
    return keys


def rows_to_proto(rows: Tensor) -> pb.Tensor:
    return tensor_to_proto("rows", rows)


def rows_from_proto(msg: pb.Tensor) -> Tensor:
    """The rows as sent (dtype and width are checked by the table, with the table's words)."""
    return decode_tensor(msg.spec, msg.data, msg.compression)


def _rows_field(number: int, rows: Tensor) -> tuple[bytes, memoryview, bytes]:
    """Field ``number`` holding ``rows`` as a ``Tensor`` message, as (head, data, tail): their
    concatenation is the field, and ``data`` is a view of the rows (no copy)."""
    data = raw_view(rows)
    spec = tensor_spec("rows", rows).SerializeToString()
    tensor_head = len_prefix(_SPEC, len(spec)) + spec + len_prefix(_DATA, len(data))
    head = len_prefix(number, len(tensor_head) + len(data) + len(_COMPRESSION_NONE)) + tensor_head
    return head, data, _COMPRESSION_NONE


def _tensor_parts(view: memoryview) -> tuple[pb.TensorSpec, memoryview, int] | None:
    """(spec, data view, compression) of a ``Tensor`` message; None when it is not a plain one."""
    inner = scan(view, (_COMPRESSION,), (_SPEC, _DATA))
    if inner is None or _SPEC not in inner[1]:
        return None
    try:
        spec = pb.TensorSpec.FromString(bytes(inner[1][_SPEC]))
    except DecodeError:
        return None
    return spec, inner[1].get(_DATA, memoryview(b"")), inner[0].get(_COMPRESSION, 0)


def _read_rows(view: memoryview) -> Tensor | None:
    """A ``Tensor`` message's rows, decoded with one copy; None when it is not a plain one."""
    parts = _tensor_parts(view)
    return None if parts is None else decode_tensor(*parts)


def pull_response_bytes(rows: Tensor, version: int) -> bytes:
    """The serialized ``PullResponse{rows, version}``, with one copy of the rows."""
    head, data, tail = _rows_field(_ROWS, rows)
    return b"".join((head, data, tail, tag(_VERSION, VARINT) + varint(version) if version else b""))


def push_request_bytes(
    keys: NDArray[np.int64], rows: Tensor, mode: int, client_id: str, sequence: int
) -> bytes:
    """The serialized ``PushRequest``, with one copy of the rows."""
    key_bytes = keys_to_proto(keys).SerializeToString()
    head, data, tail = _rows_field(_P_ROWS, rows)
    client = client_id.encode("utf-8")
    rest = tag(_P_MODE, VARINT) + varint(mode)
    rest += len_prefix(_P_CLIENT, len(client)) + client if client else b""
    rest += tag(_P_SEQUENCE, VARINT) + varint(sequence) if sequence else b""
    return b"".join((len_prefix(_P_KEYS, len(key_bytes)), key_bytes, head, data, tail, rest))


@dataclass(frozen=True)
class PushRequest:
    """A decoded ``PushRequest``."""

    keys: NDArray[np.int64]
    rows: Tensor
    mode: int
    client_id: str
    sequence: int


def read_push_request(data: bytes) -> PushRequest:
    """A serialized ``PushRequest`` decoded (rows copied once); ``PSError`` when malformed."""
    try:
        outer = scan(memoryview(data), (_P_MODE, _P_SEQUENCE), (_P_KEYS, _P_ROWS, _P_CLIENT))
        rows = None if outer is None or _P_ROWS not in outer[1] else _read_rows(outer[1][_P_ROWS])
        if outer is None or rows is None or _P_KEYS not in outer[1]:
            msg = pspb.PushRequest.FromString(data)
            return PushRequest(
                keys_from_proto(msg.keys), rows_from_proto(msg.rows), msg.mode, msg.client_id,
                msg.sequence,
            )  # fmt: skip
        values, views = outer
        keys = keys_from_proto(pb.Tensor.FromString(bytes(views[_P_KEYS])))
        client = bytes(views.get(_P_CLIENT, b"")).decode("utf-8")
    except (DecodeError, TensorDecodeError, UnicodeDecodeError) as err:
        raise PSError(f"bad push request: {err}") from None
    return PushRequest(keys, rows, values.get(_P_MODE, 0), client, values.get(_P_SEQUENCE, 0))


def read_pull_response(data: bytes, n: int, width: int) -> tuple[NDArray[np.float32], int]:
    """The rows (float32 [n, width]; a read-only view of ``data`` on the fast path: copy them
    out) and the version of a serialized ``PullResponse``; ``PSError`` for anything else."""
    parsed = _parse_pull(data)
    if parsed is not None:
        (spec, view, compression), version = parsed
        simple = compression in (pb.COMPRESSION_UNSPECIFIED, pb.COMPRESSION_NONE)
        if (
            simple
            and spec.dtype == pb.DTYPE_FLOAT32
            and list(spec.shape) == [n, width]
            and len(view) == n * width * 4
        ):
            return np.frombuffer(view, dtype="<f4").reshape(n, width), version
        try:
            rows = decode_tensor(spec, view, compression)
        except TensorDecodeError as err:
            raise PSError(f"bad pull response: {err}") from None
    else:
        try:
            reply = pspb.PullResponse.FromString(data)
            rows, version = rows_from_proto(reply.rows), reply.version
        except (DecodeError, TensorDecodeError) as err:
            raise PSError(f"bad pull response: {err}") from None
    if rows.dtype != torch.float32 or tuple(rows.shape) != (n, width):
        raise PSError(
            f"pull response rows are {rows.dtype} {list(rows.shape)}, expected float32 {[n, width]}"
        )
    return rows.numpy(), version


def _parse_pull(data: bytes) -> tuple[tuple[pb.TensorSpec, memoryview, int], int] | None:
    """(the rows' ``_tensor_parts``, version) of a plain ``PullResponse``, else None."""
    outer = scan(memoryview(data), (_VERSION,), (_ROWS,))
    if outer is None or _ROWS not in outer[1]:
        return None
    parts = _tensor_parts(outer[1][_ROWS])
    return None if parts is None else (parts, outer[0].get(_VERSION, 0))
