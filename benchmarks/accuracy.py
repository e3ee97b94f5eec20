"""Accuracy table: every encoder on Diginetica (and srgnn on Yoochoose 1/64), selected on
validation, reported on test once, next to plain SR-GNN (positions off) trained in the same run
and the published anchors.

    python benchmarks/accuracy.py --data ../shared/data        # everything (hours on 2 cores)
    python benchmarks/accuracy.py --data ../shared/data --only digi-srgnn-pos digi-srgnn-plain
    python benchmarks/accuracy.py --collect runs/accuracy                # table from finished runs

Each run is ``fedenc train ... --out runs/accuracy/NAME``; a finished run (results.json present) is
not repeated, so the script can be resumed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import data_dir

RUNS: dict[str, tuple[str, list[str]]] = {
    "digi-srgnn-pos": ("diginetica", ["--encoder", "srgnn"]),
    "digi-srgnn-plain": ("diginetica", ["--encoder", "srgnn", "--no-positions"]),
    # The published SR-GNN: no positions and unnormalised scoring (the rows above normalise).
    "digi-srgnn-published": (
        "diginetica",
        ["--encoder", "srgnn", "--no-positions", "--no-normalize"],
    ),
    "digi-edge_attn": ("diginetica", ["--encoder", "edge_attn"]),
    "digi-skip_rnn": ("diginetica", ["--encoder", "skip_rnn"]),
    "yc-srgnn-pos": ("yoochoose1_64", ["--encoder", "srgnn"]),
}
# Published P@20 / MRR@20 (best epoch picked on test in the papers).
ANCHORS = {
    "diginetica": "SR-GNN 50.73/17.59, TAGNN 51.31/18.03, NISER+ 53.39/18.72, NARM 49.70/16.17",
    "yoochoose1_64": "SR-GNN 70.57/30.94, TAGNN 71.02/31.12, NARM 68.32/28.63",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="runs/accuracy")
    ap.add_argument("--only", nargs="*", default=None, choices=sorted(RUNS))
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--extra", default="", help="extra options for every `fedenc train`")
    ap.add_argument("--collect", default=None, help="only print the table of this directory")
    ap.add_argument("--plot", default=None, help="write validation curves to this PNG")
    args = ap.parse_args()
    out = Path(args.collect or args.out)
    if args.collect is None:
        root = data_dir(args.data)
        if root is None:
            sys.exit("real data not found: pass --data DIR or set FEDENC_DATA")
        for name in args.only or list(RUNS):
            dataset, opts = RUNS[name]
            if (out / name / "results.json").is_file():
                continue
            cmd = [
                sys.executable,
                "-m",
                "fedenc.cli",
                "train",
                "--data",
                str(root / dataset),
                "--epochs",
                str(args.epochs),
                "--out",
                str(out / name),
                *opts,
                *args.extra.split(),
            ]
            print("$", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    print(
        f"{'run':20s}{'P@20':>7s}{'MRR@20':>8s}{'P@10':>7s}{'MRR@10':>8s}{'epoch':>6s}"
        f"{'train pairs/s':>14s}  published"
    )
    for path in sorted(out.glob("*/results.json")):
        r = json.loads(path.read_text())
        t = r["test"]
        rate = sorted(h["train_pairs_per_s"] for h in r["history"])[len(r["history"]) // 2]
        dataset = r["data"]["name"]
        print(
            f"{path.parent.name:20s}{t['recall@20']:7.2f}{t['mrr@20']:8.2f}{t['recall@10']:7.2f}"
            f"{t['mrr@10']:8.2f}{r['best_epoch']:6d}{rate:14,.0f}  {ANCHORS.get(dataset, '')}"
        )
    if args.plot:
        plot(out, args.plot)


def plot(out: Path, png: str) -> None:
    """Validation Recall@20 / MRR@20 per epoch of every finished run, with test as a marker;
    one row of panels per dataset, so each keeps its own scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path in sorted(out.glob("*/results.json")):
        r = json.loads(path.read_text())
        runs.setdefault(r["data"]["name"], []).append((path.parent.name, r))
    fig, grid = plt.subplots(len(runs), 2, figsize=(11, 3.6 * len(runs)), squeeze=False)
    for axes, (dataset, items) in zip(grid, sorted(runs.items()), strict=True):
        for name, r in items:
            epochs = [h["epoch"] for h in r["history"]]
            for ax, key in zip(axes, ("recall@20", "mrr@20"), strict=True):
                (line,) = ax.plot(
                    epochs, [h[f"valid_{key}"] for h in r["history"]], marker="o", label=name
                )
                ax.scatter(
                    [r["best_epoch"]], [r["test"][key]], marker="*", s=120, color=line.get_color()
                )
        for ax, key in zip(axes, ("Recall@20 (P@20)", "MRR@20"), strict=True):
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{key}, %")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.set_title(f"{dataset}: {key}")
        axes[1].legend(fontsize=8)
    fig.suptitle("validation per epoch; ★ = test at the epoch selected on validation")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot written to {png}")


if __name__ == "__main__":
    main()
