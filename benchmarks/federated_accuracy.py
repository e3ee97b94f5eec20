"""Federated against centralized accuracy on a real data set (issue 3's accuracy benchmark).

Jobs on the same data and the same recipe (srgnn, hidden 100, batch 100, Adam 1e-3, StepLR
3/0.1, seed 0): the centralized baseline (``fedenc train``, E epochs, selected on validation), and
the federation over K children, iid and non-IID (Dirichlet α), so every sample is seen E times in
all of them:

* ``iid``, ``dirichlet``: parallel FedAvg (``weighted_sum``), R = E rounds of one local epoch;
* ``cyclic-iid``, ``cyclic-dirichlet``: cyclic weight transfer (``--sampling cyclic --fraction
  1/K --no-row-weighting --carry-optimizer``), R = E x K rounds, one child a round training one
  local epoch, the Adam moments handed on with the encoder.

The children's validation and test splits are the centralized ones dealt among them, so the
example-weighted federated metrics are metrics on the very same examples.

    python benchmarks/federated_accuracy.py --data ../shared/data/diginetica     # CPU: hours
    python benchmarks/federated_accuracy.py --data DIR --device cuda --parallel --workers 5
    python benchmarks/federated_accuracy.py --collect runs/fed-accuracy          # table only
    python benchmarks/federated_accuracy.py --data DIR --epochs 1 --max-examples 20000
    python benchmarks/federated_accuracy.py --data DIR --only central cyclic-iid cyclic-dirichlet

Prints federated / centralized test P@20 (goal >= 0.97), MRR@20, the first round whose validation
P@20 reaches 0.97 of the centralized best validation P@20, and the bytes the federation moved.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import data_dir

GOAL = 0.97
JOBS = ("iid", "dirichlet", "cyclic-iid", "cyclic-dirichlet")


def _jobs(args: argparse.Namespace, data: Path, out: Path) -> dict[str, list[str]]:
    fedenc = [sys.executable, "-m", "fedenc"]
    common = ["--data", str(data), "--seed", "0"]
    central = [*fedenc, "train", *common, "--encoder", "srgnn", "--epochs", str(args.epochs)]
    central += ["--device", args.device, "--out", str(out / "central")]
    if args.max_examples:
        central += ["--max-examples", str(args.max_examples)]
    if args.threads:
        central += ["--threads", str(args.threads)]
    jobs = {"central": central}
    k = args.children
    cyclic = ["--sampling", "cyclic", "--fraction", str(1 / k), "--no-row-weighting"]
    cyclic += ["--carry-optimizer"]
    cyclic += ["--evaluate-every", str(k)]
    for name, extra, rounds in (
        ("iid", ["--partition", "iid"], args.epochs),
        ("dirichlet", ["--partition", "dirichlet", "--alpha", str(args.alpha)], args.epochs),
        ("cyclic-iid", ["--partition", "iid", *cyclic], args.epochs * k),
        ("cyclic-dirichlet", ["--partition", "dirichlet", "--alpha", str(args.alpha), *cyclic],
         args.epochs * k),
    ):  # fmt: skip
        cmd = [*fedenc, "simulate", *common, "--children", str(k), *extra]
        cmd += ["--encoder", "srgnn", "--rounds", str(rounds), "--local-epochs", "1"]
        cmd += ["--device", args.device, "--out", str(out / name)]
        if args.workers:
            cmd += ["--workers", str(args.workers)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.max_examples:
            cmd += ["--max-examples", str(max(1, args.max_examples // args.children))]
        jobs[name] = cmd
    return {k: v for k, v in jobs.items() if not args.only or k in args.only}


def _run(jobs: dict[str, list[str]], out: Path, parallel: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    running: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    for name, cmd in jobs.items():
        if (out / name / "results.json").is_file():
            print(f"{name}: done before, kept ({out / name})")
            continue
        print(f"{name}: {' '.join(cmd)}", flush=True)
        log = (out / f"{name}.log").open("wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        running[name] = (proc, time.perf_counter())
        if not parallel:
            _wait(name, proc, running[name][1])
    if parallel:
        for name, (proc, t0) in running.items():
            _wait(name, proc, t0)


def _wait(name: str, proc: subprocess.Popen[bytes], t0: float) -> None:
    code = proc.wait()
    print(f"{name}: exit {code} after {time.perf_counter() - t0:.0f} s", flush=True)


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(out: Path) -> dict[str, Any]:
    central = _load(out / "central" / "results.json")
    if central is None:
        raise SystemExit(f"no centralized result in {out / 'central'}: it is the baseline")
    c_test, c_valid = central["test"], central["best_valid"]
    summary: dict[str, Any] = {
        "central": {
            "test_recall@20": c_test["recall@20"],
            "test_mrr@20": c_test["mrr@20"],
            "best_valid_recall@20": c_valid["recall@20"],
            "best_epoch": central["best_epoch"],
            "train_seconds": central.get("train_seconds"),
            "device": central.get("device"),
        }
    }
    print(f"{'job':<16} {'test P@20':>9} {'MRR@20':>7} {'ratio':>6} {'goal':>5} "
          f"{'round>=0.97':>11} {'MB moved':>9} {'seconds':>8}")  # fmt: skip
    print(f"{'central':<16} {c_test['recall@20']:9.2f} {c_test['mrr@20']:7.2f} {1.0:6.3f} "
          f"{'':>5} {'':>11} {'':>9} {central.get('train_seconds', 0):8.0f}")  # fmt: skip
    for name in JOBS:
        fed = _load(out / name / "results.json")
        if fed is None:
            print(f"{name:<16} (no result)")
            continue
        final = fed["final_metrics"]
        p20, mrr = final["test_recall@20"], final["test_mrr@20"]
        ratio = p20 / c_test["recall@20"]
        target = GOAL * c_valid["recall@20"]
        reached = next(
            (r["round"] for r in fed["rounds"]
             if (r["metrics"].get("valid_recall@20") or 0.0) >= target),
            None,
        )  # fmt: skip
        summary[name] = {
            "test_recall@20": p20,
            "test_mrr@20": mrr,
            "ratio_recall@20": ratio,
            "goal_met": ratio >= GOAL,
            "first_round_valid_at_goal": reached,
            "rounds": len(fed["rounds"]),
            "bytes_moved": fed["bytes_moved"],
            "seconds": fed["seconds"],
            "valid_recall@20_by_round": [
                r["metrics"].get("valid_recall@20") for r in fed["rounds"]
            ],
        }
        met = "yes" if ratio >= GOAL else "NO"
        print(f"{name:<16} {p20:9.2f} {mrr:7.2f} {ratio:6.3f} {met:>5} "
              f"{reached if reached is not None else '-':>11} {fed['bytes_moved'] / 1e6:9.1f} "
              f"{fed['seconds']:8.0f}")  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=None, help="SR-GNN-format data set (default diginetica)")
    ap.add_argument("--out", default="runs/fed-accuracy")
    ap.add_argument("--epochs", type=int, default=5, help="centralized epochs = federated rounds")
    ap.add_argument("--children", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="worker processes per federation")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--max-examples", type=int, default=0, help="training pairs per epoch, all")
    ap.add_argument("--parallel", action="store_true", help="run the jobs side by side")
    ap.add_argument("--only", nargs="*", choices=("central", *JOBS))
    ap.add_argument("--collect", default=None, help="print the table of a finished --out")
    args = ap.parse_args()
    if args.collect:
        collect(Path(args.collect))
        return
    root = data_dir(args.data)
    if root is None:
        raise SystemExit("no data: pass --data DIR or set FEDENC_DATA")
    data = root / "diginetica" if (root / "diginetica").is_dir() else root
    out = Path(args.out)
    _run(_jobs(args, data, out), out, args.parallel)
    collect(out)


if __name__ == "__main__":
    main()
