"""The same encoders and trainer on a GPU: losses, gradients and rankings match the CPU, a
GPU-trained checkpoint reloads on the CPU and scores the same, and `--plan auto` can place the
step on the GPU. Skipped on machines without CUDA (CI); run on a GPU machine with

    pytest tests/training/test_cuda.py
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedenc.data.batching import SessionBatch, build_batch
from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.registry import build_encoder
from fedenc.training.checkpoint import load_checkpoint, save_checkpoint
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NUM_ITEMS = 300
ENCODERS = ["srgnn", "edge_attn", "skip_rnn"]


def double(batch: SessionBatch) -> SessionBatch:
    """The batch's float tensors (adjacency) in float64, to match a .double() model."""
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name).double()
            for f in dataclasses.fields(batch)
            if getattr(batch, f.name).is_floating_point()
        },
    )


@pytest.fixture(scope="module")
def examples() -> Examples:
    splits = generate(SyntheticConfig(num_items=NUM_ITEMS, num_sessions=800, seed=3))
    return Examples.from_sessions(splits.train)


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("normalize", [False, True])
def test_loss_and_gradients_match_the_cpu(examples: Examples, name: str, normalize: bool) -> None:
    torch.manual_seed(0)
    cpu_model = build_encoder(name, NUM_ITEMS, hidden=24, normalize=normalize).double()
    gpu_model = build_encoder(name, NUM_ITEMS, hidden=24, normalize=normalize).double()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.cuda()
    index = np.arange(64)
    losses = []
    for model, device in ((cpu_model, "cpu"), (gpu_model, "cuda")):
        loss = model.loss(double(build_batch(examples, index, torch.device(device))))
        loss.backward()
        losses.append(float(loss.detach()))
    assert losses[1] == pytest.approx(losses[0], rel=1e-9)
    for (key, a), b in zip(cpu_model.named_parameters(), gpu_model.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None, key
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-7, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", ENCODERS)
def test_rankings_match_the_cpu(examples: Examples, name: str) -> None:
    torch.manual_seed(1)
    model = build_encoder(name, NUM_ITEMS, hidden=24).double().eval()
    index = np.arange(200)
    with torch.no_grad(), model.frozen_scoring():
        ranks_cpu = model.rank_targets(double(build_batch(examples, index, torch.device("cpu"))))
    model.cuda()
    with torch.no_grad(), model.frozen_scoring():
        ranks_gpu = model.rank_targets(double(build_batch(examples, index, torch.device("cuda"))))
    torch.testing.assert_close(ranks_gpu.cpu(), ranks_cpu)


def test_a_gpu_trained_checkpoint_scores_the_same_on_the_cpu(
    examples: Examples, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = build_encoder("srgnn", NUM_ITEMS, hidden=24)
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=50, device="cuda", plan="default"))
    assert next(trainer.model.parameters()).is_cuda
    first = trainer.train_epoch(examples)
    second = trainer.train_epoch(examples)
    assert second["loss"] < first["loss"]  # it learns on the GPU
    gpu_metrics = trainer.evaluate(examples)
    save_checkpoint(tmp_path / "ckpt", trainer.model, {})
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert not next(loaded.parameters()).is_cuda
    cpu_metrics = Trainer(loaded, TrainConfig(device="cpu", plan="default")).evaluate(examples)
    for key in ("recall@20", "mrr@20"):
        assert cpu_metrics[key] == pytest.approx(gpu_metrics[key], abs=0.2), key


def test_plan_auto_can_place_the_step_on_the_gpu(examples: Examples, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_encoder("srgnn", NUM_ITEMS, hidden=24)
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=50, device="auto", plan="auto"))
    choice = trainer.prepare_plan(examples)
    assert any(name.startswith("cuda-") for name in choice.predicted), choice.predicted
    result = trainer.train_epoch(examples)
    assert np.isfinite(result["loss"])
    trainer.close()
