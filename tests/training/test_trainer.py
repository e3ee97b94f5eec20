"""The local trainer on a tiny synthetic data set: it learns, it is reproducible, it selects the
epoch on validation only, and it fails loudly."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

from fedenc.data.sessions import Examples, Sessions
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.base import SessionEncoder
from fedenc.encoders.registry import build_encoder
from fedenc.training.config import TrainConfig
from fedenc.training.metrics import RankingAccumulator, target_ranks
from fedenc.training.progress import TrainingProgress
from fedenc.training.trainer import FitResult, Trainer

NUM_ITEMS = 60
HIDDEN = 16


@dataclass(frozen=True)
class Tiny:
    train: Examples
    valid: Examples
    test: Examples
    train_sessions: Sessions


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    splits = generate(
        SyntheticConfig(num_items=NUM_ITEMS, num_clusters=4, num_sessions=600, seed=0)
    )
    return Tiny(
        train=Examples.from_sessions(splits.train),
        valid=Examples.from_sessions(splits.valid),
        test=Examples.from_sessions(splits.test),
        train_sessions=splits.train,
    )


def make_model(seed: int = 0, **options: Any) -> SessionEncoder:
    torch.manual_seed(seed)
    return build_encoder("srgnn", NUM_ITEMS, hidden=HIDDEN, **options)


def config(**overrides: Any) -> TrainConfig:
    base: dict[str, Any] = {"epochs": 3, "lr": 1e-2, "batch_size": 50, "device": "cpu"}
    base.update(overrides)
    return TrainConfig(**base)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def trained(tiny: Tiny) -> tuple[Trainer, FitResult]:
    trainer = Trainer(make_model(), config())
    return trainer, trainer.fit(tiny.train, tiny.valid, tiny.test)


def popularity_recall(train: Sessions, examples: Examples, k: int = 20) -> float:
    counts = np.bincount(train.items, minlength=train.num_items + 1).astype(np.float64)
    scores = torch.from_numpy(counts[1:])[None, :].expand(len(examples), -1)
    acc = RankingAccumulator(ks=(k,))
    acc.update(target_ranks(scores, torch.from_numpy(examples.target)))
    return acc.result()[f"recall@{k}"]


def test_loss_decreases_and_beats_popularity(
    tiny: Tiny, trained: tuple[Trainer, FitResult]
) -> None:
    _, result = trained
    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[0] < np.log(NUM_ITEMS) + 0.5  # starts near uniform, not diverging
    pop = popularity_recall(tiny.train_sessions, tiny.valid)
    assert 0 < pop < 100
    assert result.best_valid["recall@20"] > pop + 5, (result.best_valid, pop)
    assert all(row["train_pairs"] == len(tiny.train) for row in result.history)


def test_best_epoch_is_the_argmax_of_validation(
    tiny: Tiny, trained: tuple[Trainer, FitResult]
) -> None:
    trainer, result = trained
    scores = [row["valid_recall@20"] for row in result.history]
    assert result.best_epoch == int(np.argmax(scores)) + 1
    assert result.best_valid["recall@20"] == max(scores)
    # The kept model reproduces the best validation numbers.
    again = trainer.evaluate(tiny.valid)
    for k in ("recall@20", "mrr@20", "recall@10", "mrr@10"):
        assert again[k] == pytest.approx(result.best_valid[k], abs=1e-9), k
    # Test is reported once, on the full test set, with every cut-off.
    assert result.test is not None
    assert result.test["examples"] == len(tiny.test)
    assert {"recall@20", "mrr@20", "recall@10", "mrr@10"} <= set(result.test)
    assert result.to_dict()["best_epoch"] == result.best_epoch


class ScriptedTrainer(Trainer):
    """Reports scripted validation scores and records every evaluation with the model's state."""

    def __init__(
        self, model: SessionEncoder, cfg: TrainConfig, valid: Examples, scores: Sequence[float]
    ):
        super().__init__(model, cfg)
        self.valid_examples, self.scores = valid, list(scores)
        self.calls: list[tuple[str, dict[str, torch.Tensor]]] = []

    def evaluate(
        self, examples: Examples, progress: TrainingProgress | None = None, label: str = "eval"
    ) -> dict[str, float]:
        metrics = super().evaluate(examples, progress, label)
        kind = "valid" if examples is self.valid_examples else "other"
        if kind == "valid":
            metrics["recall@20"] = self.scores[sum(c[0] == "valid" for c in self.calls)]
        self.calls.append((kind, state(self.model)))
        return metrics


def small(tiny: Tiny) -> tuple[Examples, Examples, Examples]:
    """Fewer examples for the tests that run many epochs."""
    return tiny.train.subset(np.arange(300)), tiny.valid.subset(np.arange(60)), tiny.test


def test_fit_keeps_the_best_validation_epoch_and_tests_it_once(tiny: Tiny) -> None:
    train, valid, test = small(tiny)
    trainer = ScriptedTrainer(make_model(), config(), valid, scores=[10.0, 30.0, 20.0])
    result = trainer.fit(train, valid, test)
    assert [row["valid_recall@20"] for row in result.history] == [10.0, 30.0, 20.0]
    assert result.best_epoch == 2
    assert result.best_valid["recall@20"] == 30.0
    kinds = [kind for kind, _ in trainer.calls]
    assert kinds == ["valid", "valid", "valid", "other"]  # test once, after every selection
    epoch_states = [s for kind, s in trainer.calls if kind == "valid"]
    assert not same_state(epoch_states[1], epoch_states[2])
    assert same_state(state(trainer.model), epoch_states[1])  # epoch 2's parameters are kept
    assert same_state(trainer.calls[-1][1], epoch_states[1])  # ...and they are what is tested
    assert result.test is not None and "recall@20" in result.test


