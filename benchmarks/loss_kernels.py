"""The native loss kernels alone, and the item table's Adam step inside the backward kernel,
against MKL's products and torch's Adam measured in the same run.

At the training shapes (100 sessions, width 100, Diginetica's 43,097 items): the forward kernel
(logits, exp2, row sums, the session-gradient sum), the backward kernel writing the dense table
gradient, and the backward with each row's Adam update (``TableAdam``'s step) against that
backward followed by torch's fused Adam over the same table (what a dense gradient costs).
The baseline rows are MKL's three products of the loss (torch.mm) and torch's fused Adam alone.
Then whole training steps: ``TableAdam`` (the table's gradient deferred) against ``torch.optim.
Adam`` on the dense gradient, both with the native loss. Rows alternate, their order flipping
every repeat; medians.

    python benchmarks/loss_kernels.py --data ../shared/data
    python benchmarks/loss_kernels.py --synthetic-items 43097        # no data needed
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from _common import interleaved, load_avg, median, train_steps
from speed import add_data_options, load_examples

from fedenc.encoders.layers import native_softmax
from fedenc.encoders.layers.native_softmax import AdamHyper
from fedenc.encoders.registry import build_encoder
from fedenc.training.allocator import tune_allocator
from fedenc.training.table_adam import TableAdam


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(ap)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    args = ap.parse_args()
    if native_softmax.library() is None:
        raise SystemExit(
            f"the native kernels are unavailable: {native_softmax.unavailable_reason()}"
        )
    tune_allocator()
    name, ex = load_examples(args)
    n, d, b = ex.num_items, 100, 100
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(n + 1, d, generator=gen) * 0.1
    items = table[1:]
    session = torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1) * 12
    scaled = session * 1.4426950408889634
    blocks, _, _, inv_norm = native_softmax.forward(scaled, items, True, True)
    session_f = torch.randn(b, d, generator=gen) * 1e-4
    grad = torch.empty_like(table)
    exp_avg, exp_avg_sq = torch.zeros_like(table), torch.zeros_like(table)
    hyper = AdamHyper.of(1e-3, 0.9, 0.999, 1e-8, 1e-5, 10)
    empty_i, offsets = torch.empty(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    empty_r = torch.empty(0, d)
    param = torch.nn.Parameter(table.clone())
    param.grad = grad
    torch_adam = torch.optim.Adam([param], lr=1e-3, weight_decay=1e-5, fused=True)
    # MKL's products of the loss: logits (B x d)(d x N), the session sum (B x N)(N x d) and the
    # table gradient (N x B)(B x d), on 4,096-item blocks as the PyTorch path runs them.
    chunks = [items[lo : lo + 4096] for lo in range(0, n, 4096)]
    z = [torch.empty(b, c.shape[0]) for c in chunks]
    acc, g = torch.empty(b, d), [torch.empty(c.shape[0], d) for c in chunks]

    def kernel_forward() -> None:
        native_softmax.forward(scaled, items, True, True)

    def kernel_backward() -> None:
        native_softmax.backward(blocks, session_f, items, inv_norm, grad[1:])

    def kernel_backward_adam() -> None:
        native_softmax.backward_adam(
            blocks, session_f, items, inv_norm, exp_avg[1:], exp_avg_sq[1:], empty_i, offsets,
            empty_r, hyper,
        )  # fmt: skip

    def backward_then_torch_adam() -> None:
        kernel_backward()
        torch_adam.step()

    def mkl_products() -> None:
        for c, zc, gc in zip(chunks, z, g, strict=True):
            torch.mm(session, c.t(), out=zc)
            acc.addmm_(zc, c)
            torch.mm(zc.t(), session_f, out=gc)

    rows = {
        "forward kernel": kernel_forward,
        "backward kernel (dense gradient)": kernel_backward,
        "backward kernel + Adam per row": kernel_backward_adam,
        "backward kernel, then torch's Adam": backward_then_torch_adam,
        "MKL's 3 products alone (baseline)": mkl_products,
        "torch's fused Adam alone (baseline)": torch_adam.step,
    }
    for fn in rows.values():
        fn()
    t = interleaved(rows, args.repeats)

    # Whole steps: the table's gradient deferred (TableAdam) or dense (torch's Adam).
    torch.manual_seed(0)
    model = build_encoder("srgnn", n)
    twin = copy.deepcopy(model)
    opt = TableAdam(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True,
                    table=model.embedding.weight)  # fmt: skip
    opt_dense = torch.optim.Adam(twin.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
    rng = np.random.default_rng(0)
    index = [rng.integers(0, len(ex), b) for _ in range(args.steps)]
    cpu = torch.device("cpu")
    steps = {
        "step, TableAdam (deferred)": lambda: train_steps(model, opt, ex, index, cpu),
        "step, torch Adam (dense)": lambda: train_steps(twin, opt_dense, ex, index, cpu),
    }
    for fn in steps.values():
        fn()
    t |= {k: [x / args.steps for x in v] for k, v in interleaved(steps, args.repeats).items()}

    gflop = 2 * b * d * n / 1e9
    print(
        f"loss kernels on {name}: {n:,} items, width {d}, {b} sessions, "
        f"{torch.get_num_threads()} threads, load avg {load_avg()}, medians of {args.repeats}"
    )
    print(f"{'':40s}{'ms':>8s}{'GFLOP/s':>9s}")
    for what, flop in (
        ("forward kernel", 2 * gflop),
        ("backward kernel (dense gradient)", gflop),
        ("backward kernel + Adam per row", gflop),
        ("backward kernel, then torch's Adam", gflop),
        ("MKL's 3 products alone (baseline)", 3 * gflop),
        ("torch's fused Adam alone (baseline)", 0.0),
        ("step, TableAdam (deferred)", 0.0),
        ("step, torch Adam (dense)", 0.0),
    ):
        ms = 1e3 * median(t[what])
        rate = f"{flop / ms * 1e3:9.0f}" if flop else ""
        print(f"{what:40s}{ms:8.2f}{rate}")
    kernels = 1e3 * (median(t["forward kernel"]) + median(t["backward kernel (dense gradient)"]))
    mkl = 1e3 * median(t["MKL's 3 products alone (baseline)"])
    fused = median(t["backward kernel + Adam per row"]) / median(
        t["backward kernel, then torch's Adam"]
    )
    step = median(t["step, TableAdam (deferred)"]) / median(t["step, torch Adam (dense)"])
    print(
        f"kernels' forward + backward: {kernels:.2f} ms against MKL's products alone {mkl:.2f} ms "
        f"({kernels / mkl:.2f}x); Adam inside the backward: {fused:.2f}x the backward + torch's "
        f"Adam; a training step with TableAdam: {step:.2f}x the step with torch's Adam"
    )


if __name__ == "__main__":
    main()
