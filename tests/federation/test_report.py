"""A job's outputs: rounds.csv, the round table and metrics.png (with the final test's points)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from fedenc.federation import report


def rounds() -> list[dict[str, Any]]:
    return [
        {
            "round": r,
            "participants": ["a", "b"],
            "sampled": ["a", "b"],
            "excluded": {},
            "num_samples": 30,
            "loss": 5.0 - r,
            "recall_at_20": 10.0 * r,
            "mrr_at_20": 3.0 * r,
            "bytes_moved": 1000,
            "seconds": 0.5,
            "param_change": 0.1,
            "skipped": None,
            "metrics": {"train_loss": 5.0 - r, "valid_recall@20": 10.0 * r},
            "child_seconds": {"a": 1.0, "b": 2.5 * r},
            "child_metrics": {
                "a": {"valid_recall@20": 10.0 * r - 2, "valid_examples": 5.0},
                "b": {"valid_recall@20": 10.0 * r + 2, "valid_examples": 5.0},
            },
        }
        for r in (1, 2, 3)
    ]


def test_rounds_csv_has_a_row_per_round(tmp_path: Path) -> None:
    path = report.write_rounds_csv(rounds(), tmp_path)
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert float(rows[2]["recall@20"]) == 30.0 and rows[0]["participant_names"] == "a;b"
    # which split, and how far apart the children are around the weighted mean
    assert rows[0]["eval_split"] == "valid"
    assert float(rows[2]["children_recall@20_min"]) == 28.0
    assert float(rows[2]["children_recall@20_max"]) == 32.0
    # who each round waited for
    assert rows[2]["slowest_child"] == "b" and float(rows[2]["slowest_child_seconds"]) == 7.5


def test_the_round_table_names_the_split_its_metrics_are_on() -> None:
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(report.round_table(rounds(), "t"))
    assert "the children's validation data" in console.export_text()
    unevaluated = [{**r, "metrics": {}} for r in rounds()]
    console.print(report.round_table(unevaluated, "t"))
    assert console.export_text().count("validation data") == 0  # export clears the record


def test_the_plot_marks_the_final_test_and_names_the_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.figure

    titles: list[str] = []
    labels: list[str] = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig: Any, *args: Any, **kwargs: Any) -> None:
        for ax in fig.axes:
            titles.append(ax.get_title())
            labels.extend(line.get_label() for line in ax.get_lines())
            labels.extend(band.get_label() for band in ax.collections)
        save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    final = {"test_recall@20": 33.0, "test_mrr@20": 9.5}
    path = report.plot_rounds(rounds(), tmp_path, title="srgnn / weighted_sum", final=final)
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "ranking metrics on the children's validation split" in titles
    assert {"Recall@20", "MRR@20", "test Recall@20", "test MRR@20"} <= set(labels)
    assert "Recall@20, children's range" in labels
    # From 10 children on, the extremes say little: the band is p10-p90.
    many = rounds()
    for r in many:
        r["child_metrics"] = {f"c{i}": {"valid_recall@20": float(i)} for i in range(12)}
    labels.clear()
    report.plot_rounds(many, tmp_path, title="many", final=final)
    assert "Recall@20, children's p10-p90" in labels


def test_results_json_says_when_and_with_what_it_was_written(tmp_path: Path) -> None:
    import json

    path = report.write_results({"rounds": rounds()}, tmp_path, {"runtime": {"kind": "x"}})
    record = json.loads(path.read_text())
    assert record["runtime"] == {"kind": "x"} and len(record["rounds"]) == 3
    assert record["written_at"].endswith("+00:00")
    assert {"python", "fedenc", "torch", "flwr"} <= set(record["software"])
    assert record["software"]["torch"].split(".")[0].isdigit()
