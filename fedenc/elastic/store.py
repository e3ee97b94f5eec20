"""What a data server loads before training: its data shard and the model description, from a
storage directory (a local path, or a ``file://`` URI).

Layout of ``DIR``:

* ``model.json``: ``{"encoder": "srgnn", "config": {EncoderConfig fields}, "train":
  {TrainConfig fields}, "seed": 0}`` — the encoder's structure, the optimizer settings, and the
  seed of the initial parameters;
* ``sessions.txt``: this shard's training sessions, one per line (space-separated item ids);
* ``parameters.pt`` (optional): a state dict to start from instead of the seeded initialisation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from fedenc import atomic
from fedenc.data.readers import read_session_text
from fedenc.data.sessions import Examples, Sessions
from fedenc.elastic.common import ElasticError
from fedenc.encoders.base import EncoderConfig, SessionEncoder
from fedenc.encoders.registry import encoder_class
from fedenc.training.config import TrainConfig


@dataclass
class StoredTask:
    model: SessionEncoder
    train: TrainConfig
    examples: Examples


def resolve(location: str) -> Path:
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme else location)
    raise ElasticError(f"unsupported storage URI {location!r}: use a directory or file://")


def load_store(location: str) -> StoredTask:
    root = resolve(location)
    try:
        spec = json.loads((root / "model.json").read_text("utf-8"))
        config = EncoderConfig(**spec["config"])
        model = encoder_class(spec["encoder"])(config)
        train = TrainConfig.from_dict(dict(spec.get("train", {}), device="cpu"))
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise ElasticError(f"bad model description in {root / 'model.json'}: {err}") from err
    params = root / "parameters.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec.get("seed", 0)))
        model.reset_parameters()
    if params.exists():
        model.load_state_dict(atomic.torch_load(params, map_location="cpu", weights_only=True))
    sessions = read_session_text(root / "sessions.txt", num_items=config.num_items)
    return StoredTask(model, train, Examples.from_sessions(sessions))


def write_store(
    root: Path,
    encoder: str,
    config: EncoderConfig,
    train: TrainConfig,
    sessions: Sessions,
    seed: int = 0,
) -> None:
    """Writes a storage directory (tests, examples)."""
    root.mkdir(parents=True, exist_ok=True)
    train_dict = train.to_dict()
    spec = {"encoder": encoder, "config": config.to_dict(), "train": train_dict, "seed": seed}
    (root / "model.json").write_text(json.dumps(spec, indent=1), "utf-8")
    lines = (
        " ".join(map(str, sessions.items[a:b].tolist()))
        for a, b in zip(sessions.offsets[:-1], sessions.offsets[1:], strict=True)
    )
    (root / "sessions.txt").write_text("\n".join(lines) + "\n", "utf-8")
