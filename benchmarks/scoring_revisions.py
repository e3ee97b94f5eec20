"""The full-softmax loss of this checkout against the one of an earlier git revision, in one
process: the same inputs, the two versions timed alternately, so the shared machine's drift hits
both alike.

Rows: one loss forward and backward on random inputs of SR-GNN's shape (batch 100, d = 100,
43,097 items, normalised scoring), and a whole training step of the trained ``srgnn`` (batch,
encoder, loss, fused Adam) with either loss. Both versions' gradients are compared first.

    python benchmarks/scoring_revisions.py --against 75fc317 --data ../shared/data \\
        --checkpoint runs/accuracy/digi-srgnn-pos
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from _common import interleaved, load_avg, median
from speed import add_data_options, load_examples

import fedenc.encoders.base as encoder_base
from fedenc.data.batching import build_batch
from fedenc.encoders.layers import full_softmax
from fedenc.encoders.registry import build_encoder
from fedenc.training.allocator import tune_allocator
from fedenc.training.checkpoint import load_checkpoint

MODULE = "fedenc/encoders/layers/full_softmax.py"


def module_at(revision: str, workdir: Path) -> ModuleType:
    """``full_softmax.py`` as it was at ``revision``, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    try:
        source = subprocess.run(
            ["git", "show", f"{revision}:{MODULE}"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        err = getattr(exc, "stderr", "") or exc
        raise SystemExit(f"cannot read {MODULE} at {revision!r}: {err}") from exc
    path = workdir / "full_softmax_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("full_softmax_then", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(ap)
    ap.add_argument("--against", required=True, help="git revision to compare with")
    ap.add_argument("--checkpoint", default=None, help="trained srgnn for the step rows")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--batches", type=int, default=10, help="training steps per timed repeat")
    args = ap.parse_args()
    tune_allocator()
    with tempfile.TemporaryDirectory() as tmp:
        then = module_at(args.against, Path(tmp))
        versions: dict[str, Any] = {"this checkout": full_softmax, args.against: then}

        torch.manual_seed(0)
        items, batch, d = 43097, 100, 100
        table = (torch.randn(items + 1, d) * 0.1).requires_grad_()
        session = torch.randn(batch, d) * 3.0
        targets = torch.randint(1, items + 1, (batch,))

        def loss_of(module: Any) -> Any:
            def run() -> tuple[torch.Tensor, torch.Tensor]:
                s = session.clone().requires_grad_()
                table.grad = None
                module.full_softmax_cross_entropy(s, table, targets, True).backward()
                assert s.grad is not None and table.grad is not None
                return s.grad, table.grad

            return run

        now_s, now_t = loss_of(full_softmax)()
        then_s, then_t = loss_of(then)()
        ds = float((now_s - then_s).abs().max() / then_s.abs().max())
        dt = float((now_t - then_t).abs().max() / then_t.abs().max())
        times = interleaved({k: loss_of(m) for k, m in versions.items()}, args.repeats)

        _, ex = load_examples(args)
        if args.checkpoint:
            model, _ = load_checkpoint(args.checkpoint)
        else:
            model = build_encoder("srgnn", ex.num_items)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5, fused=True)
        rng = np.random.default_rng(0)
        index = [rng.integers(0, len(ex), 100) for _ in range(args.batches)]
        cpu = torch.device("cpu")

        current = full_softmax.full_softmax_cross_entropy

        def steps_with(module: Any) -> Any:
            def run() -> None:
                encoder_base.full_softmax_cross_entropy = module.full_softmax_cross_entropy
                try:
                    for idx in index:
                        opt.zero_grad(set_to_none=True)
                        model.loss(build_batch(ex, idx, cpu)).backward()
                        opt.step()
                finally:
                    encoder_base.full_softmax_cross_entropy = current

            return run

        steps_with(full_softmax)()  # warm-up
        steps = interleaved(
            {k: steps_with(m) for k, m in versions.items()}, max(3, args.repeats // 2)
        )

    print(
        f"full-softmax loss, this checkout against {args.against}: {items:,} items, batch {batch}, "
        f"d {d}, {torch.get_num_threads()} threads, load avg {load_avg()}"
    )
    print(f"gradients agree to {max(ds, dt):.1e} of their largest entry (float32)")
    now, old = (median(times[k]) for k in versions)
    print(
        f"loss forward+backward  {1e3 * now:7.2f} ms  against {1e3 * old:7.2f} ms  {now / old:.3f}x"
    )
    now, old = (median(steps[k]) / args.batches for k in versions)
    print(
        f"training step          {1e3 * now:7.2f} ms  against {1e3 * old:7.2f} ms  {now / old:.3f}x"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
