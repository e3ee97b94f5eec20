"""The local trainer: SR-GNN's recipe (Adam, step LR decay, L2, full-softmax cross-entropy) with
validation-based model selection, reused by every child node.

The hot path is kept tight: batches come from the vectorised graph builder (on the training device,
so a GPU is not starved by host-side graph building), evaluation runs under ``torch.no_grad()`` and
ranks targets with one comparison pass instead of a sort.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedenc.data.batching import SessionBatch, build_batch
from fedenc.data.sessions import Examples
from fedenc.encoders.base import SessionEncoder
from fedenc.training.allocator import tune_allocator
from fedenc.training.config import TrainConfig, resolve_device
from fedenc.training.metrics import RankingAccumulator
from fedenc.training.order import EpochOrder
from fedenc.training.progress import TrainingProgress
from fedenc.training.table_adam import TableAdam, deferring_table

if TYPE_CHECKING:
    from fedenc.planner.plan import PlanChoice, PlannedSteps


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] | None = None
    train_seconds: float = 0.0
    #: Why training ended before its epochs (an interrupt, a non-finite loss); None: it did not.
    stopped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_valid": self.best_valid,
            "test": self.test,
            "train_seconds": self.train_seconds,
            "stopped": self.stopped,
        }


def training_step(
    model: SessionEncoder, optimizer: torch.optim.Optimizer, batch: SessionBatch, seen: int = 0
) -> float:
    """One step of the plain loop: the batch's loss, its gradients and the optimizer's update;
    returns the loss. A :class:`TableAdam` takes the item table's gradient deferred. A loss
    that is not finite raises before any parameter changes (``seen``: examples so far, for the
    message)."""
    optimizer.zero_grad(set_to_none=True)
    with deferring_table(optimizer, model.embedding.weight):
        loss = model.loss(batch)
        value = float(loss.detach())
        if not np.isfinite(value):  # checked before the step: the parameters stay usable
            raise FloatingPointError(f"training loss became {value} at example {seen}")
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return value


class Trainer:
    """Trains one encoder, keeping optimizer and RNG across calls (a child's state over rounds)."""

    def __init__(self, model: SessionEncoder, config: TrainConfig | None = None) -> None:
        self.config = config or TrainConfig()
        tune_allocator()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.device = resolve_device(self.config.device)
        self.model = model.to(self.device)
        # The fused kernel makes one pass over each parameter: on a 43k x 100 embedding whose
        # gradient is dense (full-softmax scoring) it is several times faster than foreach.
        # TableAdam is that Adam, which also takes the table's gradient from the native loss
        # kernels without its being written out (.table_adam).
        self.optimizer = TableAdam(
            self.model.parameters(),
            lr=self.config.lr,
            weight_decay=self.config.l2,
            fused=True,
            table=getattr(self.model.embedding, "weight", None),
        )
        step = self.config.lr_decay_step or 10**9
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=step, gamma=self.config.lr_decay_rate
        )
        self.rng = np.random.default_rng(self.config.seed)
        self.epoch_order = EpochOrder(self.rng)
        self.epochs_done = 0
        self.plan: PlanChoice | None = None  # chosen on the first epoch (needs the data)
        self._planned: PlannedSteps | None = None
        if self.config.plan not in ("default", "auto"):
            self._check_plan_override()

    # -- the execution plan (fedenc.planner) ----------------------------------------------------
    def _check_plan_override(self) -> None:
        """Refuse a named plan this machine or model cannot run, before any training."""
        from fedenc.planner.spec import PlanError, PlanSpec, cuda_available, machine_cores

        spec = PlanSpec.parse(self.config.plan)
        spec.check(
            machine_cores(), self.model.config.num_items, self.config.batch_size, cuda_available()
        )
        if self.config.device == "cpu" and spec.device == "cuda":
            raise PlanError(f"plan {spec.name!r} refused: it runs on the GPU and device is cpu")

    def prepare_plan(
        self, examples: Examples, log: Callable[[str], None] | None = None
    ) -> PlanChoice:
        """Choose the plan for ``config.plan`` (profiling on a copy of the model when the
        machine's cost cache lacks it), log it and why, and set the training steps up for it."""
        from fedenc.planner.plan import PlanChoice, PlannedSteps, Planner

        if self.plan is not None:
            return self.plan
        if self.config.plan == "default":
            choice = PlanChoice("default", None, reason="requested")
        else:
            planner = Planner(
                self.model,
                lambda params: torch.optim.Adam(
                    params, lr=self.config.lr, weight_decay=self.config.l2, fused=True
                ),
                examples,
                self.config.batch_size,
                device=self.config.device,
                seed=self.config.seed,
            )
            choice = planner.choose(self.config.plan, log)
            if choice.spec is not None:
                device = torch.device("cuda" if choice.spec.device == "cuda" else "cpu")
                if device.type != self.device.type:
                    self.model.to(device)  # before the first step: the optimizer has no state
                    self.device = device
                self._planned = PlannedSteps(self.model, self.optimizer, choice, planner.workload)
        if log is not None and self.config.plan != "default":
            for line in choice.explain():
                log(line)
        self.plan = choice
        return choice

    def close(self) -> None:
        """Stop the planned steps' worker threads (the plain loop has none)."""
        if self._planned is not None:
            self._planned.close()
            self._planned = None

    # -- passes -------------------------------------------------------------------------------
    def index_batches(
        self, examples: Examples, batch_size: int, shuffle: bool
    ) -> Iterator[np.ndarray]:
        n = len(examples)
        cap = self.config.max_examples_per_epoch
        order = self.epoch_order.next_epoch(n, cap) if shuffle else np.arange(n)
        for lo in range(0, order.size, batch_size):
            yield order[lo : lo + batch_size]

    def batches(self, examples: Examples, batch_size: int, shuffle: bool) -> Iterator[SessionBatch]:
        for index in self.index_batches(examples, batch_size, shuffle):
            yield build_batch(examples, index, self.device)

    def train_epoch(
        self, examples: Examples, progress: TrainingProgress | None = None
    ) -> dict[str, float]:
        """One pass over ``examples`` in the seeded order; returns the epoch's mean loss and
        its speed (``loss``, ``pairs_per_s``, ...)."""
        if len(examples) == 0:
            raise ValueError("no training examples (every session needs at least 2 clicks)")
        self.model.train()
        progress = progress or TrainingProgress(enabled=False)
        total = min(len(examples), self.config.max_examples_per_epoch or len(examples))
        task = progress.start(f"epoch {self.epochs_done + 1}", total)
        self.prepare_plan(examples, progress.log)
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        if self._planned is not None:
            indices = self.index_batches(examples, self.config.batch_size, shuffle=True)
            for size, value in self._planned.run(examples, indices):
                loss_sum += value * size
                seen += size
                progress.advance(task, size, seen / (time.perf_counter() - t0), loss_sum / seen)
        for batch in self._plain_batches(examples):
            value = training_step(self.model, self.optimizer, batch, seen)
            loss_sum += value * batch.size
            seen += batch.size
            progress.advance(task, batch.size, seen / (time.perf_counter() - t0), loss_sum / seen)
        self.scheduler.step()
        self.epochs_done += 1
        seconds = time.perf_counter() - t0
        return {
            "loss": loss_sum / seen,
            "pairs": seen,
            "seconds": seconds,
            "pairs_per_s": seen / seconds,
        }

    def _plain_batches(self, examples: Examples) -> Iterator[SessionBatch]:
        if self._planned is not None:
            return iter(())
        return self.batches(examples, self.config.batch_size, shuffle=True)

    @torch.no_grad()
    def evaluate(
        self, examples: Examples, progress: TrainingProgress | None = None, label: str = "eval"
    ) -> dict[str, float]:
        """Recall@K / MRR@K (percent) ranking every catalog item."""
        self.model.eval()
        progress = progress or TrainingProgress(enabled=False)
        task = progress.start(label, len(examples))
        acc = RankingAccumulator(ks=self.config.ks)
        t0 = time.perf_counter()
        with self.model.frozen_scoring():
            for batch in self.batches(examples, self.config.eval_batch_size, shuffle=False):
                acc.update(self.model.rank_targets(batch, limit=max(self.config.ks, default=None)))
                rate = acc.count / (time.perf_counter() - t0)
                progress.advance(task, batch.size, rate, float("nan"))
        out = acc.result()
        out["pairs_per_s"] = acc.count / max(time.perf_counter() - t0, 1e-9)
        return out

    # -- the whole recipe ---------------------------------------------------------------------
    def fit(
        self,
        train: Examples,
        valid: Examples | None,
        test: Examples | None = None,
        progress: TrainingProgress | None = None,
    ) -> FitResult:
        """Train ``epochs`` epochs, keep the epoch best on validation, report test once at the end.

        Without a validation set the last epoch is kept. Test data never influences selection.

        An interrupt (Ctrl-C) or a non-finite loss in a later epoch ends training there with
        the epochs done so far: the best of them is kept and ``stopped`` says why (no test
        after an interrupt). Before the first epoch is complete they propagate.
        """
        torch.manual_seed(self.config.seed)
        progress = progress or TrainingProgress(enabled=False)
        result = FitResult()
        best_score, best_state, stale = -1.0, None, 0
        t0 = time.perf_counter()
        interrupted = False
        for epoch in range(1, self.config.epochs + 1):
            row: dict[str, float] = {
                "epoch": float(epoch),
                "lr": self.optimizer.param_groups[0]["lr"],
            }
            try:
                row.update({f"train_{k}": v for k, v in self.train_epoch(train, progress).items()})
            except (KeyboardInterrupt, FloatingPointError) as err:
                if not result.history:
                    raise
                interrupted = isinstance(err, KeyboardInterrupt)
                result.stopped = (
                    f"interrupted in epoch {epoch}" if interrupted else f"epoch {epoch}: {err}"
                )
                progress.log(f"{result.stopped}: keeping the epochs done")
                break
            if valid is not None and len(valid):
                metrics = self.evaluate(valid, progress, label=f"valid {epoch}")
                row.update({f"valid_{k}": v for k, v in metrics.items()})
                score = metrics[self.config.select_metric]
                if score > best_score:
                    best_score, stale = score, 0
                    best_state = copy.deepcopy(self.model.state_dict())
                    result.best_epoch, result.best_valid = epoch, metrics
                else:
                    stale += 1
            result.history.append(row)
            progress.log(_format_epoch(row))
            if self.config.patience and stale >= self.config.patience:
                progress.log(f"no validation gain for {stale} epochs: stopping early")
                break
        result.train_seconds = time.perf_counter() - t0
        if best_state is not None:
            self.model.load_state_dict(best_state)
        else:
            result.best_epoch = len(result.history)
        if test is not None and len(test) and not interrupted:
            result.test = self.evaluate(test, progress, label="test")
            progress.log(
                f"test (epoch {result.best_epoch}): "
                + ", ".join(f"{k} {v:.2f}" for k, v in result.test.items() if "@" in k)
            )
        return result


def _format_epoch(row: dict[str, float]) -> str:
    parts = [f"epoch {int(row['epoch'])}", f"loss {row['train_loss']:.4f}"]
    parts.append(f"{row['train_pairs_per_s']:.0f} pairs/s")
    parts += [f"{k[6:]} {v:.2f}" for k, v in row.items() if k.startswith("valid_") and "@" in k]
    return " | ".join(parts)
