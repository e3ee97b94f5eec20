"""Encoder checkpoints: a directory with ``encoder.pt`` (the state_dict) and ``meta.json`` (encoder
type and config, training config, metrics, data summary), enough to rebuild and score again.

Files are written to a temporary name and renamed, so a crash never leaves a half-written
checkpoint.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from fedenc import atomic
from fedenc.encoders.base import SessionEncoder
from fedenc.encoders.registry import UnknownEncoderError, build_encoder

STATE_FILE = "encoder.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def save_checkpoint(
    directory: str | Path, model: SessionEncoder, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (its state_dict, on the CPU) and its type, config and shared parameter
    names, plus ``metadata`` (JSON-ready), to ``directory``; returns it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "encoder": model.type_name,
        "encoder_config": model.config.to_dict(),
        "shared_parameters": model.shared_parameter_names(),
        **(metadata or {}),
    }
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic.torch_save(state, out / STATE_FILE)
    atomic.write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    return out


def load_failure(err: BaseException) -> str:
    """The first line of ``torch.load``'s error: the rest of torch's text for an unreadable
    file advises retrying with ``weights_only=False``, which would run whatever code a tampered
    file holds, and asks for a bug report; neither helps the person who reads the message."""
    text = str(err).strip()
    if text.startswith("Weights only load failed"):
        return "not a file of tensors only (torch's safe loader refused its contents)"
    first = text.splitlines()[0] if text else ""
    return first or f"{type(err).__name__} (an empty, truncated or foreign file)"


def load_checkpoint(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SessionEncoder, dict[str, Any]]:
    """The encoder saved in ``directory`` by :func:`save_checkpoint`, rebuilt and loaded, and
    the checkpoint's metadata. ``FileNotFoundError`` for a missing file, ``ValueError`` naming the
    file for anything else that is wrong (damaged, foreign, an encoder type not registered here)."""
    src = Path(directory)
    meta_path, state_path = src / META_FILE, src / STATE_FILE
    for path in (meta_path, state_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file missing: {path}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported checkpoint format {meta.get('format')!r}")
    encoder, config = meta.get("encoder"), meta.get("encoder_config")
    if not isinstance(encoder, str):
        raise ValueError(f"{meta_path}: no encoder type ('encoder')")
    if not isinstance(config, dict) or "num_items" not in config:
        raise ValueError(f"{meta_path}: no encoder configuration ('encoder_config' with num_items)")
    config = dict(config)
    num_items = int(config.pop("num_items"))
    try:
        model = build_encoder(encoder, num_items, **config)
    except UnknownEncoderError as err:
        raise ValueError(
            f"{meta_path}: encoder type {encoder!r} is not registered in this process ({err}). "
            "Install the package that provides it (entry point group 'fedenc.encoders'), or "
            "import the module that registers it before loading"
        ) from err
    except (TypeError, ValueError) as err:
        raise ValueError(f"{meta_path}: bad encoder configuration ({err})") from err
    try:
        state = atomic.torch_load(state_path, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        raise ValueError(
            f"{state_path}: cannot load the {encoder} parameters ({load_failure(err)})"
        ) from err
    return model, meta
