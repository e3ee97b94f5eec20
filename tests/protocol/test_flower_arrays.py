"""Flower Array <-> tensor: views where the layout allows, the same values either way."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedenc.federation.records import record_to_params
from fedenc.protocol.flower_arrays import array_to_tensor, tensor_to_array


def _inside(tensor: torch.Tensor, data: bytes) -> bool:
    start = np.frombuffer(data, dtype=np.uint8).ctypes.data
    return start <= tensor.data_ptr() < start + len(data)


def test_a_native_c_order_array_is_viewed_not_copied() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    array = Array(values)
    tensor = array_to_tensor(array)
    assert torch.equal(tensor, torch.from_numpy(values))
    assert _inside(tensor, array.data)  # a view on the Array's own bytes


def test_other_layouts_are_copied_with_the_same_values() -> None:
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    swapped = np.arange(4, dtype=">f4")
    assert torch.equal(
        array_to_tensor(Array(fortran)), torch.from_numpy(np.ascontiguousarray(fortran))
    )
    assert array_to_tensor(Array(swapped)).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_tensor_to_array_makes_the_bytes_flower_makes() -> None:
    values = np.linspace(0, 1, 10, dtype=np.float32).reshape(2, 5)
    assert tensor_to_array(torch.from_numpy(values.copy())).data == Array(values).data


def test_record_to_params_gives_read_only_views() -> None:
    record = ArrayRecord({"w": Array(np.ones((2, 2), dtype=np.float32))})
    params = record_to_params(record, "child-0")
    assert torch.equal(params["w"], torch.ones(2, 2))
    assert _inside(params["w"], record["w"].data)
