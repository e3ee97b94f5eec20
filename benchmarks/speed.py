"""Training and evaluation speed of an encoder at SR-GNN's settings (hidden 100, batch 100, full
softmax over the whole catalog), against a straightforward implementation measured in the same run.

fedenc path: vectorised graph batches, the full-softmax loss in native kernels where they build
(also timed with them off: the "train, PyTorch" row), Adam (the trainer's TableAdam: the item
table's update done in the loss's backward kernel, the rest torch's fused Adam); evaluation under
no_grad ranking targets in cache-sized item chunks. Baseline: the same model trained the way the
public SR-GNN code does it -- per-session Python graph building, autograd cross-entropy over the
materialised logits, foreach Adam, evaluation with autograd on and a top-k sort.

    python benchmarks/speed.py --data ../shared/data            # Diginetica, 43,097 items
    python benchmarks/speed.py --synthetic-items 43097          # no data needed
    python benchmarks/speed.py --data ../shared/data --checkpoint runs/accuracy/digi-srgnn-pos
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
from _common import LossKernelCount, data_dir, interleaved, load_avg, median, native_loss
from torch.nn import functional as F

from fedenc.data.batching import build_batch, build_batch_reference
from fedenc.data.readers import read_session_text
from fedenc.data.sessions import Examples, Sessions
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.registry import build_encoder
from fedenc.training.allocator import tune_allocator
from fedenc.training.checkpoint import load_checkpoint
from fedenc.training.table_adam import TableAdam
from fedenc.training.trainer import training_step


def add_data_options(ap: argparse.ArgumentParser) -> None:
    """The options :func:`load_examples` reads."""
    ap.add_argument("--data", default=None)
    ap.add_argument("--synthetic-items", type=int, default=43097)


def load_examples(args: argparse.Namespace) -> tuple[str, Examples]:
    root = data_dir(args.data)
    if root is not None and (root / "diginetica" / "train_sessions.txt").is_file():
        sessions: Sessions = read_session_text(root / "diginetica" / "train_sessions.txt")
        return "diginetica", Examples.from_sessions(sessions)
    splits = generate(SyntheticConfig(num_items=args.synthetic_items, num_sessions=50000))
    return f"synthetic({args.synthetic_items} items)", Examples.from_sessions(splits.train)


def load_eval_examples(args: argparse.Namespace, train: Examples) -> Examples:
    """The evaluation pairs: the test split where the data has one (as a trained model meets
    them), else the training pairs."""
    root = data_dir(args.data)
    if root is None or not (root / "diginetica" / "train_sessions.txt").is_file():
        return train  # load_examples generated synthetic data
    test = root / "diginetica" / "test_sessions.txt"
    return Examples.from_sessions(read_session_text(test)) if test.is_file() else train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_data_options(ap)
    ap.add_argument("--encoder", default="srgnn")
    ap.add_argument(
        "--no-positions",
        action="store_true",
        help="plain SR-GNN (node width d, not 2d), the model the public implementation runs",
    )
    ap.add_argument("--batches", type=int, default=20, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--eval-batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (both paths run there)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument(
        "--checkpoint",
        default=None,
        help="start both models from this trained encoder (a `fedenc train` output folder)",
    )
    args = ap.parse_args()
    tune_allocator()  # as the trainer does (fedenc.training.trainer)
    if args.threads:
        torch.set_num_threads(args.threads)
    name, ex = load_examples(args)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    train_idx = [rng.integers(0, len(ex), 100) for _ in range(args.batches)]
    ex_eval = load_eval_examples(args, ex)
    eval_idx = [
        np.arange(lo, lo + args.eval_batch) for lo in range(0, args.batches * 100, args.eval_batch)
    ]

    torch.manual_seed(0)
    if args.checkpoint:
        fast, meta = load_checkpoint(args.checkpoint)
        if meta["encoder"] != args.encoder or fast.config.num_items != ex.num_items:
            raise SystemExit(
                f"{args.checkpoint} holds a {meta['encoder']} over {fast.config.num_items} "
                f"items, not a {args.encoder} over {ex.num_items}"
            )
        base = build_encoder(args.encoder, ex.num_items, **_config(fast))
    else:
        options = {"use_positions": False} if args.no_positions else {}
        fast = build_encoder(args.encoder, ex.num_items, **options)
        base = build_encoder(args.encoder, ex.num_items, **options)
    base.load_state_dict(fast.state_dict())
    plain = build_encoder(args.encoder, ex.num_items, **_config(fast))  # the PyTorch loss
    plain.load_state_dict(fast.state_dict())
    fast.to(dev)
    base.to(dev)
    plain.to(dev)
    opt_fast = TableAdam(
        fast.parameters(), lr=1e-3, weight_decay=1e-5, fused=True, table=fast.embedding.weight
    )
    opt_plain = TableAdam(
        plain.parameters(), lr=1e-3, weight_decay=1e-5, fused=True, table=plain.embedding.weight
    )
    opt_base = torch.optim.Adam(base.parameters(), lr=1e-3, weight_decay=1e-5, foreach=True)

    def train(model: Any, opt: Any, reference: bool) -> None:
        model.train()
        for idx in train_idx:
            if reference:
                opt.zero_grad(set_to_none=True)
                b = build_batch_reference(ex, idx).to(dev)
                F.cross_entropy(model(b), b.targets - 1).backward()
                opt.step()
            else:  # the trainer's step
                training_step(model, opt, build_batch(ex, idx, dev))
        sync()  # a GPU step is asynchronous: time it to the end of its work

    def evaluate_fast(limit: int | None) -> list[torch.Tensor]:
        fast.eval()
        with torch.no_grad(), fast.frozen_scoring():
            ranks = [
                fast.rank_targets(build_batch(ex_eval, idx, dev), limit=limit) for idx in eval_idx
            ]
        sync()
        return ranks

    def evaluate_base() -> None:
        base.eval()
        for idx in eval_idx:
            b = build_batch_reference(ex_eval, idx).to(dev)
            scores = base(b)
            top = scores.topk(20, dim=1).indices
            (top == (b.targets - 1)[:, None]).any(1).float().mean().item()

    # Evaluation first, on the given (trained) weights: the training runs change them.
    warm = torch.cat(evaluate_fast(20)).cpu()  # warm-up, and the evaluated model's Recall@20
    hits = 100.0 * float((warm < 20).double().mean())
    evaluate_base()
    t = interleaved(
        {
            "eval fedenc": lambda: evaluate_fast(20),
            "eval exact": lambda: evaluate_fast(None),
            "eval baseline": evaluate_base,
        },
        args.repeats,
    )

    def train_plain() -> None:
        with native_loss(False):
            train(plain, opt_plain, False)

    kernels = LossKernelCount()

    def train_fast() -> None:
        with kernels.counting(len(train_idx)):
            train(fast, opt_fast, False)

    train_fast()  # warm-up all three (and the native kernels' first build)
    train(base, opt_base, True)
    train_plain()
    t |= interleaved(
        {
            "train fedenc": train_fast,
            "train baseline": lambda: train(base, opt_base, True),
            "train torch loss": train_plain,
        },
        args.repeats,
    )
    n_train = args.batches * 100
    n_eval = len(eval_idx) * args.eval_batch
    rate = {k: (n_train if k.startswith("train") else n_eval) / median(v) for k, v in t.items()}
    label = args.encoder + (" without positions" if not fast.config.use_positions else "")
    print(
        f"{label} on {name}: {ex.num_items:,} items, hidden 100, train batch 100, "
        f"eval batch {args.eval_batch}, device {dev}, torch threads {torch.get_num_threads()}, "
        f"load avg {load_avg()}, median of {args.repeats} interleaved repeats"
    )
    print(
        f"evaluated model: {args.checkpoint or 'untrained (pass --checkpoint for a trained one)'}"
        f", Recall@20 on the timed eval pairs {hits:.1f}%"
    )
    print(f"training loss of the fedenc row: {kernels.label()}")
    print(f"{'':16s}{'fedenc':>14s}{'baseline':>14s}{'ratio':>8s}")
    for what in ("train", "eval"):
        f_, b_ = rate[f"{what} fedenc"], rate[f"{what} baseline"]
        print(f"{what + ' pairs/s':16s}{f_:14,.0f}{b_:14,.0f}{f_ / b_:7.2f}x")
    plain_rate = rate["train torch loss"]
    print(
        f"{'train, PyTorch':16s}{plain_rate:14,.0f}{rate['train baseline']:14,.0f}"
        f"{plain_rate / rate['train baseline']:7.2f}x   (fedenc with the native loss kernels off)"
    )
    exact = rate["eval exact"]
    print(
        f"{'eval exact':16s}{exact:14,.0f}{rate['eval baseline']:14,.0f}"
        f"{exact / rate['eval baseline']:7.2f}x   (every rank exact, no early exit)"
    )
    print(
        f"train ms/batch   {1000 * median(t['train fedenc']) / args.batches:10.1f}"
        f"{1000 * median(t['train baseline']) / args.batches:14.1f}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"dataset": name, "encoder": args.encoder, "device": str(dev), "pairs_per_s": rate},
                fh,
                indent=2,
            )


def _config(model: Any) -> dict[str, Any]:
    cfg = dict(model.config.to_dict())
    cfg.pop("num_items")
    return cfg


if __name__ == "__main__":
    main()
