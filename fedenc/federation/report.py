"""A job's outputs: ``results.json``, ``rounds.csv``, a plot of the metrics by round, and the
per-round table, all from :meth:`MasterResult.to_dict` (so they can be rebuilt from the JSON).

The table's columns: participants (accepted / sampled), train loss, Recall@20 and MRR@20 of the
target on the children's held-out data (the caption says which split), tensor bytes moved (both
directions), seconds. ``rounds.csv`` adds the split and the range of the children's own Recall@20
(``results.json`` has every child's metrics, ``child_metrics``).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from fedenc import atomic

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
ROUNDS_FILE = "rounds.csv"
PLOT_FILE = "metrics.png"
ROUND_COLUMNS = (
    "round",
    "participants",
    "sampled",
    "excluded",
    "num_samples",
    "loss",
    "recall@20",
    "mrr@20",
    "bytes_moved",
    "seconds",
    "param_change",
    "skipped",
    "participant_names",
    "eval_split",
    "children_recall@20_min",
    "children_recall@20_max",
    "slowest_child",
    "slowest_child_seconds",
)


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def eval_split(r: Mapping[str, Any]) -> str:
    """The split a round's ranking metrics were measured on ("valid", "test"; "" when the round
    was not evaluated): its metric names carry it."""
    for key in r.get("metrics") or {}:
        if key.endswith("_recall@20"):
            return str(key.removesuffix("_recall@20"))
    return ""


def split_name(rounds: Sequence[Mapping[str, Any]]) -> str | None:
    """ "validation" or "test": the split the rounds' ranking metrics were measured on (None
    when no round was evaluated)."""
    splits = {eval_split(r) for r in rounds} - {""}
    split = next(iter(splits)) if len(splits) == 1 else None
    return {"valid": "validation"}.get(split, split) if split else None


#: From this many children on, their spread is shown as p10-p90: the extremes of many small
#: children span about everything.
DECILES_FROM = 10


def deciles(values: Sequence[float]) -> tuple[float, float]:
    """The 10th and 90th percentiles of ``values`` (at least two): one definition for the
    console and the plot."""
    cuts = statistics.quantiles(values, n=10)
    return cuts[0], cuts[-1]


def children_recall(r: Mapping[str, Any]) -> list[float]:
    """The evaluated children's own Recall@20 in a round (their weighted mean is the round's)."""
    return [
        float(v)
        for m in (r.get("child_metrics") or {}).values()
        for k, v in m.items()
        if k.endswith("_recall@20")
    ]


def round_row(r: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a round dict (``RoundResult.to_dict()``)."""
    spread = children_recall(r)
    times: dict[str, float] = r.get("child_seconds") or {}
    slowest = max(times, key=times.__getitem__) if times else ""
    return {
        "round": r["round"],
        "participants": len(r["participants"]),
        "sampled": len(r["sampled"]),
        "excluded": len(r["excluded"]),
        "num_samples": r["num_samples"],
        "loss": r["loss"],
        "recall@20": r["recall_at_20"],
        "mrr@20": r["mrr_at_20"],
        "bytes_moved": r["bytes_moved"],
        "seconds": round(float(r["seconds"]), 4),
        "param_change": r["param_change"],
        "skipped": r["skipped"] or "",
        "participant_names": ";".join(r["participants"]),
        "eval_split": eval_split(r),
        "children_recall@20_min": min(spread) if spread else None,
        "children_recall@20_max": max(spread) if spread else None,
        "slowest_child": slowest,
        "slowest_child_seconds": round(times[slowest], 4) if slowest else None,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def round_table(rounds: Sequence[Mapping[str, Any]], title: str = "") -> Table:
    """A rich table of the rounds so far; its caption names the split Recall and MRR are on."""
    split = split_name(rounds)
    caption = f"Recall@20, MRR@20: weighted over the children's {split} data" if split else None
    table = Table(title=title or None, caption=caption)
    for name in ("round", "participants", "loss", "Recall@20", "MRR@20", "bytes moved", "seconds"):
        table.add_column(name, justify="right")
    for r in rounds:
        participants = f"{len(r['participants'])}/{len(r['sampled'])}"
        if r.get("skipped"):
            participants += " (skipped)"
        table.add_row(
            str(r["round"]),
            participants,
            _fmt(r["loss"], 4),
            _fmt(r["recall_at_20"]),
            _fmt(r["mrr_at_20"]),
            human_bytes(float(r["bytes_moved"])),
            _fmt(r["seconds"]),
        )
    return table


def write_results(
    result: Mapping[str, Any], out_dir: Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """``results.json``: the result dict plus ``extra`` (scenario, runtime counters)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_FILE
    record = {**result, **(extra or {}), "written_at": _now(), "software": software_versions()}
    atomic.write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def software_versions() -> dict[str, str]:
    """What produced a result (for an audit, and for numbers that change with a library)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("fedenc", "torch", "flwr", "grpcio", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def write_rounds_csv(rounds: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ROUNDS_FILE
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(ROUND_COLUMNS))
    writer.writeheader()
    for r in rounds:
        writer.writerow(round_row(r))
    atomic.write_text(path, text.getvalue())
    return path


def plot_rounds(
    rounds: Sequence[Mapping[str, Any]],
    out_dir: Path,
    title: str = "",
    final: Mapping[str, Any] | None = None,
) -> Path | None:
    """A PNG of Recall@20, MRR@20 (with the final test's, when there is one) and the train loss
    by round; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        log.warning("matplotlib is not installed: no %s", PLOT_FILE)
        return None
    xs = [int(r["round"]) for r in rounds]
    fig, (ax_rank, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("recall_at_20", "Recall@20"), ("mrr_at_20", "MRR@20")):
        points = [(x, _num(r[key])) for x, r in zip(xs, rounds, strict=True) if r[key] is not None]
        if points:
            ax_rank.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    # The children's spread around the weighted mean (their own metrics on their own split).
    spread = [(x, children_recall(r)) for x, r in zip(xs, rounds, strict=True)]
    spread = [(x, v) for x, v in spread if len(v) > 1]
    if spread:
        many = all(len(v) >= DECILES_FROM for _, v in spread)
        bands = [deciles(v) if many else (min(v), max(v)) for _, v in spread]
        ax_rank.fill_between([x for x, _ in spread], [b[0] for b in bands],
                             [b[1] for b in bands], color="C0", alpha=0.15,
                             label="Recall@20, children's p10-p90" if many
                             else "Recall@20, children's range")  # fmt: skip
    final = final or {}
    for key, label, color in (("test_recall@20", "test Recall@20", "C0"),
                              ("test_mrr@20", "test MRR@20", "C1")):  # fmt: skip
        if xs and final.get(key) is not None:
            ax_rank.plot([xs[-1]], [_num(final[key])], marker="*", markersize=14, color=color,
                         linestyle="none", label=label)  # fmt: skip
    # Which split the rounds were scored on: the children's validation split unless the job
    # evaluated on test (eval-split); the round's metric names say it.
    split = split_name(rounds) or "validation"
    ax_rank.set_xlabel("round")
    ax_rank.set_ylabel("%")
    ax_rank.set_title(f"ranking metrics on the children's {split} split")
    ax_rank.grid(alpha=0.3)
    if ax_rank.get_legend_handles_labels()[0]:
        ax_rank.legend()
    losses = [
        (x, _num(r["loss"])) for x, r in zip(xs, rounds, strict=True) if r["loss"] is not None
    ]
    if losses:
        ax_loss.plot([p[0] for p in losses], [p[1] for p in losses], marker="o", color="C3")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("children's train loss (weighted)")
    ax_loss.grid(alpha=0.3)
    for ax in (ax_rank, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_outputs(
    result: Mapping[str, Any], out_dir: Path, extra: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """results.json, rounds.csv and the plot under ``out_dir``; the paths written."""
    rounds = result["rounds"]
    paths = {
        "results": write_results(result, out_dir, extra),
        "rounds": write_rounds_csv(rounds, out_dir),
    }
    try:
        plot = plot_rounds(
            rounds,
            out_dir,
            title=f"{result['encoder']} / {result['rule']}",
            final=result.get("final_metrics"),
        )
    except OSError as err:  # a picture of rounds.csv: not worth failing a finished job over
        log.warning("the plot of the rounds was not written (%s); rounds.csv has them", err)
        plot = None
    if plot is not None:
        paths["plot"] = plot
    return paths
