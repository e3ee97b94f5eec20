"""How fast a training step could be on this machine: the step's own GEMMs, the exponentials of
its logits and its Adam update, each run alone, against the whole step, in the same run.

The GEMMs are recorded from a real training step (every matrix product that autograd and the
loss dispatch, forward and backward, with its shapes and operand layouts) and replayed back to
back on fresh operands of the same shapes and layouts. The exponentials are those of every
(session, item) logit, which a full softmax cannot skip. Adam is the same fused update over the
same parameters. Their sum is a floor for the step as PyTorch and MKL run it: it cannot take
less, whatever its other work (graph batching, gathers and scatters, the normalisation, the GRU's
gates) costs. The products are recorded with the native loss kernels off (they are not MKL
products); the step is timed both ways, with them ("measured training step") and without.
Everything is timed with the order of the rows flipping every repeat, and the figures are medians.

    python benchmarks/train_floor.py --data ../shared/data \
        --checkpoint runs/accuracy/digi-srgnn-pos      # or digi-srgnn-plain (plain SR-GNN)
    python benchmarks/train_floor.py --synthetic-items 43097       # untrained, no data needed
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from _common import LossKernelCount, interleaved, load_avg, median, native_loss, train_steps
from speed import add_data_options, load_examples
from torch.utils._python_dispatch import TorchDispatchMode

from fedenc.encoders.registry import build_encoder
from fedenc.training.allocator import tune_allocator
from fedenc.training.checkpoint import load_checkpoint
from fedenc.training.table_adam import TableAdam

aten = torch.ops.aten
# Matrix products as they reach the dispatcher (matmul and linear decompose into these).
_PRODUCTS = {
    aten.mm.default: (0, 1),
    aten.mm.out: (0, 1),
    aten.addmm.default: (1, 2),
    aten.addmm.out: (1, 2),
    aten.addmm_.default: (1, 2),
}


@dataclass(frozen=True)
class Gemm:
    """One recorded product ``A @ B``: its shapes and whether each operand was a transposed
    view (column-major), which decides the BLAS kernel and so its speed."""

    m: int
    k: int
    n: int
    a_t: bool
    b_t: bool

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def _transposed(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(0) == 1 and t.shape[0] > 1


class _RecordGemms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.gemms: list[Gemm] = []
        self.unsupported: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        where = _PRODUCTS.get(func)
        if where is not None:
            a, b = args[where[0]], args[where[1]]
            self.gemms.append(
                Gemm(a.shape[0], a.shape[1], b.shape[1], _transposed(a), _transposed(b))
            )
        elif func in (aten.bmm.default, aten.baddbmm.default, aten.mv.default):
            self.unsupported.add(str(func))
        return func(*args, **(kwargs or {}))


def _operand(rows: int, cols: int, transposed: bool) -> torch.Tensor:
    return torch.randn(cols, rows).t() if transposed else torch.randn(rows, cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(ap)
    ap.add_argument("--encoder", default="srgnn")
    ap.add_argument("--checkpoint", default=None, help="a trained encoder (`fedenc train` output)")
    ap.add_argument("--batches", type=int, default=10, help="training steps per timed repeat")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--goal", type=float, default=2500.0, help="train pairs/s to compare with")
    args = ap.parse_args()
    tune_allocator()  # as the trainer does
    name, ex = load_examples(args)
    torch.manual_seed(0)
    if args.checkpoint:
        model, meta = load_checkpoint(args.checkpoint)
        if model.config.num_items != ex.num_items:
            raise SystemExit(
                f"{args.checkpoint} covers {model.config.num_items} items, not {ex.num_items}"
            )
        label = meta["encoder"]
    else:
        model = build_encoder(args.encoder, ex.num_items)
        label = args.encoder
    if not getattr(model.config, "use_positions", True):
        label += " without positions"
    model.train()
    opt = TableAdam(
        model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True, table=model.embedding.weight
    )
    rng = np.random.default_rng(0)
    index = [rng.integers(0, len(ex), 100) for _ in range(args.batches)]
    cpu = torch.device("cpu")

    kernels = LossKernelCount()

    def steps() -> None:
        with kernels.counting(len(index)):
            train_steps(model, opt, ex, index, cpu)

    def steps_torch_loss() -> None:
        with native_loss(False):
            train_steps(model, opt, ex, index, cpu)

    # The products of every step (batches differ in their node counts), as MKL runs them.
    recorder = _RecordGemms()
    with recorder:
        steps_torch_loss()
    if recorder.unsupported:
        raise SystemExit(
            f"the step uses products this replay does not cover: {recorder.unsupported}"
        )
    gemms = recorder.gemms
    operands = [
        (_operand(g.m, g.k, g.a_t), _operand(g.k, g.n, g.b_t), torch.empty(g.m, g.n)) for g in gemms
    ]

    def gemms_alone() -> None:
        for a, b, out in operands:
            torch.mm(a, b, out=out)

    # Every logit of every step, in the loss's 4,096-item blocks.
    n_items, b = ex.num_items, 100
    logits = [torch.randn(min(4096, n_items - lo), b) for lo in range(0, n_items, 4096)]
    exps = [torch.empty_like(z) for z in logits]

    def exps_alone() -> None:
        for _ in index:
            for z, out in zip(logits, exps, strict=True):
                torch.exp2(z, out=out)

    # The same fused Adam over the same parameters, with gradients already in place.
    params = [p.detach().clone() for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    adam_only = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-5, fused=True)

    def adam_alone() -> None:
        for _ in index:
            adam_only.step()

    steps()  # warm-up of each row
    steps_torch_loss()
    gemms_alone()
    exps_alone()
    adam_alone()
    t = interleaved(
        {
            "step": steps,
            "torch": steps_torch_loss,
            "gemms": gemms_alone,
            "exps": exps_alone,
            "adam": adam_alone,
        },
        args.repeats,
    )
    per = {k: 1e3 * median(v) / args.batches for k, v in t.items()}
    flops = sum(g.flops for g in gemms) / args.batches
    floor = per["gemms"] + per["exps"] + per["adam"]
    goal_ms = 1e5 / args.goal
    n_params = sum(p.numel() for p in params)

    def rate(ms: float) -> str:
        return f"{1e5 / ms:10,.0f}"

    print(
        f"{label} on {name}: {ex.num_items:,} items, hidden {model.config.hidden}, batch 100, "
        f"{torch.get_num_threads()} threads, load avg {load_avg()}; medians of {args.repeats} "
        f"repeats of {args.batches} steps, the rows' order flipping every repeat"
    )
    print(f"{'':44s}{'ms/step':>9s}{'pairs/s':>10s}")
    what = f"GEMMs alone: {len(gemms) // args.batches} a step, {flops / 1e9:.2f} GFLOP"
    print(f"{what:44s}{per['gemms']:9.1f}{rate(per['gemms'])}")
    print(f"{'  (their speed, GFLOP/s)':44s}{flops / per['gemms'] / 1e6:9.0f}")
    print(f"{'exp2 of every logit':44s}{per['exps']:9.1f}")
    print(f"{f'fused Adam ({n_params / 1e6:.2f}M parameters)':44s}{per['adam']:9.1f}")
    print(f"{'floor: the three together':44s}{floor:9.1f}{rate(floor)}")
    print(
        f"{'measured step, PyTorch loss':44s}{per['torch']:9.1f}{rate(per['torch'])}"
        f"   (the floor is {100 * floor / per['torch']:.0f}% of it)"
    )
    step_row = f"{'measured training step':44s}{per['step']:9.1f}{rate(per['step'])}"
    print(f"{step_row}   (loss: {kernels.label()})")
    verdict = "below" if goal_ms < floor else "above"
    print(
        f"goal {args.goal:,.0f} pairs/s = {goal_ms:.1f} ms/step: {verdict} the PyTorch floor in "
        f"this run, leaving {goal_ms - floor:+.1f} ms for everything else in the step "
        f"(which takes {per['torch'] - floor:.1f} ms now); the training step is "
        f"{abs(per['step'] - goal_ms):.1f} ms {'over' if per['step'] > goal_ms else 'under'} it"
    )


if __name__ == "__main__":
    main()
