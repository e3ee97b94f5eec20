"""Flower ``Array`` <-> torch tensor, with as few copies as the layout allows.

Flower stores a NumPy array as ``np.save`` bytes. Reading one back with ``Array.numpy()`` copies
the data; a received parameter set is only ever read (fused, or copied into a model), so a view
on those bytes does, and on a 1 GiB reply it saves a 1 GiB copy and its memory.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
from flwr.app import Array

__all__ = ["array_over", "array_to_tensor", "npy_header", "tensor_to_array"]


def array_to_tensor(array: Array) -> torch.Tensor:
    """The tensor held by a Flower ``Array``, without copying its data when it can be viewed.

    Flower stores a NumPy array as ``np.save`` bytes; this reads the ``.npy`` header and views the
    rest (read-only: the tensor must not be written to). Other layouts (Fortran order, non-native
    byte order, another ``stype``) go through ``Array.numpy()`` (one copy).
    """
    if array.stype == "numpy.ndarray":
        data = array.data
        buf = io.BytesIO(data)
        try:
            version = np.lib.format.read_magic(buf)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
        except ValueError:
            shape, fortran, dtype = (), True, np.dtype(object)  # let numpy() say what is wrong
        if not fortran and not dtype.hasobject and dtype.isnative:
            count = math.prod(shape)
            view = np.frombuffer(data, dtype=dtype, count=count, offset=buf.tell())
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                return torch.from_numpy(view.reshape(shape))
    values = array.numpy()
    if values.dtype.byteorder not in ("=", "|"):  # torch takes native byte order only
        values = values.astype(values.dtype.newbyteorder("="))
    return torch.from_numpy(np.ascontiguousarray(values))


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` (version 1.0) header ``np.save`` writes for a C-order array."""
    out = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(dtype)
    header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


def tensor_to_array(t: torch.Tensor) -> Array:
    """A Flower ``Array`` (``.npy`` bytes, as ``Array(ndarray)`` makes) from a CPU tensor, with
    one copy of the data instead of ``np.save``'s several."""
    values = t.numpy()
    shape = tuple(int(d) for d in values.shape)
    raw = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    data = b"".join((npy_header(values.dtype, shape), raw.data))
    return Array(dtype=str(values.dtype), shape=shape, stype="numpy.ndarray", data=data)


def array_over(buffer: bytearray, dtype: np.dtype, shape: tuple[int, ...]) -> Array:
    """A Flower ``Array`` whose data *is* ``buffer`` (``npy_header(dtype, shape)`` then the
    values), without a copy: how a received tensor becomes an Array (``buffer`` is handed over).

    Flower checks for ``bytes`` only in the constructor; everything that reads an Array
    (``numpy()``, ``count_bytes()``, :func:`array_to_tensor`) takes any buffer.
    """
    array = Array(dtype=str(dtype), shape=tuple(shape), stype="numpy.ndarray", data=b"")
    array.data = buffer  # type: ignore[assignment]
    return array
