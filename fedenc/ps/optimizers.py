"""Row optimizers: how a shard applies a pushed delta to its rows.

A push carries **deltas**: the client's local change of each row since it last pulled it. The
shard treats ``g = -delta`` as the row's gradient and applies its optimizer to the pushed rows
only (rows not pushed keep their values *and* their optimizer state):

* ``sgd``:      ``w -= lr * g``; with the default ``lr = 1`` that is ``w += delta``, the plain
  sum of everybody's changes (what placement (a), one trainer per PS, wants: the shard ends up
  exactly where the trainer was);
* ``adagrad``:  ``acc += g²; w -= lr * g / (√acc + eps)``;
* ``adam``:     Adam with one step counter per row, so a rarely pushed row gets the bias
  correction of its own few steps, not of the table's (the "lazy Adam" of sparse embeddings).

State lives in tensors indexed like the shard's rows, so a snapshot saves it with the values.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from fedenc.proto.fedenc.v1 import parameter_server_pb2 as pspb

OPTIMIZERS = ("sgd", "adagrad", "adam")
_DEFAULT_LR = {"sgd": 1.0, "adagrad": 0.1, "adam": 1e-3}
PROTO_OPTIMIZER = {
    "sgd": pspb.ROW_OPTIMIZER_SGD,
    "adagrad": pspb.ROW_OPTIMIZER_ADAGRAD,
    "adam": pspb.ROW_OPTIMIZER_ADAM,
}


@dataclass(frozen=True)
class RowOptimizerConfig:
    """Which optimizer and its hyper-parameters; ``lr = 0`` means the optimizer's default."""

    name: str = "sgd"
    lr: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    initial_accumulator: float = 0.0  # adagrad

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"row optimizer must be one of {OPTIMIZERS}, got {self.name!r}")
        problems = []
        if not 0 <= self.lr < math.inf:
            problems.append(f"lr must be a finite number >= 0 (0 = the default), got {self.lr}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not 0 < self.eps < math.inf:
            problems.append(f"eps must be a finite number > 0, got {self.eps}")
        if not 0 <= self.initial_accumulator < math.inf:
            problems.append(
                f"initial_accumulator must be a finite number >= 0, got {self.initial_accumulator}"
            )
        if problems:
            raise ValueError(f"row optimizer {self.name}: {'; '.join(problems)}")

    @property
    def learning_rate(self) -> float:
        return self.lr or _DEFAULT_LR[self.name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RowOptimizer:
    """Applies deltas to rows ``index`` of ``values`` and keeps the optimizer state of every row."""

    def __init__(self, config: RowOptimizerConfig, rows: int, width: int) -> None:
        self.config = config
        self.state: dict[str, Tensor] = {}
        if config.name == "adagrad":
            self.state["acc"] = torch.full((rows, width), config.initial_accumulator)
        elif config.name == "adam":
            self.state["m"] = torch.zeros(rows, width)
            self.state["v"] = torch.zeros(rows, width)
            self.state["step"] = torch.zeros(rows, dtype=torch.int64)

    def apply(self, values: Tensor, index: Tensor, delta: Tensor) -> None:
        """``values[index]`` updated from pushed deltas (one row per index, indices unique)."""
        if self.config.name == "sgd":
            values.index_add_(0, index, delta, alpha=self.config.learning_rate)
        else:
            self.step(values, index, delta.neg())

    def step(self, values: Tensor, index: Tensor, g: Tensor, lr: float | None = None) -> None:
        """One optimizer step of rows ``index`` with gradient ``g`` (``lr`` overrides)."""
        c = self.config
        lr = c.learning_rate if lr is None else lr
        if c.name == "sgd":
            values.index_add_(0, index, g, alpha=-lr)
            return
        if c.name == "adagrad":
            acc = self.state["acc"]
            a = acc.index_select(0, index).addcmul_(g, g)
            acc.index_copy_(0, index, a)
            values.index_add_(0, index, g / a.sqrt_().add_(c.eps), alpha=-lr)
            return
        m, v, step = self.state["m"], self.state["v"], self.state["step"]
        t = step.index_select(0, index) + 1
        step.index_copy_(0, index, t)
        mi = m.index_select(0, index).mul_(c.beta1).add_(g, alpha=1 - c.beta1)
        vi = v.index_select(0, index).mul_(c.beta2).addcmul_(g, g, value=1 - c.beta2)
        m.index_copy_(0, index, mi)
        v.index_copy_(0, index, vi)
        tf = t.to(values.dtype)[:, None]
        m_hat = mi / (1 - c.beta1**tf)
        v_hat = vi / (1 - c.beta2**tf)
        values.index_add_(0, index, m_hat / v_hat.sqrt_().add_(c.eps), alpha=-lr)

    def reset(self, index: Tensor) -> None:
        """Forget the state of rows ``index`` (their slots now hold other keys)."""
        for name, t in self.state.items():
            fill = self.config.initial_accumulator if name == "acc" else 0
            t.index_fill_(0, index, fill)
