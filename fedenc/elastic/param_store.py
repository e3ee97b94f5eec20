"""The data server's parameter store: the model's parameters in a table of the distributed PS
(:mod:`fedenc.ps`), so they live where the PS keeps them (in process, or on gRPC shards) with
its snapshots.

The float32 parameters, concatenated in the model's order, fill rows of ``width`` values (the
last one zero-padded) under keys ``1..rows`` (key 0 is the PS's padding row). Each optimizer step
overwrites them (``PUSH_MODE_OVERWRITE``: the data server's optimizer is the one that steps, the
PS only stores); computing servers are served what a pull returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedenc.elastic.common import ElasticError
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.service import DistributedPS
from fedenc.ps.table import TableSpec

DEFAULT_WIDTH = 1024


class ParameterStore:
    """Named float32 tensors of fixed shapes, stored in a PS table."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, ...]],
        *,
        width: int = DEFAULT_WIDTH,
        ps: DistributedPS | None = None,
        snapshot_dir: Path | None = None,
    ) -> None:
        self.shapes = dict(shapes)
        self.sizes = [math.prod(s) for s in self.shapes.values()]
        self.total = sum(self.sizes)
        self.rows = max(1, math.ceil(self.total / width))
        self.width = width
        if ps is None:
            ps = InProcessPS(TableSpec(num_keys=self.rows + 1, width=width), snapshot_dir)
        elif ps.num_keys < self.rows + 1 or ps.width != width:
            raise ElasticError(
                f"the PS table has {ps.num_keys} keys of width {ps.width}; the model needs "
                f"{self.rows + 1} keys of width {width}"
            )
        self.ps = ps
        self.keys = np.arange(1, self.rows + 1, dtype=np.int64)

    def write(self, params: Mapping[str, Tensor]) -> None:
        if list(params) != list(self.shapes):
            raise ElasticError(f"parameters {list(params)} do not match {list(self.shapes)}")
        flat = torch.zeros(self.rows * self.width, dtype=torch.float32)
        torch.cat(
            [p.detach().reshape(-1).float().cpu() for p in params.values()], out=flat[: self.total]
        )
        self.ps.push(self.keys, flat.view(self.rows, self.width), overwrite=True)

    def read(self) -> dict[str, Tensor]:
        flat = self.ps.pull(self.keys).reshape(-1)[: self.total]
        parts = torch.split(flat, self.sizes)
        return {
            name: part.view(shape)
            for (name, shape), part in zip(self.shapes.items(), parts, strict=True)
        }
