"""The trainer with a two-level PS: item embeddings (and the output scoring over them) go
through a :class:`~fedenc.ps.builtin.BuiltinPS` backed by a distributed PS; the dense encoder
stays on the ordinary path (the :class:`~fedenc.training.trainer.Trainer`'s Adam).

Two ways to score, a trade-off between exactness and memory:

* ``full`` (catalogs that fit): the model keeps its whole embedding, which *is* the built-in
  PS's local table (slot = item id). Training is the plain trainer's step (full softmax over
  every item, the trainer's Adam on a dense gradient), equal to it to float rounding (about
  3e-8: the exchanges reorder a few sums), not bit for bit. Its cost: the full softmax's
  gradient touches every row on every batch, so each exchange pushes and pulls the whole table.
* ``sampled`` (catalogs larger than the trainer's memory): the model has no item table; each
  batch resolves the rows it touches (its clicked items, its targets and ``negatives`` items
  drawn uniformly from the catalog), pulls those the built-in PS lacks, and scores sessions
  against exactly those rows (softmax over targets + in-batch items + sampled negatives). Memory
  is ``capacity`` rows, whatever the catalog; exchanges move only touched rows. Its cost: the
  loss is a sampled estimate of the full softmax (uniform negatives, no log-Q correction), so it
  learns more slowly per sample and ranks popular items somewhat differently; evaluation still
  ranks the whole catalog, streamed from the distributed PS in chunks. Rows are updated by a
  lazy row Adam (only touched rows move; each row keeps its own step count), dense parameters
  by the trainer's Adam; model selection on validation restores the dense encoder only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedenc.data.batching import SessionBatch
from fedenc.data.sessions import Examples
from fedenc.encoders.base import SessionEncoder
from fedenc.encoders.layers.ranking import count_ranks
from fedenc.ps.builtin import BuiltinPS
from fedenc.ps.optimizers import RowOptimizer, RowOptimizerConfig
from fedenc.ps.service import DistributedPS
from fedenc.training.config import TrainConfig
from fedenc.training.metrics import RankingAccumulator
from fedenc.training.progress import TrainingProgress
from fedenc.training.trainer import FitResult, Trainer

SCORINGS = ("full", "sampled")


@dataclass(frozen=True)
class PSConfig:
    """How a trainer uses the two-level PS."""

    exchange_every: int = 0  # training samples between exchanges; 0 = end of round only
    scoring: str = "full"  # full | sampled (see the module docstring)
    negatives: int = 256  # sampled: catalog items drawn per batch
    capacity: int = 20000  # sampled: rows the built-in PS holds
    eval_chunk: int = 16384  # sampled evaluation: catalog rows scored at once

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"PS scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if self.exchange_every < 0 or self.negatives < 0 or self.capacity < 1:
            raise ValueError(f"bad PS config: {self}")


class BatchRows(nn.Module):
    """Stands in for the item embedding in ``sampled`` mode: looks ids up in the rows the
    current batch resolved (``current``, row 0 = padding); holds no parameter."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.current = torch.zeros(1, width)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.current, padding_idx=0)


def attach_sampled_embedding(model: SessionEncoder) -> SessionEncoder:
    """Replace ``model``'s item table by :class:`BatchRows` (frees the table's memory)."""
    model.embedding = BatchRows(model.config.hidden)  # type: ignore[assignment]
    return model


