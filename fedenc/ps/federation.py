"""The two-level PS in a federation: placement (a), each child's own distributed PS, and
placement (b), one federation-level distributed PS next to the master.

**(a) ``ps = "local"``.** The item embeddings are a child's local head and never travel; they
live in the child's own distributed PS (in this process, or the gRPC shards listed in
``ps-addresses``) behind the trainer's built-in PS, and only the dense shared encoder is
federated, exactly as without a PS.

**(b) ``ps = "federation"``.** One item table for the whole federation, held by a distributed PS
the master hosts (:class:`FederationTable`: in its process, registered under the job id so that
in-process children reach it, or the gRPC shards of ``ps-addresses`` that master and children
both reach). The dense encoder goes through the usual fusion (``share = "encoder"``). Each round
a child's built-in PS pulls the rows it touches through a :class:`RoundView` (the federation
table as the round found it, plus the child's own pending deltas); its exchanges push into the
view, never into the table; the train reply carries the round's
:class:`~fedenc.ps.sparse.SparseRows` (keys, deltas, and each row's samples in the child's
data), and the master fuses them row by row with the job's rule
(:class:`~fedenc.ps.sparse.RowFusion`) and applies the result to the table once the round is
over. The table therefore changes only between rounds. Evaluation ranks the whole catalog
against the current table: the child drops its stale rows and pulls what it scores (in
``sampled`` mode it streams the catalog in chunks, so nothing catalog-sized crosses the
messages; the rows it pulls are reported as ``ps-rows-pulled``).

Run-config keys (all optional): ``ps`` ("" = off, "local", "federation"),
``ps-exchange-every`` (samples; 0 = at the end of each round), ``ps-scoring`` (full | sampled),
``ps-negatives``, ``ps-capacity``, ``ps-shards`` (in-process shards), ``ps-addresses``
(comma-separated shard addresses, plaintext; shard i at position i), ``ps-pad-rows`` (placement
b: random extra rows per reply, see :func:`~fedenc.ps.sparse.pad_rows` and docs/ps.md).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from fedenc.encoders.base import SessionEncoder
from fedenc.federation.runconfig import get_int, get_str
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.service import DistributedPS
from fedenc.ps.sparse import SparseRows, pad_rows
from fedenc.ps.table import PSError, TableSpec, as_keys, check_push
from fedenc.ps.trainer import PSConfig, PSTrainer
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer

PLACEMENTS = ("", "local", "federation")


def placement_of(rc: Mapping[str, Any]) -> str:
    """The run config's PS placement ("" = no PS); ``ValueError`` for an unknown one."""
    placement = get_str(rc, "ps", "")
    if placement not in PLACEMENTS:
        raise ValueError(f"ps must be one of {PLACEMENTS} ('' = off), got {placement!r}")
    return placement


def ps_config_from_run_config(rc: Mapping[str, Any]) -> PSConfig | None:
    """The child's PS settings, or None when the job runs without a PS."""
    if not placement_of(rc):
        return None
    if get_int(rc, "ps-pad-rows", 0) < 0:
        raise ValueError(f"ps-pad-rows must be >= 0, got {get_int(rc, 'ps-pad-rows', 0)}")
    base = PSConfig()
    return PSConfig(
        exchange_every=get_int(rc, "ps-exchange-every", base.exchange_every),
        scoring=get_str(rc, "ps-scoring", base.scoring),
        negatives=get_int(rc, "ps-negatives", base.negatives),
        capacity=get_int(rc, "ps-capacity", base.capacity),
    )


def _addresses(rc: Mapping[str, Any]) -> list[str]:
    return [a.strip() for a in get_str(rc, "ps-addresses", "").split(",") if a.strip()]


def _connect(addresses: list[str], num_keys: int, width: int) -> DistributedPS:
    from fedenc.ps.client import ShardedClient

    client = ShardedClient(addresses)
    if (client.num_keys, client.width) != (num_keys, width):
        client.close()
        raise ValueError(
            f"the PS at {addresses} holds {client.num_keys} x {client.width} rows, the "
            f"encoder needs {num_keys} x {width}"
        )
    return client


