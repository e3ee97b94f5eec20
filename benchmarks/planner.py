"""The execution planner on this machine: predicted against measured step time for every
candidate, the chosen plan against the plain loop (the default), and round time of a straggler
federation with cost-balanced against uniform local work.

Step times are medians over interleaved repeats (every candidate runs one timed block per repeat,
in turn), so machine noise hits all of them alike; predictions come from the planner's cost
model (profiled before, or read from the machine's cache).

    python benchmarks/planner.py --data ../shared/data            # Diginetica, 43,097 items
    python benchmarks/planner.py --synthetic-items 43097           # no data needed
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from typing import Any

import numpy as np
import torch
from _common import interleaved, load_avg, median, train_steps
from speed import add_data_options, load_examples

from fedenc.encoders.registry import build_encoder
from fedenc.planner.plan import PlanChoice, PlannedSteps, Planner
from fedenc.training.table_adam import TableAdam


def adam(params: Any, table: Any = None) -> torch.optim.Optimizer:
    return TableAdam(params, lr=1e-3, weight_decay=1e-5, fused=True, table=table)  # the trainer's


def step_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    name, ex = load_examples(args)
    torch.manual_seed(0)
    model = build_encoder("srgnn", ex.num_items, hidden=100)
    cache = tempfile.mkdtemp(prefix="fedenc-plan-") if args.fresh else args.cache
    planner = Planner(model, adam, ex, 100, device=args.device, cache_dir=cache)
    choice = planner.choose("auto", log=print)
    for line in choice.explain(top=8):
        print(line)
    rng = np.random.default_rng(1)
    blocks = [rng.integers(0, len(ex), 100) for _ in range(args.batches)]

    # One copy per device, shared by the variants there: its values do not matter.
    copies: dict[str, tuple[Any, torch.optim.Optimizer]] = {}

    def on(device: str) -> tuple[Any, torch.optim.Optimizer]:
        if device not in copies:
            m = copy.deepcopy(model).to(device)
            copies[device] = (m, adam(list(m.parameters()), m.embedding.weight))
        return copies[device]

    work, opt = on("cpu")
    cpu = torch.device("cpu")

    def plain() -> None:
        train_steps(work, opt, ex, blocks, cpu)

    specs = planner.candidates()
    if args.only:
        specs = [s for s in specs if s.name in args.only.split(",")]
    if choice.spec is not None and choice.spec not in specs:
        specs.append(choice.spec)
    runners: dict[str, PlannedSteps] = {}
    variants: dict[str, Any] = {"default": plain}
    for spec in specs:
        _, sched, graph = planner.predict(spec)
        c = PlanChoice("bench", spec, schedule=sched, graph=graph)
        runners[spec.name] = PlannedSteps(*on(spec.device), c, planner.workload)

        def run(r: PlannedSteps = runners[spec.name]) -> None:
            for _ in r.run(ex, iter(blocks)):
                pass

        variants[spec.name] = run
    torch.set_num_threads(planner.cores)  # the plain loop as the trainer runs it by default
    for fn in variants.values():  # warm-up
        fn()
    times = interleaved(variants, args.repeats)
    for r in runners.values():
        r.close()
    per_step = {k: median(v) / args.batches for k, v in times.items()}
    print(
        f"\nsrgnn on {name}: {ex.num_items:,} items, hidden 100, batch 100, {planner.cores} cores, "
        f"load avg {load_avg()}; median of {args.repeats} interleaved repeats of "
        f"{args.batches} steps (shared, noisy machine)"
    )
    print(f"{'plan':24s}{'predicted ms':>14s}{'measured ms':>13s}{'error':>8s}")
    errors = []
    for spec in specs:
        pred = choice.predicted.get(spec.name) or planner.predict(spec)[0]
        meas = per_step[spec.name]
        err = pred / meas - 1
        errors.append(abs(err))
        mark = "  <- chosen" if choice.spec == spec else ""
        print(f"{spec.name:24s}{1000 * pred:14.2f}{1000 * meas:13.2f}{err:+8.1%}{mark}")
    base = choice.baseline
    print(
        f"{'default (plain loop)':24s}{1000 * choice.predicted.get(base, float('nan')):14.2f}"
        f"{1000 * per_step['default']:13.2f}   (predicted = {base})"
    )
    within = sum(e <= 0.2 for e in errors)
    print(f"within 20%: {within}/{len(errors)} candidates; median |error| {median(errors):.1%}")
    chosen = choice.name
    chosen_ms = per_step[chosen] if chosen != "default" else per_step["default"]
    gain = 1 - chosen_ms / per_step["default"]
    print(
        f"chosen {chosen}: {1000 * chosen_ms:.2f} ms/step vs default "
        f"{1000 * per_step['default']:.2f} ms/step: {gain:+.1%} time saved "
        f"({per_step['default'] / chosen_ms:.2f}x)"
    )
    return {
        "dataset": name,
        "chosen": chosen,
        "per_step_s": per_step,
        "predicted_s": choice.predicted,
        "gain": gain,
    }


def straggler_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    # Imported here: the step benchmark alone runs without Flower (e.g. on a bare GPU machine).
    from fedenc.runtime.simulate import Scenario, run_scenario

    base = Scenario(
        name="straggler",
        children=4,
        rounds=args.rounds,
        hidden=32,
        synthetic_sessions=8000,
        synthetic_items=2000,
        evaluate_every=0,
        concurrency=4,
        threads=1,
        max_examples_per_epoch=400,
        slowdown=(1.0, 1.0, 1.0, 4.0),
    )
    out: dict[str, Any] = {}
    for label, scenario in (
        ("uniform", base),
        ("balanced", base.with_overrides(balance_work=True)),
    ):
        torch.set_num_threads(1)
        rounds = run_scenario(scenario).result["rounds"]
        later = [r["seconds"] for r in rounds[1:]]  # round 1 is uniform in both: no costs yet
        out[label] = {"round_s": median(later), "work": rounds[-1]["work"]}
    u, b = out["uniform"]["round_s"], out["balanced"]["round_s"]
    print(
        f"\nstraggler federation: 4 children (one 4x slower), 400 examples/epoch each uniform, "
        f"rounds 2..{args.rounds} (median)"
    )
    print(f"uniform work:        {u:7.2f} s/round")
    print(
        f"cost-balanced work:  {b:7.2f} s/round   ({u / b:.2f}x faster), "
        f"work {out['balanced']['work']}"
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(ap)
    ap.add_argument("--batches", type=int, default=10, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--only", default="", help="comma-separated candidate names to measure")
    ap.add_argument("--cache", default=None, help="cost cache directory (default: per machine)")
    ap.add_argument("--fresh", action="store_true", help="profile now, ignore the cache")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--skip-straggler", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result = {"step": step_benchmark(args)}
    if not args.skip_straggler:
        result["straggler"] = straggler_benchmark(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