class PSTrainer(Trainer):
    """:class:`Trainer` whose item rows live in a two-level PS (see the module docstring)."""

    def __init__(
        self,
        model: SessionEncoder,
        config: TrainConfig | None,
        remote: DistributedPS,
        ps: PSConfig,
        preload: bool = True,
        owns_remote: bool = False,
    ) -> None:
        """``preload = False``: in ``full`` mode, leave the rows to the owner to load before
        use (see :class:`~fedenc.ps.builtin.BuiltinPS`). ``owns_remote``: :meth:`close` closes
        ``remote`` too (a client this trainer was built with, not a table shared with others)."""
        self.ps_config = ps
        self.owns_remote = owns_remote
        self.sampled = ps.scoring == "sampled"
        if self.sampled and not isinstance(model.embedding, BatchRows):
            attach_sampled_embedding(model)
        super().__init__(model, config)
        if self.device.type != "cpu":
            raise ValueError("the two-level PS trainer runs on the CPU for now")
        if self.sampled:
            values = torch.zeros(ps.capacity + 1, remote.width)
            self.builtin = BuiltinPS(remote, values, exchange_every=ps.exchange_every)
            self.rows_opt = RowOptimizer(
                RowOptimizerConfig("adam", lr=self.config.lr), ps.capacity + 1, remote.width
            )
            self.builtin.on_evict.append(self.rows_opt.reset)
        else:
            weight = model.embedding.weight
            self.builtin = BuiltinPS(
                remote, weight, exchange_every=ps.exchange_every, identity=True, load=preload
            )
        self.remote = remote
        self.flush_after_epoch = ps.exchange_every == 0
        self.neg_gen = torch.Generator().manual_seed(self.config.seed)

    def close(self) -> None:
        """Also close the distributed PS's client when this trainer owns it (its channels and
        thread pool would otherwise outlive the job)."""
        super().close()
        if self.owns_remote:
            self.owns_remote = False
            self.remote.close()

    # -- sampled mode: the first trainer ------------------------------------------------------

    def _resolve(self, batch: SessionBatch, training: bool) -> tuple[SessionBatch, Tensor, Tensor]:
        """Resolve the batch's rows: (batch over local ids, the keys, their slots)."""
        parts = [batch.nodes[batch.node_mask]]
        if training:
            parts.append(batch.targets[batch.targets > 0])
            if self.ps_config.negatives:
                parts.append(
                    torch.randint(
                        1,
                        self.remote.num_keys,
                        (self.ps_config.negatives,),
                        generator=self.neg_gen,
                    )
                )
        keys = torch.unique(torch.cat(parts))
        slots = self.builtin.resolve(keys)

        def local(ids: Tensor) -> Tensor:
            return torch.where(ids > 0, torch.searchsorted(keys, ids) + 1, 0)

        remapped = replace(
            batch,
            items=local(batch.items),
            nodes=local(batch.nodes),
            targets=local(batch.targets) if training else batch.targets,
        )
        return remapped, keys, slots

    def _sampled_loss(self, batch: SessionBatch) -> tuple[Tensor, Tensor, Tensor]:
        remapped, _, slots = self._resolve(batch, training=True)
        rows = self.builtin.values.index_select(0, slots).requires_grad_(True)
        embedding: BatchRows = self.model.embedding  # type: ignore[assignment]
        embedding.current = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])
        session = self.model.scoring_session(self.model.encode(remapped))
        weights = F.normalize(rows, dim=-1) if self.model.config.normalize else rows
        loss = F.cross_entropy(session @ weights.t(), remapped.targets - 1)
        return loss, rows, slots

    # -- training -----------------------------------------------------------------------------

    def train_epoch(
        self, examples: Examples, progress: TrainingProgress | None = None
    ) -> dict[str, float]:
        if len(examples) == 0:
            raise ValueError("no training examples (every session needs at least 2 clicks)")
        self.model.train()
        progress = progress or TrainingProgress(enabled=False)
        total = min(len(examples), self.config.max_examples_per_epoch or len(examples))
        task = progress.start(f"epoch {self.epochs_done + 1}", total)
        loss_sum, seen, t0 = 0.0, 0, time.perf_counter()
        for batch in self.batches(examples, self.config.batch_size, shuffle=True):
            self.optimizer.zero_grad(set_to_none=True)
            if self.sampled:
                loss, rows, slots = self._sampled_loss(batch)
            else:
                loss = self.model.loss(batch)
            value = float(loss.detach())
            if not np.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at example {seen}")
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            if self.sampled:
                # The patent's "gradients update only the touched rows in the built-in PS".
                grad = rows.grad
                assert grad is not None
                with torch.no_grad():
                    if self.config.l2:
                        grad = grad.add(rows.detach(), alpha=self.config.l2)
                    lr = float(self.optimizer.param_groups[0]["lr"])
                    self.rows_opt.step(self.builtin.values, slots, grad, lr=lr)
                self.builtin.mark_touched(slots, batch.size)
            else:
                self.builtin.mark_touched(
                    samples=batch.size
                )  # the full softmax's gradient is dense
            self.builtin.count(batch.size)
            loss_sum += value * batch.size
            seen += batch.size
            progress.advance(task, batch.size, seen / (time.perf_counter() - t0), loss_sum / seen)
        if self.flush_after_epoch:
            self.builtin.flush()
        self.scheduler.step()
        self.epochs_done += 1
        seconds = time.perf_counter() - t0
        return {
            "loss": loss_sum / seen,
            "pairs": seen,
            "seconds": seconds,
            "pairs_per_s": seen / seconds,
        }

    def fit(
        self,
        train: Examples,
        valid: Examples | None,
        test: Examples | None = None,
        progress: TrainingProgress | None = None,
    ) -> FitResult:
        """:meth:`Trainer.fit`, then the last partial window is flushed. In ``full`` mode the
        selected epoch's table is what the distributed PS ends with."""
        result = super().fit(train, valid, test, progress)
        if not self.sampled:
            self.builtin.mark_touched()
        self.builtin.flush()
        return result

    # -- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, examples: Examples, progress: TrainingProgress | None = None, label: str = "eval"
    ) -> dict[str, float]:
        if not self.sampled:
            return super().evaluate(examples, progress, label)
        # Rank every catalog item: sessions are encoded from the rows they click, then the
        # catalog is streamed from the distributed PS chunk by chunk, with this trainer's
        # changes since the last exchange laid over it: the rows a flush would leave, without
        # pushing outside the exchange window.
        self.model.eval()
        t0 = time.perf_counter()
        sessions: list[Tensor] = []
        targets: list[Tensor] = []
        embedding: BatchRows = self.model.embedding  # type: ignore[assignment]
        for batch in self.batches(examples, self.config.eval_batch_size, shuffle=False):
            remapped, _, slots = self._resolve(batch, training=False)
            rows = self.builtin.values.index_select(0, slots)
            embedding.current = torch.cat([rows.new_zeros(1, rows.shape[1]), rows])
            sessions.append(self.model.scoring_session(self.model.encode(remapped)))
            targets.append(batch.targets)
        acc = RankingAccumulator(ks=self.config.ks)
        if not sessions:
            return acc.result()
        s_all, t_all = torch.cat(sessions), torch.cat(targets)
        norm = self.model.config.normalize
        pending = self.builtin.pending()

        def current(keys: np.ndarray) -> Tensor:
            rows = self._current_rows(keys, pending)
            return F.normalize(rows, dim=-1) if norm else rows

        t_score = (s_all * current(t_all.numpy())).sum(1)
        n, chunk = self.remote.num_keys, self.ps_config.eval_chunk

        def blocks() -> Iterator[tuple[int, Tensor]]:  # item i is key i + 1; pulled lazily
            for lo in range(1, n, chunk):
                yield lo - 1, current(np.arange(lo, min(lo + chunk, n), dtype=np.int64))

        limit = max(self.config.ks, default=None)
        acc.update(count_ranks(s_all, t_score, t_all - 1, blocks(), n - 1, limit))
        out = acc.result()
        out["pairs_per_s"] = acc.count / max(time.perf_counter() - t0, 1e-9)
        return out

    def item_table(self) -> nn.Embedding:
        """The whole item table as the distributed PS holds it with this trainer's pending
        changes, pulled in chunks: what a checkpoint saves in place of sampled mode's
        parameterless :class:`BatchRows`."""
        pending = self.builtin.pending()
        n, chunk = self.remote.num_keys, self.ps_config.eval_chunk
        table = torch.empty(n, self.remote.width)
        with torch.no_grad():
            for lo in range(0, n, chunk):
                keys = np.arange(lo, min(lo + chunk, n), dtype=np.int64)
                table[lo : lo + chunk] = self._current_rows(keys, pending)
        return nn.Embedding(n, self.remote.width, padding_idx=0, _weight=table)

    def _current_rows(self, keys: np.ndarray, pending: tuple[np.ndarray, Tensor]) -> Tensor:
        """The distributed PS's rows of ``keys`` with ``pending`` (:meth:`BuiltinPS.pending`)
        laid over them: the rows a flush would leave, without pushing."""
        rows = self.remote.pull(keys)
        pending_keys, pending_delta = pending
        if pending_keys.size:
            at = np.minimum(np.searchsorted(pending_keys, keys), pending_keys.size - 1)
            hit = np.flatnonzero(pending_keys[at] == keys)
            rows[torch.from_numpy(hit)] += pending_delta[torch.from_numpy(at[hit])]
        return rows

    def ps_stats(self) -> dict[str, Any]:
        return {"scoring": self.ps_config.scoring, **self.builtin.stats.to_dict()}
