"""Local training settings (SR-GNN's defaults, all overridable)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay_step: int = 3  # epochs between LR decays (StepLR), 0 = never
    lr_decay_rate: float = 0.1
    l2: float = 1e-5  # Adam weight decay, as in SR-GNN
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 500
    ks: tuple[int, ...] = (20, 10)
    select_metric: str = "recall@20"  # validation metric that picks the best epoch
    patience: int = 0  # stop after this many epochs without validation gain (0 = off)
    max_examples_per_epoch: int = 0  # 0 = all; a cap for quick runs
    num_threads: int = 0  # torch intra-op threads (0 = torch's default)

    def __post_init__(self) -> None:
        self.ks = tuple(self.ks)
        problems = []
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            problems.append("batch sizes must be >= 1")
        if not self.lr > 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.l2 < 0 or self.lr_decay_step < 0 or not 0 < self.lr_decay_rate <= 1:
            problems.append("l2 and lr_decay_step must be >= 0, lr_decay_rate in (0, 1]")
        if not self.ks or min(self.ks) < 1:
            problems.append(f"ks must be positive cut-offs (got {self.ks})")
        if problems:
            raise ValueError("bad training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ks"] = list(self.ks)
        return d


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    if dev.type not in {"cpu", "cuda"}:
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return dev
