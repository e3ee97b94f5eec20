"""Encoder checkpoints: a round trip scores identically; broken checkpoints name the bad file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedenc.data.batching import batch_from_sessions
from fedenc.encoders.registry import build_encoder
from fedenc.training.checkpoint import (
    FORMAT_VERSION,
    META_FILE,
    STATE_FILE,
    load_checkpoint,
    save_checkpoint,
)

NUM_ITEMS = 30
BATCH = [[1, 2, 1, 3], [4, 5], [30]]


@pytest.mark.parametrize("name", ["srgnn", "edge_attn", "skip_rnn"])
def test_round_trip_scores_identically(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = build_encoder(name, NUM_ITEMS, hidden=6, steps=2, use_positions=False).eval()
    out = save_checkpoint(
        tmp_path / "ckpt", model, {"note": "hello", "metrics": {"recall@20": 1.5}}
    )
    assert out == tmp_path / "ckpt"
    assert sorted(p.name for p in out.iterdir()) == sorted([META_FILE, STATE_FILE])  # no .tmp

    loaded, meta = load_checkpoint(out)
    assert type(loaded) is type(model)
    assert meta["format"] == FORMAT_VERSION
    assert meta["encoder"] == name
    assert meta["encoder_config"] == model.config.to_dict()
    assert (
        meta["encoder_config"]["hidden"] == 6 and meta["encoder_config"]["use_positions"] is False
    )
    assert meta["shared_parameters"] == model.shared_parameter_names()
    assert meta["note"] == "hello" and meta["metrics"] == {"recall@20": 1.5}
    assert json.loads((out / META_FILE).read_text()) == meta

    batch = batch_from_sessions(BATCH)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batch), model(batch))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_save_overwrites_an_existing_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = build_encoder("srgnn", NUM_ITEMS, hidden=4)
    torch.manual_seed(1)
    second = build_encoder("srgnn", NUM_ITEMS, hidden=4)
    save_checkpoint(tmp_path, first)
    save_checkpoint(tmp_path, second)
    loaded, _ = load_checkpoint(tmp_path)
    assert torch.equal(loaded.embedding.weight, second.embedding.weight)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "ckpt", build_encoder("srgnn", NUM_ITEMS, hidden=4))


def test_missing_directory_or_files_name_the_file(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")
    (saved / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(saved)
    assert str(saved / STATE_FILE) in str(info.value)


def test_missing_meta_names_the_file(saved: Path) -> None:
    (saved / META_FILE).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_checkpoint(saved)
    assert str(saved / META_FILE) in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        (
            '{"format": 99, "encoder": "srgnn", "encoder_config": {}}',
            "unsupported checkpoint format",
        ),
        ('{"encoder": "srgnn"}', "unsupported checkpoint format"),
        ('{"format": 1, "encoder_config": {"num_items": 5}}', "encoder"),
        ('{"format": 1, "encoder": "srgnn"}', "encoder_config"),
        (
            '{"format": 1, "encoder": "gru4rec", "encoder_config": {"num_items": 5}}',
            "encoder type 'gru4rec' is not registered in this process",
        ),
        (
            '{"format": 1, "encoder": "srgnn", "encoder_config": {"num_items": 5, "hidden": "4"}}',
            "bad encoder configuration (hidden must be an int",
        ),
    ],
)
def test_bad_meta_gives_a_clear_error_naming_the_file(saved: Path, text: str, problem: str) -> None:
    (saved / META_FILE).write_text(text)
    with pytest.raises(ValueError) as info:
        load_checkpoint(saved)
    message = str(info.value)
    assert str(saved / META_FILE) in message
    assert problem in message


def test_corrupt_state_names_the_file(saved: Path) -> None:
    (saved / STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(ValueError) as info:
        load_checkpoint(saved)
    assert str(saved / STATE_FILE) in str(info.value)


def test_state_that_does_not_fit_the_config_names_the_file(saved: Path) -> None:
    meta = json.loads((saved / META_FILE).read_text())
    meta["encoder_config"]["hidden"] = 5  # parameters were saved with hidden=4
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError) as info:
        load_checkpoint(saved)
    assert str(saved / STATE_FILE) in str(info.value)
