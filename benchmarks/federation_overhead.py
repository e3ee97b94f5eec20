"""The in-process runtime's overhead per round (issue 3): round wall time against the children's
own local training time, as each child measures and reports it, in the same run.

    python benchmarks/federation_overhead.py                   # 4 children, synthetic, hidden 100
    python benchmarks/federation_overhead.py --children 8 --hidden 32 --rounds 6

With the children taking turns in this process (the default), the ideal round is the sum of their
training times; what is left is the runtime and the protocol: serialising the target for every
child and each reply back (Flower's wire format, as a remote child would get it), validating and
folding the replies, the round's bookkeeping. Rounds 2..R-1 are used (round 1 pays the children's
first-touch costs, round R the final evaluation); medians are printed.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import load_avg

from fedenc.runtime.simulate import Scenario, run_scenario


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--children", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=8000)
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scenario = Scenario(
        name="overhead",
        children=args.children,
        rounds=args.rounds,
        hidden=args.hidden,
        synthetic_sessions=args.sessions,
        synthetic_items=args.items,
        evaluate_every=0,  # evaluation only after the last round
        seed=0,
    )
    rounds = run_scenario(scenario).result["rounds"][1:-1]
    wall = [r["seconds"] for r in rounds]
    local = [r["child_seconds_sum"] for r in rounds]
    overhead = [w - t for w, t in zip(wall, local, strict=True)]
    mib = statistics.median(r["bytes_moved"] for r in rounds) / 2**20
    med = statistics.median
    print(f"in-process runtime, {args.children} children (taking turns), hidden {args.hidden}, "
          f"{mib:.1f} MiB moved per round, torch threads {args.threads}, "
          f"load avg {load_avg()}")  # fmt: skip
    print(f"median of rounds 2..{args.rounds - 1}:")
    print(f"  round wall time              {med(wall):8.3f} s")
    print(f"  children's local training    {med(local):8.3f} s   (baseline: sum over children)")
    print(f"  runtime + protocol overhead  {med(overhead):8.3f} s   "
          f"= {100 * med(overhead) / med(local):.1f}% of the local training")  # fmt: skip


if __name__ == "__main__":
    main()
