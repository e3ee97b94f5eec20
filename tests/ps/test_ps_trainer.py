"""PSTrainer: the full-softmax path trains exactly like the plain trainer; the sampled path
trains a catalog far larger than the rows it holds."""

from __future__ import annotations

import numpy as np
import torch

from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.base import SessionEncoder
from fedenc.encoders.registry import build_encoder
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.table import TableSpec
from fedenc.ps.trainer import PSConfig, PSTrainer
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer

SPLITS = generate(SyntheticConfig(num_sessions=1200, num_items=200, seed=0))
TRAIN = Examples.from_sessions(SPLITS.train)
VALID = Examples.from_sessions(SPLITS.valid)
CONFIG = TrainConfig(epochs=2, batch_size=100, seed=0, device="cpu", eval_batch_size=200)


def _model(num_items: int) -> SessionEncoder:
    torch.manual_seed(0)
    model = build_encoder("srgnn", num_items, hidden=8)
    model.reset_parameters()
    return model


def test_full_softmax_path_trains_like_the_plain_trainer() -> None:
    n = SPLITS.num_items
    plain = _model(n)
    Trainer(plain, CONFIG).fit(TRAIN, VALID)
    model = _model(n)
    remote = InProcessPS(TableSpec(n + 1, 8, num_shards=2))
    remote.push(np.arange(n + 1), model.embedding.weight.detach().clone(), overwrite=True)
    trainer = PSTrainer(model, CONFIG, remote, PSConfig(exchange_every=1000))
    trainer.fit(TRAIN, VALID)
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    # The distributed PS ends exactly where the trainer's table is.
    assert torch.equal(remote.pull(np.arange(1, n + 1)), model.embedding.weight[1:].detach())
    # Windows close at the first batch boundary at or past 1000 samples; fit flushes the rest.
    windows = np.diff([0, *trainer.builtin.stats.history])
    assert len(windows) >= 2
    assert all(1000 <= w < 1000 + CONFIG.batch_size for w in windows[:-1])
    assert trainer.builtin.stats.samples == 2 * len(TRAIN)


def test_sampled_path_trains_a_catalog_much_larger_than_its_table() -> None:
    catalog = 60_000  # the data use ids 1..200; the PS holds 60k rows, the trainer 800
    remote = InProcessPS(TableSpec(catalog + 1, 8, num_shards=2))
    start = remote.pull(np.arange(catalog + 1))
    model = _model(1)
    ps = PSConfig(exchange_every=500, scoring="sampled", negatives=64, capacity=800)
    trainer = PSTrainer(model, CONFIG, remote, ps)
    local_rows = max(p.shape[0] for p in model.parameters() if p.dim() == 2)
    assert local_rows < 1000 and trainer.builtin.values.shape[0] == 801
    losses = [trainer.train_epoch(TRAIN)["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    trainer.builtin.flush()
    moved = (remote.pull(np.arange(catalog + 1)) != start).any(1).nonzero().flatten()
    stats = trainer.ps_stats()
    assert 0 < moved.numel() < catalog / 4  # only touched rows (clicks, targets, negatives)
    assert stats["rows_pushed"] >= moved.numel()
    # Evaluation ranks all 60k items, streamed from the PS: the same as a plain model that
    # holds the whole table with the same dense encoder.
    metrics = trainer.evaluate(VALID)
    full = _model(catalog)
    dense = {k: v for k, v in model.state_dict().items() if not k.startswith("embedding.")}
    full.load_state_dict(dense, strict=False)
    with torch.no_grad():
        full.embedding.weight.copy_(remote.pull(np.arange(catalog + 1)))
    reference = Trainer(full, CONFIG).evaluate(VALID)
    for key in ("recall@20", "mrr@20", "recall@10"):
        assert abs(metrics[key] - reference[key]) < 1e-6, key


def test_sampled_evaluation_pushes_nothing_and_scores_the_pending_rows() -> None:
    # Validation inside the exchange window: the distributed PS stays as the last exchange left
    # it, and the scores are those a flush would have given.
    catalog = 2_000
    remote = InProcessPS(TableSpec(catalog + 1, 8, num_shards=2))
    model = _model(1)
    ps = PSConfig(exchange_every=10**9, scoring="sampled", negatives=64, capacity=catalog + 1)
    trainer = PSTrainer(model, CONFIG, remote, ps)
    trainer.train_epoch(TRAIN)
    before = remote.pull(np.arange(catalog + 1))
    exchanges = trainer.builtin.stats.exchanges
    metrics = trainer.evaluate(VALID)
    assert trainer.builtin.stats.exchanges == exchanges
    assert torch.equal(remote.pull(np.arange(catalog + 1)), before)
    trainer.builtin.flush()
    flushed = trainer.evaluate(VALID)
    assert not torch.equal(remote.pull(np.arange(catalog + 1)), before)  # the flush pushed
    for key in ("recall@20", "mrr@20", "recall@10", "mrr@10"):
        assert abs(metrics[key] - flushed[key]) < 1e-6, key
