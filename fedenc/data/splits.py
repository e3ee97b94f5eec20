"""Train/validation/test splits and the one entry point that loads a data set from a path.

The published SR-GNN-family numbers pick their best epoch on the test set; fedenc instead selects
on a validation split carved from the *end* of the chronologically ordered training sessions (the
sessions closest in time to the test period, without touching it) and reports test once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from fedenc.data.preprocess import SRGNNProtocol, preprocess
from fedenc.data.readers import (
    DataFileNotFoundError,
    PathArg,
    read_diginetica_clicks,
    read_session_text,
    read_yoochoose_clicks,
)
from fedenc.data.sessions import Sessions

DATA_ENV = "FEDENC_DATA"
TRAIN_FILE = "train_sessions.txt"
TEST_FILE = "test_sessions.txt"


def train_valid_split(sessions: Sessions, valid_fraction: float = 0.1) -> tuple[Sessions, Sessions]:
    """Split off the last ``round(valid_fraction * n)`` sessions (in stored order) as validation.

    Stored order is chronological for every source fedenc reads, so validation is the most recent
    slice of training. Timestamps, when present, are not re-sorted: the caller's order is the truth.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must lie in [0, 1), got {valid_fraction}")
    n = len(sessions)
    n_valid = round(valid_fraction * n)
    if valid_fraction > 0 and n >= 2:
        n_valid = max(n_valid, 1)
    cut = n - n_valid
    return (
        sessions.subset(np.arange(cut, dtype=np.int64)),
        sessions.subset(np.arange(cut, n, dtype=np.int64)),
    )


@dataclass(frozen=True)
class DataSplits:
    """A named data set: train/valid/test sessions over one catalog of ``num_items`` items."""

    name: str
    train: Sessions
    valid: Sessions
    test: Sessions
    num_items: int

    def __post_init__(self) -> None:
        for part in (self.train, self.valid, self.test):
            if part.num_items != self.num_items:
                raise ValueError(
                    f"{self.name}: a split has num_items={part.num_items}, "
                    f"expected {self.num_items}"
                )

    def summary(self) -> dict[str, int | float | str]:
        """Counts per split (sessions, clicks, augmented examples) for logs and reports."""
        out: dict[str, int | float | str] = {"name": self.name, "num_items": self.num_items}
        for key, part in (("train", self.train), ("valid", self.valid), ("test", self.test)):
            out[f"{key}_sessions"] = len(part)
            out[f"{key}_clicks"] = part.num_clicks
            out[f"{key}_examples"] = part.num_examples
        seen = np.unique(self.train.items)
        out["train_items"] = int(seen.size)
        test_items = np.unique(self.test.items)
        out["test_items_unseen_in_train"] = int(np.setdiff1d(test_items, seen).size)
        total = self.train.num_clicks + self.valid.num_clicks + self.test.num_clicks
        count = len(self.train) + len(self.valid) + len(self.test)
        out["mean_session_length"] = round(total / count, 3) if count else 0.0
        return out


def load_dataset(
    source: PathArg,
    valid_fraction: float = 0.1,
    protocol: SRGNNProtocol | None = None,
    name: str | None = None,
    recent: int | None = None,
) -> DataSplits:
    """Load a data set from a path.

    ``recent`` = N keeps the most recent 1/N of a raw Yoochoose log's training sessions (SR-GNN's
    Yoochoose 1/64 and 1/4 are N = 64 and 4); without it the whole log is used.

    - A directory with ``train_sessions.txt`` and ``test_sessions.txt`` (the prepared
      one-session-per-line format): ``num_items`` is the largest id over train and test, so ids
      that occur only in test (Yoochoose 1/64) still have an embedding row.
    - A raw click log, preprocessed with SR-GNN's protocol (``protocol`` overrides the default):
      ``.csv`` is Diginetica ``train-item-views.csv`` (7 test days); ``.dat`` or ``.txt`` is
      Yoochoose (1 test day, no fraction unless ``protocol`` asks for one).

    Validation is carved from the end of the training sessions (:func:`train_valid_split`).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataFileNotFoundError(path, "no such file or directory (data source)")
    # A compressed log's format is the suffix before ".gz".
    logical = Path(path.stem) if path.suffix.lower() == ".gz" else path
    suffix = logical.suffix.lower()
    label = name or (path.name if path.is_dir() else logical.stem)
    if recent is not None and recent < 1:
        raise ValueError(f"recent must be >= 1 (keep 1/N of the training sessions), got {recent}")
    is_yoochoose = not path.is_dir() and suffix in (".dat", ".txt", ".tsv")
    if recent is not None and (not is_yoochoose or protocol is not None):
        raise ValueError(f"{path}: recent applies to a raw Yoochoose click log only")
    if path.is_dir():
        train_path, test_path = path / TRAIN_FILE, path / TEST_FILE
        for p in (train_path, test_path):
            if not p.is_file():
                raise DataFileNotFoundError(
                    p, f"missing: a prepared data directory needs {TRAIN_FILE} and {TEST_FILE}"
                )
        train_all = read_session_text(train_path)
        test = read_session_text(test_path)
        num_items = max(train_all.num_items, test.num_items)
        train_all = replace(train_all, num_items=num_items)
        test = replace(test, num_items=num_items)
    else:
        if suffix == ".csv":
            clicks = read_diginetica_clicks(path)
            proto = protocol or SRGNNProtocol.diginetica()
        elif suffix in (".dat", ".txt", ".tsv"):
            clicks = read_yoochoose_clicks(path)
            proto = protocol or SRGNNProtocol.yoochoose(fraction=1 / recent if recent else None)
            if recent and not name:
                label = f"{label} (recent 1/{recent})"
        else:
            raise ValueError(
                f"{path}: cannot tell the format from the suffix {suffix!r}; expected a prepared "
                f"directory, a Diginetica .csv or a Yoochoose .dat/.txt click log (each may be "
                "gzipped: .csv.gz)"
            )
        try:
            prepared = preprocess(clicks, proto)
        except ValueError as err:  # the protocol's filters and split: name the log they ran on
            raise ValueError(f"{path}: {err}") from None
        train_all, test, num_items = prepared.train, prepared.test, prepared.num_items
    train, valid = train_valid_split(train_all, valid_fraction)
    return DataSplits(name=label, train=train, valid=valid, test=test, num_items=num_items)


def default_data_dir() -> Path | None:
    """The shared real-data directory for tests and benchmarks, or ``None`` when there is none.

    ``$FEDENC_DATA`` wins when set (``None`` if it does not exist); otherwise ``../shared/data``
    next to the repository root, then next to the current directory.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    repo_root = Path(__file__).resolve().parents[2]
    for base in (repo_root, Path.cwd()):
        candidate = (base / ".." / "shared" / "data").resolve()
        if candidate.is_dir():
            return candidate
    return None
