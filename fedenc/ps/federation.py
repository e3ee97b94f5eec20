"""The two-level PS in a federation child (placement a: each child's own distributed PS).

The item embeddings are a child's local head and never travel; with ``ps = "local"`` they live
in the child's own distributed PS (in this process, or the gRPC shards listed in
``ps-addresses``) behind the trainer's built-in PS, and only the dense shared encoder is
federated, exactly as without a PS. Run-config keys (all optional):

``ps`` ("" = off, "local"), ``ps-exchange-every`` (samples; 0 = at the end of each round),
``ps-scoring`` (full | sampled), ``ps-negatives``, ``ps-capacity``, ``ps-shards`` (in-process
shards), ``ps-addresses`` (comma-separated shard addresses, plaintext; shard i at position i).

Placement (b), a federation-level PS fusing sparse row deltas, is not implemented yet (see
``docs/ps.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedenc.encoders.base import SessionEncoder
from fedenc.federation.runconfig import get_int, get_str
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.service import DistributedPS
from fedenc.ps.table import TableSpec
from fedenc.ps.trainer import PSConfig, PSTrainer
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer

PLACEMENTS = ("", "local")


def ps_config_from_run_config(rc: Mapping[str, Any]) -> PSConfig | None:
    """The child's PS settings, or None when the job runs without a PS."""
    placement = get_str(rc, "ps", "")
    if placement not in PLACEMENTS:
        raise ValueError(
            f"ps must be one of {PLACEMENTS} ('' = off), got {placement!r}"
            + ("; the federation-level PS (placement b) is not implemented" if placement else "")
        )
    if not placement:
        return None
    base = PSConfig()
    return PSConfig(
        exchange_every=get_int(rc, "ps-exchange-every", base.exchange_every),
        scoring=get_str(rc, "ps-scoring", base.scoring),
        negatives=get_int(rc, "ps-negatives", base.negatives),
        capacity=get_int(rc, "ps-capacity", base.capacity),
    )


def child_remote(rc: Mapping[str, Any], num_keys: int, width: int, seed: int) -> DistributedPS:
    """The child's own distributed PS: its gRPC shards, or an in-process one."""
    addresses = [a.strip() for a in get_str(rc, "ps-addresses", "").split(",") if a.strip()]
    if addresses:
        from fedenc.ps.client import ShardedClient

        client = ShardedClient(addresses)
        if (client.num_keys, client.width) != (num_keys, width):
            raise ValueError(
                f"the PS at {addresses} holds {client.num_keys} x {client.width} rows, the "
                f"encoder needs {num_keys} x {width}"
            )
        return client
    shards = max(1, get_int(rc, "ps-shards", 1))
    return InProcessPS(TableSpec(num_keys, width, num_shards=shards, seed=seed))


def make_trainer(
    model: SessionEncoder, config: TrainConfig, rc: Mapping[str, Any], seed: int
) -> Trainer:
    """A :class:`PSTrainer` when the run config asks for a PS, else the plain trainer."""
    ps = ps_config_from_run_config(rc)
    if ps is None:
        return Trainer(model, config)
    remote = child_remote(rc, model.config.num_items + 1, model.config.hidden, seed)
    if ps.scoring == "full":
        # The child's head starts from the rows of its own PS.
        import numpy as np
        import torch

        with torch.no_grad():
            model.embedding.weight.copy_(remote.pull(np.arange(remote.num_keys)))
    trainer = PSTrainer(model, config, remote, ps)
    trainer.flush_after_epoch = False  # the child flushes at the end of each round
    return trainer


def end_round(trainer: Trainer) -> dict[str, float]:
    """Flush the round's last partial window; the PS figures for the round's metrics."""
    if not isinstance(trainer, PSTrainer):
        return {}
    trainer.builtin.flush()
    stats = trainer.builtin.stats
    return {
        "ps_exchanges": float(stats.exchanges),
        "ps_rows_pushed": float(stats.rows_pushed),
        "ps_rows_pulled": float(stats.rows_pulled),
    }