def child_remote(rc: Mapping[str, Any], num_keys: int, width: int, seed: int) -> DistributedPS:
    """The child's own distributed PS (placement a): its gRPC shards, or an in-process one."""
    addresses = _addresses(rc)
    if addresses:
        return _connect(addresses, num_keys, width)
    shards = max(1, get_int(rc, "ps-shards", 1))
    return InProcessPS(TableSpec(num_keys, width, num_shards=shards, seed=seed))


# -- placement (b): the federation table -------------------------------------------------------

_tables: dict[str, DistributedPS] = {}
_tables_lock = threading.Lock()


class FederationTable:
    """The master's side of placement (b): the federation's item table in a distributed PS.

    In-process (``ps-shards`` shards) unless ``ps-addresses`` names gRPC shards; an in-process
    table is registered under the job id for the children running in this process. Rows start
    from the PS's seeded initial values (the job seed), the same for every number of shards.
    """

    def __init__(
        self,
        job_id: str,
        num_keys: int,
        width: int,
        seed: int,
        shards: int = 1,
        addresses: str = "",
    ) -> None:
        self.job_id = job_id
        listed = _addresses({"ps-addresses": addresses})
        self.remote: DistributedPS
        if listed:
            self.remote = _connect(listed, num_keys, width)
            self.registered = False
        else:
            spec = TableSpec(num_keys, width, num_shards=max(1, shards), seed=seed)
            self.remote = InProcessPS(spec)
            with _tables_lock:
                if job_id in _tables:
                    raise ValueError(f"a federation table for job {job_id!r} already exists here")
                _tables[job_id] = self.remote
            self.registered = True
        self.rows_applied = 0

    @property
    def num_keys(self) -> int:
        return self.remote.num_keys

    @property
    def width(self) -> int:
        return self.remote.width

    def apply(self, keys: NDArray[np.int64], deltas: Tensor) -> int:
        """Add the fused deltas to their rows (the table's row optimizer; SGD lr 1 = ``+=``)."""
        if keys.size == 0:
            return 0
        applied = self.remote.push(keys, deltas)
        self.rows_applied += applied
        return applied

    def rows(self) -> Tensor:
        """The whole table (for the published checkpoint)."""
        return self.remote.pull(np.arange(self.num_keys, dtype=np.int64))

    def load(self, rows: Tensor) -> None:
        """Overwrite the whole table with ``rows`` (``[num_keys, width]``)."""
        self.remote.push(np.arange(self.num_keys, dtype=np.int64), rows, overwrite=True)

    def close(self) -> None:
        if self.registered:
            with _tables_lock:
                _tables.pop(self.job_id, None)
            self.registered = False
        self.remote.close()


def federation_remote(
    rc: Mapping[str, Any], job_id: str, num_keys: int, width: int
) -> DistributedPS:
    """What a child reads the federation table through: the gRPC shards of ``ps-addresses``, or
    the master's in-process table of job ``job_id``."""
    addresses = _addresses(rc)
    if addresses:
        return _connect(addresses, num_keys, width)
    with _tables_lock:
        table = _tables.get(job_id)
    if table is None:
        raise ValueError(
            f"the federation PS of job {job_id!r} is not in this process (children in worker "
            "processes or on other machines need its gRPC shards in ps-addresses)"
        )
    if (table.num_keys, table.width) != (num_keys, width):
        raise ValueError(
            f"the federation PS holds {table.num_keys} x {table.width} rows, the encoder needs "
            f"{num_keys} x {width}"
        )
    return table


