"""Training settings: validation names the bad field, dict round trip, device resolution."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from fedenc.training.config import TrainConfig, resolve_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("eval_batch_size", 0),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("lr", math.nan),
        ("lr_decay_step", -1),
        ("lr_decay_rate", 0.0),
        ("lr_decay_rate", 1.5),
        ("l2", -1e-5),
        ("ks", ()),
        ("ks", (20, 0)),
        ("select_metric", "recall@5"),  # not one of the computed cut-offs
        ("select_metric", "loss"),
        ("patience", -1),
        ("max_examples_per_epoch", -1),
        ("num_threads", -1),
    ],
)
def test_bad_values_raise_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(**{field: value})
    assert field in str(info.value)


def test_defaults_are_valid_and_selection_metric_matches_ks() -> None:
    cfg = TrainConfig()
    assert cfg.select_metric == "recall@20" and 20 in cfg.ks
    assert TrainConfig(ks=(5,), select_metric="mrr@5").select_metric == "mrr@5"
    assert TrainConfig(ks=[20, 10]).ks == (20, 10)  # type: ignore[arg-type]


def test_from_dict_round_trip_and_rejects_unknown_keys() -> None:
    cfg = TrainConfig(epochs=3, lr=0.01, ks=(20, 5), seed=7)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.to_dict()["ks"] == [20, 5]
    with pytest.raises(ValueError, match="epoch_count") as info:
        TrainConfig.from_dict({"epochs": 2, "epoch_count": 3})
    assert "epochs" in str(info.value)  # the known options are listed
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig.from_dict({"epochs": 0})


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_resolve_device_auto_is_cpu_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_resolve_device_cuda_raises_without_cuda(name: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["meta", "nonsense", "gpu"])
def test_resolve_device_rejects_other_devices(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        resolve_device(name)
