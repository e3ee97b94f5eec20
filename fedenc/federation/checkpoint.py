"""The master's job checkpoint: everything :func:`~fedenc.federation.master.run_master` needs to
continue a job from its last completed round after the master process died (``fedenc master
--resume``).

One file, ``<state dir>/master.pt`` (``torch.save`` of plain containers and tensors, read back
with ``weights_only=True``), replaced atomically after each completed round: written to a
temporary file in the same directory, flushed to disk, then ``os.replace``d over the previous one,
so a reader (or a master killed mid-write) sees the previous round's checkpoint or this one, never
a torn file. It holds:

* the job: ``job_id``, the ``run_id`` the children know it by, and the configuration that
  determines the result (:func:`config_fingerprint`); a checkpoint of another job or another
  configuration is refused with the differences named;
* the round it completed, the target parameters, the fusion rule's state (server-optimizer
  moments and step count), the stop rule's state, the stop reason if the job had ended;
* the per-round reports, the children and their confirmations (for the record: children confirm
  again after a restart, under new node ids);
* with ``carry_optimizer``, the moments the next round's child is to start from;
* the global RNG states of the master process (torch, numpy, ``random``). fedenc's own loop
  draws from none of them (child sampling is seeded by ``(seed, round)``), so this only matters
  to a custom rule that does.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from fedenc import atomic
from fedenc.training.checkpoint import load_failure

FORMAT = "fedenc.master-state/1"
FILE_NAME = "master.pt"

# MasterConfig fields that do not change the result: waiting, timeouts, where outputs go.
OPERATIONAL = frozenset(
    {
        "job_id",  # checked on its own
        "checkpoint_dir",
        "state_dir",
        "resume",
        "round_timeout",
        "query_timeout",
        "expect_children",
        "wait_timeout",
        "final_test",
    }
)


#: Settings added to MasterConfig after checkpoints were first written, with the value every job
#: before them had: an older checkpoint lacks the key and resumes as that value (without this,
#: every older checkpoint was refused as "another configuration").
SETTINGS_SINCE: Final[dict[str, Any]] = {"publish": "last", "min_samples": 1}


class MasterStateError(ValueError):
    """A checkpoint is missing, unreadable, or belongs to another job or configuration."""


@dataclass
class MasterState:
    """One job's state after a completed round (see the module docstring)."""

    job_id: str
    run_id: int
    round: int
    config: dict[str, Any]
    target: dict[str, torch.Tensor]
    rule: dict[str, Any]
    stop: dict[str, Any]
    stop_reason: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    children: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    saved_at: float = 0.0
    # carry_optimizer: the Adam moments the next round's child starts from
    carried: dict[str, torch.Tensor] = field(default_factory=dict)
    # placement b with an in-process federation PS: its table ({"rows": [keys, width]})
    ps_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    # publish = "best": the best round so far ({"round", "value", "target"})
    best: dict[str, Any] = field(default_factory=dict)


def config_fingerprint(config: Any) -> dict[str, Any]:
    """The part of a :class:`~fedenc.federation.master.MasterConfig` that determines the job's
    result, as plain JSON values (nested dataclasses included)."""
    values = dataclasses.asdict(config)
    kept = {k: v for k, v in values.items() if k not in OPERATIONAL}
    normalised: dict[str, Any] = json.loads(json.dumps(kept, sort_keys=True, default=str))
    return normalised


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def check_resumable(state: MasterState, job_id: str, fingerprint: Mapping[str, Any]) -> None:
    """Refuse to resume ``state`` as job ``job_id`` (empty: any) with configuration
    ``fingerprint`` when it belongs to another job or was made with another configuration."""
    if job_id and job_id != state.job_id:
        raise MasterStateError(
            f"the checkpoint is of job {state.job_id!r}, not {job_id!r}: refusing to resume "
            "(use the state directory of that job)"
        )
    diffs = _differences(state.config, fingerprint)
    if diffs:
        raise MasterStateError(
            f"the checkpoint of job {state.job_id!r} (round {state.round}) was made with another "
            f"configuration: {'; '.join(diffs)}. Resume with the same scenario and options, or "
            "start a new job with another --state / --out"
        )


def capture_rng() -> dict[str, Any]:
    """The master process's global RNG states (torch, numpy, random), in plain types."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]  # noqa: NPY002
    return {
        "torch": torch.get_rng_state(),
        "numpy": [
            name,
            torch.from_numpy(np.asarray(keys).astype(np.int64)),
            pos,
            has_gauss,
            cached,
        ],
        "python": random.getstate(),
    }


def restore_rng(rng: Mapping[str, Any]) -> None:
    """Undo :func:`capture_rng` (missing parts are left alone)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
        np.random.set_state(state)  # noqa: NPY002 (the legacy global generator, on purpose)
    if "python" in rng:
        random.setstate(_tuples(rng["python"]))


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def state_path(directory: Path) -> Path:
    return Path(directory) / FILE_NAME


def write_master_state(directory: Path, state: MasterState) -> Path:
    """Write ``state`` to ``directory/master.pt`` atomically (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = state_path(directory)
    payload = {"format": FORMAT, **dataclasses.asdict(state), "saved_at": time.time()}
    atomic.torch_save(payload, target, atomic.PRIVATE)
    return target


def read_master_state(directory: Path) -> MasterState:
    """The checkpoint in ``directory``; :class:`MasterStateError` when there is none or it
    cannot be read."""
    path = state_path(Path(directory))
    if not path.exists():
        raise MasterStateError(
            f"no master checkpoint in {directory} ({FILE_NAME}): nothing to resume. A job writes "
            "one after each completed round; run without --resume to start the job"
        )
    try:
        payload = atomic.torch_load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a damaged file
        raise MasterStateError(
            f"cannot read the master checkpoint {path} (corrupt, truncated or not one): "
            f"{load_failure(err)}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise MasterStateError(f"{path} is not a fedenc master checkpoint ({FORMAT}): {found!r}")
    names = {f.name for f in dataclasses.fields(MasterState)}
    payload.setdefault("carried", {})  # checkpoints from before carry_optimizer
    payload.setdefault("ps_rows", {})  # checkpoints from before the saved federation table
    payload.setdefault("best", {})  # checkpoints from before publish = "best"
    if isinstance(payload.get("config"), dict):  # written before these settings existed
        for key, value in SETTINGS_SINCE.items():
            payload["config"].setdefault(key, value)
    missing = names - set(payload)
    if missing:
        raise MasterStateError(f"{path} lacks {sorted(missing)}: written by another version?")
    return MasterState(**{k: payload[k] for k in names})
