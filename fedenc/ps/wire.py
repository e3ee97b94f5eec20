"""Keys and rows on the wire, through fedenc's tensor codec (:mod:`fedenc.protocol.tensors`):
keys are a 1-D int64 ``Tensor`` message, rows a 2-D float32 one."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedenc.proto.fedenc.v1 import tensor_pb2 as pb
from fedenc.protocol.tensors import decode_tensor, tensor_to_proto
from fedenc.ps.table import PSError


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
