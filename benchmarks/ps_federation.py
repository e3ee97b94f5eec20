"""Placement (b), the federation-level PS, against federating the dense item table.

Three runs of the same scenario on the in-process runtime (same children, data, seeds):

* ``dense``: ``share = all``, the whole encoder including the item table goes to and comes back
  from every child each round (plain FedAvg);
* ``b-full``: the table in the federation PS, full-softmax scoring: each child sends the rows
  of the items in its data, weighted by their samples (the dense rule's row weights, from the
  same initial table), and pulls the whole table each round;
* ``b-sampled``: the table in the federation PS, sampled softmax (clicked items, targets and
  ``--negatives`` uniform rows per batch): pulls only the rows touched, sends those of its data.

Per run: the training exchange's bytes per round (train messages and replies, plus for
placement b the rows pulled from the federation PS while training; evaluation excluded), the
item-table part of it (dense: the table down and up for every child), rows touched, and test
Recall@20 ("P@20" in the issue, as in SR-GNN) and MRR@20 of the published encoder.

    python benchmarks/ps_federation.py                       # synthetic (default)
    python benchmarks/ps_federation.py --data ../shared/data/diginetica --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedenc.federation.report import human_bytes  # noqa: E402
from fedenc.runtime.simulate import Scenario, run_scenario  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="SR-GNN data directory (default synthetic)")
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--sessions", type=int, default=6000, help="synthetic sessions")
    parser.add_argument("--items", type=int, default=2000, help="synthetic catalog")
    parser.add_argument("--partition", default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--negatives", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=0, help="per child and epoch")
    parser.add_argument("--runs", default="dense,b-full,b-sampled")
    args = parser.parse_args()
    base = Scenario(
        name="ps-federation",
        children=args.children,
        rounds=args.rounds,
        hidden=args.hidden,
        data=args.data,
        synthetic_sessions=args.sessions,
        synthetic_items=args.items,
        partition=args.partition,
        alpha=args.alpha,
        evaluate_every=0,  # only the last round: evaluation bytes stay out of the figures
        max_examples_per_epoch=args.max_examples,
    )
    runs: dict[str, Scenario] = {
        "dense": base.with_overrides(share="all"),
        "b-full": base.with_overrides(ps="federation", ps_scoring="full"),
        "b-sampled": base.with_overrides(
            ps="federation", ps_scoring="sampled", ps_negatives=args.negatives
        ),
    }
    chosen = [r for r in args.runs.split(",") if r]
    print(
        f"== {args.data or 'synthetic'}: {args.children} children ({args.partition}), "
        f"{args.rounds} rounds, srgnn d = {args.hidden}; sampled negatives {args.negatives}"
    )
    header = (
        f"{'run':<11s}{'train B/round':>15s}{'table B/round':>15s}{'rows touched':>17s}"
        f"{'R@20':>8s}{'MRR@20':>8s}{'seconds':>9s}"
    )
    print(header)
    dense_recall = dense_mrr = None
    for name in chosen:
        t0 = time.perf_counter()
        result: dict[str, Any] = run_scenario(runs[name]).result
        seconds = time.perf_counter() - t0
        rounds = result["rounds"]
        train = statistics.mean(r["train_bytes"] for r in rounds)
        if name == "dense":
            sent = sum(len(r["sampled"]) + len(r["participants"]) for r in rounds) / len(rounds)
            nbytes = 4 * args.hidden * (_catalog(result) + 1)
            table = sent * nbytes
            touched = "all"
        else:
            table = statistics.mean(r["table_bytes"] for r in rounds)
            fused = statistics.mean(r["metrics"].get("ps_rows_fused", 0) for r in rounds)
            received = statistics.mean(r["metrics"].get("ps_rows_received", 0) for r in rounds)
            touched = f"{received:,.0f}/{fused:,.0f}"
        final = result["final_metrics"]
        recall, mrr = final.get("test_recall@20", float("nan")), final.get("test_mrr@20", 0.0)
        if name == "dense":
            dense_recall, dense_mrr = recall, mrr
        print(
            f"{name:<11s}{human_bytes(train):>15s}{human_bytes(table):>15s}{touched:>17s}"
            f"{recall:>8.2f}{mrr:>8.2f}{seconds:>9.1f}"
        )
        if dense_recall is not None and dense_mrr is not None and name != "dense":
            print(
                f"{'':<11s}vs dense: R@20 {recall - dense_recall:+.2f}, "
                f"MRR@20 {mrr - dense_mrr:+.2f} points (goal: within 0.3)"
            )
    print(
        "rows touched = sparse rows received (all children) / rows fused per round; table "
        "B/round for b = sparse rows sent + rows pulled while training"
    )


def _catalog(result: dict[str, Any]) -> int:
    return int(result["encoder_config"]["num_items"])


if __name__ == "__main__":
    main()