def test_test_set_never_influences_selection(tiny: Tiny) -> None:
    train, valid, test = small(tiny)
    runs = []
    for test_set in (test, None):
        trainer = ScriptedTrainer(make_model(), config(), valid, scores=[5.0, 1.0, 3.0])
        runs.append((trainer, trainer.fit(train, valid, test_set)))
    (with_test, res_a), (without, res_b) = runs
    assert res_a.best_epoch == res_b.best_epoch == 1
    assert res_b.test is None
    assert same_state(state(with_test.model), state(without.model))
    assert [k for k, _ in without.calls] == ["valid"] * 3


def test_patience_stops_early(tiny: Tiny) -> None:
    train, valid, _ = small(tiny)
    cfg = config(epochs=6, patience=2)
    trainer = ScriptedTrainer(make_model(), cfg, valid, scores=[10.0, 30.0, 20.0, 5.0, 40.0, 50.0])
    result = trainer.fit(train, valid)
    assert len(result.history) == 4
    assert result.best_epoch == 2


def test_without_validation_the_last_epoch_is_kept(tiny: Tiny) -> None:
    train, _, _ = small(tiny)
    trainer = Trainer(make_model(), config(epochs=2))
    result = trainer.fit(train, None)
    assert result.best_epoch == 2 and result.best_valid == {}
    assert len(result.history) == 2
    assert not any(k.startswith("valid_") for k in result.history[-1])


def fit_state(
    tiny: Tiny, init_seed: int, train_seed: int, global_seed: int = 0
) -> dict[str, torch.Tensor]:
    train, valid, _ = small(tiny)
    model = make_model(init_seed, dropout=0.3)  # dropout draws from torch's RNG
    torch.manual_seed(global_seed)  # whatever ran before fit must not matter
    trainer = Trainer(model, config(epochs=1, seed=train_seed))
    trainer.fit(train, valid)
    return state(trainer.model)


def test_same_seed_gives_bit_identical_parameters(tiny: Tiny) -> None:
    first = fit_state(tiny, 0, 0)
    assert same_state(first, fit_state(tiny, 0, 0, global_seed=123))
    # The training seed alone (shuffling, dropout) changes the result...
    assert not same_state(first, fit_state(tiny, 0, 1))
    # ...and training moved the parameters away from the initialisation.
    assert not same_state(first, state(make_model(0, dropout=0.3)))


def test_evaluate_runs_without_grad_and_changes_nothing(tiny: Tiny) -> None:
    model = make_model(dropout=0.5)
    trainer = Trainer(model, config())
    seen: list[tuple[bool, bool]] = []
    # Evaluation ranks in chunks without calling model.forward: watch the readout's last layer.
    model.readout.combine.register_forward_hook(
        lambda _m, _i, out: seen.append((out.requires_grad, torch.is_grad_enabled()))
    )
    before = state(model)
    first = trainer.evaluate(tiny.valid)
    second = trainer.evaluate(tiny.valid)
    assert seen and all(flags == (False, False) for flags in seen)
    assert same_state(before, state(model))
    assert all(p.grad is None for p in model.parameters())
    first.pop("pairs_per_s"), second.pop("pairs_per_s")
    assert first == second  # dropout is off: both passes agree exactly
    assert first["examples"] == len(tiny.valid)
    assert not model.training


def test_nan_loss_raises(tiny: Tiny) -> None:
    train, _, _ = small(tiny)
    model = make_model()
    with torch.no_grad():
        model.readout.combine.weight.fill_(float("nan"))
    trainer = Trainer(model, config(epochs=1))
    with pytest.raises(FloatingPointError, match="nan"):
        trainer.train_epoch(train)
    with pytest.raises(FloatingPointError):
        trainer.fit(train, None)


@pytest.mark.parametrize("error", [FloatingPointError, KeyboardInterrupt])
def test_a_later_epoch_that_fails_keeps_the_best_epoch_done(
    tiny: Tiny, error: type[BaseException], monkeypatch: pytest.MonkeyPatch
) -> None:
    train, valid, test = small(tiny)
    trainer = ScriptedTrainer(make_model(), config(epochs=4), valid, scores=[10.0, 30.0])
    epoch = trainer.train_epoch

    def third_fails(*args: Any, **kwargs: Any) -> dict[str, float]:
        if trainer.epochs_done == 2:
            raise error("training loss became nan at example 50")
        return epoch(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_epoch", third_fails)
    result = trainer.fit(train, valid, test)
    assert len(result.history) == 2 and result.best_epoch == 2
    epoch_states = [s for kind, s in trainer.calls if kind == "valid"]
    assert same_state(state(trainer.model), epoch_states[1])
    if error is KeyboardInterrupt:
        assert result.stopped == "interrupted in epoch 3" and result.test is None
    else:
        assert result.stopped == "epoch 3: training loss became nan at example 50"
        assert result.test is not None  # the kept epoch is tested as usual
    # Before any epoch is done there is nothing to keep: the error propagates.
    fresh = Trainer(make_model(), config(epochs=2))
    monkeypatch.setattr(fresh, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(error("x")))
    with pytest.raises(error):
        fresh.fit(train, valid)


def test_empty_training_examples_raise(tiny: Tiny) -> None:
    empty = Examples.from_sessions(Sessions.from_lists([[1], [2]], num_items=NUM_ITEMS))
    assert len(empty) == 0
    trainer = Trainer(make_model(), config(epochs=1))
    with pytest.raises(ValueError, match="no training examples"):
        trainer.fit(empty, tiny.valid)
