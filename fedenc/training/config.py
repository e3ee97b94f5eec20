"""Local training settings (SR-GNN's defaults, all overridable)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

MAX_EPOCHS = 10_000
MAX_BATCH = 1_000_000


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
    plan: str = "default"  # execution plan: default (plain loop) | auto | a name (fedenc.planner)

    def __post_init__(self) -> None:
        self.ks = tuple(self.ks)
        problems = []
        # Upper bounds far above any real run, so that a typo (or a remote job spec) fails here
        # rather than as a job that never ends or an allocation no machine has.
        if not 1 <= self.epochs <= MAX_EPOCHS:
            problems.append(f"epochs must lie in 1..{MAX_EPOCHS} (got {self.epochs})")
        for name in ("batch_size", "eval_batch_size"):
            if not 1 <= getattr(self, name) <= MAX_BATCH:
                problems.append(f"{name} must lie in 1..{MAX_BATCH} (got {getattr(self, name)})")
        if not 0 < self.lr < math.inf:
            problems.append(f"lr must be a finite number > 0 (got {self.lr})")
        if not 0 <= self.l2 < math.inf:
            problems.append(f"l2 must be a finite number >= 0 (got {self.l2})")
        if not 0 < self.lr_decay_rate <= 1:
            problems.append(f"lr_decay_rate must lie in (0, 1] (got {self.lr_decay_rate})")
        for name in ("lr_decay_step", "patience", "max_examples_per_epoch", "num_threads"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not self.ks or min(self.ks) < 1:
            problems.append(f"ks must be positive cut-offs (got {self.ks})")
        else:
            selectable = [f"{m}@{k}" for k in self.ks for m in ("recall", "mrr")]
            if self.select_metric not in selectable:
                problems.append(
                    f"select_metric must be one of {selectable} (got {self.select_metric!r})"
                )
        if self.plan not in ("default", "auto"):
            from fedenc.planner.spec import PlanError, PlanSpec

            try:
                PlanSpec.parse(self.plan)
            except PlanError as err:
                problems.append(str(err))
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
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    if dev.type not in {"cpu", "cuda"}:
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return dev