class RoundView:
    """A child's view of the federation table during a round (a :class:`DistributedPS`).

    Reads are the table's rows plus this child's pending deltas (so its built-in PS sees its
    own earlier exchanges); pushes add to the pending deltas and touch counts and never reach
    the table, which only the master changes, between rounds. :meth:`take` hands the round's
    pending rows over as :class:`SparseRows` and starts afresh. Memory: the rows touched.
    """

    def __init__(self, base: DistributedPS) -> None:
        self.base = base
        self.rows_pulled = 0
        self._clear()

    def _clear(self) -> None:
        self._keys = np.zeros(0, np.int64)  # sorted
        self._deltas = torch.zeros(0, self.base.width)
        self._counts = np.zeros(0, np.int64)

    @property
    def num_keys(self) -> int:
        return self.base.num_keys

    @property
    def width(self) -> int:
        return self.base.width

    def pull(self, keys: NDArray[np.int64]) -> Tensor:
        keys = as_keys(keys)
        rows = self.base.pull(keys)
        self.rows_pulled += keys.size
        if self._keys.size and keys.size:
            pos = np.minimum(np.searchsorted(self._keys, keys), self._keys.size - 1)
            hit = self._keys[pos] == keys
            if hit.any():
                at = torch.from_numpy(np.flatnonzero(hit))
                rows.index_add_(0, at, self._deltas[torch.from_numpy(pos[hit])])
        return rows

    def push(self, keys: NDArray[np.int64], rows: Tensor, overwrite: bool = False) -> int:
        if overwrite:
            raise PSError("a child cannot overwrite federation rows; it sends deltas")
        keys = as_keys(keys)
        check_push(keys, rows, self.num_keys, self.width)
        merged = np.union1d(self._keys, keys)
        deltas = torch.zeros(merged.size, self.width)
        counts = np.zeros(merged.size, np.int64)
        old = torch.from_numpy(np.searchsorted(merged, self._keys))
        deltas[old] = self._deltas
        counts[old.numpy()] = self._counts
        deltas.index_add_(0, torch.from_numpy(np.searchsorted(merged, keys)), rows)
        self._keys, self._deltas, self._counts = merged, deltas, counts
        return int(keys.size)

    def count(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """The touch counts of a push (a :attr:`BuiltinPS.on_push` callback)."""
        pos = np.searchsorted(self._keys, keys)
        np.add.at(self._counts, pos, counts.astype(np.int64))

    def take(self) -> SparseRows:
        """The round's rows (a row pushed with a zero count counts 1: it moved), then clear."""
        out = SparseRows(self._keys, self._deltas, np.maximum(self._counts, 1))
        self._clear()
        return out

    def stats(self) -> list[dict[str, Any]]:
        return self.base.stats()

    def snapshot(self) -> list[str]:
        raise PSError("the federation table is snapshotted by its host, not by a child")

    def close(self) -> None:
        self.base.close()


@dataclass
class FederationRole:
    """What a placement (b) child keeps besides its trainer.

    ``row_counts`` (indexed by key): the samples of this child's data that touch each row, the
    same row weights the dense table is fused with (fusion/weighted_sum.py); None = the touch
    counts of the round's training (each row weighted by the trained samples whose batch
    resolved it)."""

    view: RoundView
    pad_rows: int
    rng: np.random.Generator
    row_counts: NDArray[np.int64] | None = None


_roles: weakref.WeakKeyDictionary[Trainer, FederationRole] = weakref.WeakKeyDictionary()


def make_trainer(
    model: SessionEncoder,
    config: TrainConfig,
    rc: Mapping[str, Any],
    seed: int,
    job_id: str = "",
    row_counts: NDArray[np.int64] | None = None,
) -> Trainer:
    """A :class:`PSTrainer` when the run config asks for a PS, else the plain trainer.
    ``row_counts``: placement (b)'s row weights (see :class:`FederationRole`)."""
    ps = ps_config_from_run_config(rc)
    if ps is None:
        return Trainer(model, config)
    num_keys, width = model.config.num_items + 1, model.config.hidden
    view: RoundView | None = None
    remote: DistributedPS
    # A gRPC client is the trainer's own; an in-process table is shared with its host.
    owned = bool(_addresses(rc))
    if placement_of(rc) == "federation":
        view = RoundView(federation_remote(rc, job_id, num_keys, width))
        remote = view
    else:
        remote = child_remote(rc, num_keys, width, seed)
    try:
        if ps.scoring == "full" and view is None:
            # The child's head starts from the rows of the PS (placement b: refresh_rows loads
            # them before every round and evaluation).
            with torch.no_grad():
                model.embedding.weight.copy_(remote.pull(np.arange(remote.num_keys)))
        # Placement b: refresh_rows loads the table before every round and evaluation, so a
        # load now would only pull the whole table once more.
        trainer = PSTrainer(model, config, remote, ps, preload=view is None, owns_remote=owned)
    except BaseException:
        if owned:
            remote.close()
        raise
    trainer.flush_after_epoch = False  # the child flushes at the end of each round
    if view is not None:
        if row_counts is not None and row_counts.shape != (num_keys,):
            raise ValueError(f"row counts for {row_counts.shape} keys, the table has {num_keys}")
        if row_counts is None:  # else take_rows replaces the touch counts by the data's
            trainer.builtin.on_push.append(view.count)
        _roles[trainer] = FederationRole(
            view, get_int(rc, "ps-pad-rows", 0), np.random.default_rng(config.seed), row_counts
        )
    return trainer


def federation_role(trainer: Trainer) -> FederationRole | None:
    """The placement (b) role of a trainer, None for every other trainer."""
    return _roles.get(trainer)


def refresh_rows(trainer: Trainer) -> None:
    """Placement (b), before a round or an evaluation: the table moved since the built-in PS
    last pulled, so drop the rows it holds (``sampled``: they are pulled again when touched)
    or reload them all (``full``: the local table is the model's embedding)."""
    if federation_role(trainer) is None or not isinstance(trainer, PSTrainer):
        return
    builtin = trainer.builtin
    if builtin.identity:
        every = np.arange(1, builtin.values.shape[0], dtype=np.int64)
        builtin._load(every, torch.from_numpy(every))
    else:
        builtin.evict_all()


def end_round(trainer: Trainer) -> dict[str, float]:
    """Flush the round's last partial window; the PS figures for the round's metrics."""
    if not isinstance(trainer, PSTrainer):
        return {}
    if federation_role(trainer) is None:
        trainer.builtin.flush()
    else:
        # Placement b: the last push goes into the round's view; the held rows are dropped (or,
        # in ``full`` mode, reloaded by refresh_rows before they are used again), so pulling
        # them back now would only cost bytes.
        trainer.builtin.flush(pull=False)
        trainer.builtin.evict_all()
    stats = trainer.builtin.stats
    totals = {
        "ps_exchanges": float(stats.exchanges),
        "ps_rows_pushed": float(stats.rows_pushed),
        "ps_rows_pulled": float(stats.rows_pulled),
    }
    # The stats count over the trainer's life; a round reports its own part.
    before: dict[str, float] = getattr(trainer, "_ps_reported", {})
    trainer._ps_reported = totals  # type: ignore[attr-defined]
    return {key: value - before.get(key, 0.0) for key, value in totals.items()}


def take_rows(trainer: Trainer) -> tuple[SparseRows, int] | None:
    """Placement (b), after :func:`end_round`: the round's sparse rows (padded with
    ``ps-pad-rows`` random rows) and the rows pulled from the federation table since the last
    call; None for every other trainer."""
    role = federation_role(trainer)
    if role is None:
        return None
    rows = role.view.take()
    if role.row_counts is not None:
        rows = weigh_by_data(rows, role.row_counts)
    rows = pad_rows(rows, role.pad_rows, role.view.num_keys, role.rng)
    return rows, take_pulled(trainer)


def weigh_by_data(rows: SparseRows, row_counts: NDArray[np.int64]) -> SparseRows:
    """``rows`` weighted by the child's data: each row's count becomes the samples of the
    child's data that touch it, and rows its data never touches are dropped.

    Why: this is the weight the dense table's row-wise FedAvg gives the same row, so placement
    (b) with ``full`` scoring fuses exactly what ``share = all`` fuses. Counting every row a
    full-softmax batch moved instead gives a child that never saw an item as much say over its
    row as the child that did (Diginetica, 4 Dirichlet children: -1.5 points of Recall@20
    against the dense table). Dropped rows still moved locally, as negatives; the dense rule
    gives them no weight either, and leaving them out saves their bytes."""
    counts = row_counts[rows.keys]
    keep = counts > 0
    if keep.all():
        return SparseRows(rows.keys, rows.deltas, counts)
    return SparseRows(rows.keys[keep], rows.deltas[torch.from_numpy(keep)], counts[keep])


def take_pulled(trainer: Trainer) -> int:
    """Rows read from the federation table since the last call (0 without placement b)."""
    role = federation_role(trainer)
    if role is None:
        return 0
    pulled, role.view.rows_pulled = role.view.rows_pulled, 0
    return pulled
