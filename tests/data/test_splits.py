"""Train/valid/test splits, load_dataset on every source kind, and the data-dir helper."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fedenc.data.readers import DataFormatError
from fedenc.data.sessions import Sessions
from fedenc.data.splits import (
    DATA_ENV,
    DataSplits,
    default_data_dir,
    load_dataset,
    train_valid_split,
)


def numbered(n: int) -> Sessions:
    return Sessions.from_lists(
        [[i + 1, i + 2] for i in range(n)], timestamps=[float(i) for i in range(n)]
    )


def test_valid_is_the_end_of_train() -> None:
    train, valid = train_valid_split(numbered(20), 0.1)
    assert len(train) == 18 and len(valid) == 2
    assert valid.to_lists() == [[19, 20], [20, 21]]
    assert train.num_items == valid.num_items == 21
    assert valid.timestamps is not None and valid.timestamps.tolist() == [18.0, 19.0]


def test_valid_fraction_edges() -> None:
    train, valid = train_valid_split(numbered(5), 0.0)
    assert len(train) == 5 and len(valid) == 0
    train, valid = train_valid_split(numbered(5), 0.01)
    assert len(valid) == 1  # a positive fraction always yields a validation session
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="valid_fraction"):
            train_valid_split(numbered(5), bad)


def test_data_splits_summary_and_catalog_check() -> None:
    s = Sessions.from_lists([[1, 2, 3], [2, 4]], num_items=6)
    t = Sessions.from_lists([[5, 2]], num_items=6)
    d = DataSplits("toy", train=s, valid=s.subset([1]), test=t, num_items=6)
    summary = d.summary()
    assert summary["train_examples"] == 3 and summary["valid_examples"] == 1
    assert summary["test_examples"] == 1 and summary["test_items_unseen_in_train"] == 1
    assert summary["train_items"] == 4 and summary["name"] == "toy"
    with pytest.raises(ValueError, match="num_items"):
        DataSplits("bad", train=s, valid=s, test=Sessions.from_lists([[1, 2]]), num_items=6)


def test_load_prepared_directory_shares_catalog(tmp_path: Path) -> None:
    (tmp_path / "train_sessions.txt").write_text("1 2\n2 3 1\n3 1\n1 2\n")
    (tmp_path / "test_sessions.txt").write_text("1 9\n")
    d = load_dataset(tmp_path, valid_fraction=0.25)
    assert d.num_items == 9
    assert d.train.num_items == d.valid.num_items == d.test.num_items == 9
    assert d.train.to_lists() == [[1, 2], [2, 3, 1], [3, 1]]
    assert d.valid.to_lists() == [[1, 2]]
    assert d.name == tmp_path.name


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(missing)
    (tmp_path / "train_sessions.txt").write_text("1 2\n")
    with pytest.raises(FileNotFoundError, match=r"test_sessions\.txt"):
        load_dataset(tmp_path)
    odd = tmp_path / "clicks.parquet"
    odd.write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_dataset(odd)
    bad = tmp_path / "clicks.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataFormatError, match=r"clicks\.csv, line 1"):
        load_dataset(bad)
    tiny = tmp_path / "tiny.csv"  # well-formed, but every item is too rare for the protocol
    tiny.write_text(
        "sessionId;userId;itemId;timeframe;eventdate\n1;;5;0;2016-05-01\n1;;6;9;2016-05-01\n"
    )
    with pytest.raises(ValueError, match=r"tiny\.csv: no session survives"):
        load_dataset(tiny)


def test_load_raw_csv(tmp_path: Path) -> None:
    lines = ["session_id;user_id;item_id;timeframe;eventdate"]
    for s in range(1, 41):
        day = 1 + s // 2  # 40 sessions over 20 days
        for k, item in enumerate((1 + s % 3, 4 + s % 2, 1 + s % 3)):
            lines.append(f"{s};NA;{item};{k};2016-01-{day:02d}")
    path = tmp_path / "views.csv"
    path.write_text("\n".join(lines) + "\n")
    d = load_dataset(path)
    assert d.name == "views"
    assert d.num_items == 5
    assert len(d.train) + len(d.valid) + len(d.test) < 40  # the split day itself is dropped
    assert len(d.test) > 0
    assert d.train.timestamps is not None


def test_default_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "absent"))
    assert default_data_dir() is None
    monkeypatch.delenv(DATA_ENV)
    found = default_data_dir()
    assert found is None or found.is_dir()


# ---------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def diginetica(real_file: Callable[[str], Path]) -> DataSplits:
    return load_dataset(real_file("diginetica"))


def test_real_diginetica_counts(diginetica: DataSplits) -> None:
    d = diginetica
    assert d.num_items == 43097
    assert d.train.num_examples + d.valid.num_examples == 719470
    assert len(d.train) + len(d.valid) == 186670
    assert d.test.num_examples == 60858
    assert len(d.test) == 15963
    assert len(d.valid) == round(0.1 * 186670)


def test_real_yoochoose_1_64_catalog(real_file: Callable[[str], Path]) -> None:
    d = load_dataset(real_file("yoochoose1_64"))
    assert d.num_items == 37483  # ids numbered over the full Yoochoose training set
    assert d.train.num_examples + d.valid.num_examples == 369859
    assert d.test.num_examples == 55898


def test_real_raw_sources(real_file: Callable[[str], Path]) -> None:
    sample = load_dataset(real_file("srgnn_sample/sample_train-item-views.csv"))
    assert sample.summary()["test_items_unseen_in_train"] == 7  # seen in train+valid, not train
    assert np.isin(
        sample.test.items, np.concatenate([sample.train.items, sample.valid.items])
    ).all()
    # The session-rec split without its last day: 6 days, so the 1-day test split is non-empty.
    yoo = load_dataset(real_file("yoochoose_clicks_100k/yoochoose-clicks-100k_train_tr.txt"))
    assert len(yoo.test) > 0 and yoo.train.lengths.min() >= 2
    assert yoo.train.timestamps is not None and yoo.test.timestamps is not None
    assert yoo.train.timestamps.max() < yoo.test.timestamps.min()
    # recent = 4: the most recent quarter of the training pairs (SR-GNN's Yoochoose 1/4), the
    # same test split.
    quarter = load_dataset(
        real_file("yoochoose_clicks_100k/yoochoose-clicks-100k_train_tr.txt"), recent=4
    )
    whole = yoo.train.num_examples + yoo.valid.num_examples
    part = quarter.train.num_examples + quarter.valid.num_examples
    assert whole // 4 <= part < whole // 4 + quarter.train.lengths.max()
    assert quarter.test.to_lists() == yoo.test.to_lists() and "1/4" in quarter.name
    with pytest.raises(ValueError, match="raw Yoochoose click log only"):
        load_dataset(real_file("srgnn_sample/sample_train-item-views.csv"), recent=4)


def test_recent_is_refused_for_a_gzipped_diginetica_log(tmp_path: Path) -> None:
    log = tmp_path / "views.csv.gz"
    log.write_bytes(b"")
    with pytest.raises(ValueError, match="raw Yoochoose click log only"):
        load_dataset(log, recent=64)
