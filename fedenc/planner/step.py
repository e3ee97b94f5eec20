"""The operator-task graph of one training step of a session encoder, for a given candidate.

Coarse operators (each a :class:`~fedenc.planner.graph.Task` with a callable):

``batch``       session-graph batch construction (:func:`fedenc.data.batching.build_batch`)
``encode``      embedding pull + graph propagation + attention readout -> session vectors
``score_fwd``   logits of one item shard against the session vectors, in ``chunk``-item blocks
``loss``        logsumexp over the shards' partials, target logits, the mean cross-entropy
``score_bwd``   d loss / d session (partial) and the shard's rows of d loss / d item table
``encode_bwd``  backward through the encoder (autograd) from the summed d loss / d session
``allreduce``   data parallel only: sum of the replicas' gradients, in replica order
``optimizer``   the Adam step
``ps_exchange`` exchange with a parameter server: a zero-cost placeholder in the local trainer

Edges carry the bytes of what flows along them (the batch's tensors, session vectors, logit
blocks, gradients). The math is that of :func:`~fedenc.encoders.layers.full_softmax.
full_softmax_cross_entropy` and autograd, run shard by shard or replica by replica: the result
equals the trainer's plain step up to float summation order (tested).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedenc.data.batching import SessionBatch, build_batch
from fedenc.encoders.base import SessionEncoder
from fedenc.encoders.layers.full_softmax import (
    backward_blocks,
    combine_parts,
    forward_blocks,
    inverse_norms,
    keeps_exp,
)
from fedenc.encoders.layers.tied_lookup import tied
from fedenc.planner.graph import Edge, Task, TaskGraph
from fedenc.planner.spec import PlanSpec

F32 = 4


@dataclass(frozen=True)
class Workload:
    """What sizes a step: the catalog, the width, the batch and a typical batch's byte size."""

    encoder: str
    num_items: int
    hidden: int
    batch_size: int
    batch_bytes: int  # all tensors of a typical SessionBatch
    param_bytes: int

    def key(self) -> str:
        return (
            f"{self.encoder}:items={self.num_items}:d={self.hidden}:b={self.batch_size}"
            f":bb={_bucket(self.batch_bytes)}"
        )


def _bucket(n: int) -> int:
    """Round to two significant binary digits so that batch-size noise keeps one cache key."""
    if n <= 0:
        return 0
    top = 1 << (n.bit_length() - 1)
    return top if n < top + top // 2 else top + top // 2


def batch_bytes(batch: SessionBatch) -> int:
    return sum(int(getattr(batch, f).nbytes) for f in batch.__dataclass_fields__)


def workload_of(model: SessionEncoder, sample: SessionBatch, batch_size: int) -> Workload:
    return Workload(
        encoder=model.type_name or type(model).__name__,
        num_items=model.config.num_items,
        hidden=model.config.hidden,
        batch_size=batch_size,
        batch_bytes=batch_bytes(sample),
        param_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
    )


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous item ranges of near-equal size."""
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _zero_grad(model: SessionEncoder) -> None:
    for p in model.parameters():
        p.grad = None


def _check_finite(value: float, where: str) -> None:
    if not np.isfinite(value):
        raise FloatingPointError(f"training loss became {value} ({where})")


class StepProgram:
    """The task graph of a training step under ``spec``, bound to a model and its optimizer.

    Inputs of a run: ``examples`` and ``index`` (the batch's example indices); with prefetch,
    ``batch`` (this step's batch, built during the previous step) and ``next_index`` (or None).
    The step's loss is ``results[program.loss_task]["value"]``; with prefetch
    ``results["batch_next"]`` is the next step's batch.
    """

    def __init__(
        self,
        model: SessionEncoder,
        optimizer: torch.optim.Optimizer,
        spec: PlanSpec,
        workload: Workload,
        device: torch.device,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.spec = spec
        self.workload = workload
        self.device = device
        self.kinds = ("cuda",) if spec.device == "cuda" else ("cpu",)
        self.graph = (
            self._data_parallel_graph() if spec.replicas > 1 else self._sharded_graph(spec.shards)
        )
        self.loss_task = "allreduce" if spec.replicas > 1 else "loss"  # holds {"value": loss}

    # -- shared pieces ----------------------------------------------------------------------
    def _task(self, name: str, op: str, width: int, fn: Any) -> Task:
        w = self.workload
        sized = f"{op}[items={w.num_items},d={w.hidden},b={w.batch_size}]"
        return Task(
            name, sized, width=width if self.kinds == ("cpu",) else 1, kinds=self.kinds, fn=fn
        )

    def _batch_task(self, name: str, index_key: str, part: tuple[int, int] | None) -> Task:
        device = self.device

        def run(args: Mapping[str, Any]) -> SessionBatch | None:
            index = args[index_key]
            if index is None:
                return None
            if part is not None:
                index = np.array_split(index, part[1])[part[0]]
                if index.size == 0:  # a batch smaller than the replicas: this one sits out
                    return None
            return build_batch(args["examples"], index, device)

        return self._task(name, "batch" if part is None else f"batch/{part[1]}", 1, run)

    def _items(self) -> Tensor:
        return self.model.embedding.weight.detach()[1:]

    # -- one replica, item shards -----------------------------------------------------------
    def _sharded_graph(self, shards: int) -> TaskGraph:
        spec, w, model = self.spec, self.workload, self.model
        normalize = model.config.normalize
        t = spec.threads
        lane_width = 1 if shards > 1 else t
        bounds = shard_bounds(w.num_items, shards)
        chunk = spec.chunk
        tasks: list[Task] = []
        edges: list[Edge] = []
        batch_src = "batch"
        if spec.prefetch:
            tasks.append(self._batch_task("batch_next", "next_index", None))
            batch_src = ""
        else:
            tasks.append(self._batch_task("batch", "index", None))

        def encode(args: Mapping[str, Any]) -> dict[str, Any]:
            batch: SessionBatch = args["batch"]
            _zero_grad(model)
            with tied(model.embedding.weight) as tie:  # as SessionEncoder.loss does
                session = model.scoring_session(model.encode(batch))
            detached = session.detach()
            return {
                "tie": tie,
                "session": session,
                "s": detached,
                "keep": keeps_exp(detached, normalize),
                "targets": batch.targets,
            }

        tasks.append(self._task("encode", "encode", t, encode))
        if batch_src:
            edges.append(Edge("batch", "encode", w.batch_bytes))
        sess_bytes = w.batch_size * w.hidden * F32
        for i, (lo, hi) in enumerate(bounds):

            def fwd(args: Mapping[str, Any], lo: int = lo, hi: int = hi) -> dict[str, Any]:
                enc = args["encode"]
                items = self._items()[lo:hi]
                inv = inverse_norms(items) if normalize else None
                s, keep = enc["s"], enc["keep"]
                acc = s.new_zeros(s.shape) if keep else None
                blocks, parts = forward_blocks(s, items, inv, keep, 0, hi - lo, chunk, acc)
                return {"blocks": blocks, "parts": parts, "inv": inv, "acc": acc}

            tasks.append(
                self._task(f"score_fwd{i}", f"score_fwd/{shards}:c{chunk}", lane_width, fwd)
            )
            edges.append(Edge("encode", f"score_fwd{i}", sess_bytes))

        def loss(args: Mapping[str, Any]) -> dict[str, Any]:
            enc = args["encode"]
            parts = [p for i in range(shards) for p in args[f"score_fwd{i}"]["parts"]]
            lse = combine_parts(parts, enc["keep"])
            items = self._items()
            s, cols = enc["s"], enc["targets"] - 1
            rows = items[cols]
            target = (s * rows).sum(1)
            if normalize:
                target = target * inverse_norms(rows)
            value = float((lse - target).mean())
            _check_finite(value, "planned step")
            grad_table = torch.empty_like(model.embedding.weight)
            grad_table[0].zero_()
            scale = torch.ones((), device=s.device) / s.shape[0]
            return {"value": value, "lse": lse, "grad_table": grad_table, "scale": scale}

        tasks.append(self._task("loss", "loss", t, loss))
        for i in range(shards):
            edges.append(Edge(f"score_fwd{i}", "loss", w.batch_size * F32 * 8))
        edges.append(Edge("encode", "loss", sess_bytes))
        for i, (lo, hi) in enumerate(bounds):

            def bwd(args: Mapping[str, Any], i: int = i, lo: int = lo, hi: int = hi) -> Tensor:
                enc, fw, ls = args["encode"], args[f"score_fwd{i}"], args["loss"]
                grad_s = torch.zeros_like(enc["s"])
                backward_blocks(
                    fw["blocks"],
                    0,
                    chunk,
                    enc["s"],
                    self._items()[lo:hi],
                    fw["inv"],
                    enc["targets"] - 1 - lo,
                    ls["lse"],
                    ls["scale"],
                    enc["keep"],
                    grad_s,
                    ls["grad_table"][lo:],
                    fw["acc"],
                )
                return grad_s

            tasks.append(
                self._task(f"score_bwd{i}", f"score_bwd/{shards}:c{chunk}", lane_width, bwd)
            )
            shard_bytes = w.batch_size * (hi - lo) * F32
            edges += [
                Edge(f"score_fwd{i}", f"score_bwd{i}", shard_bytes),
                Edge("loss", f"score_bwd{i}", w.batch_size * F32),
                Edge("encode", f"score_bwd{i}", sess_bytes),
            ]

        def encode_bwd(args: Mapping[str, Any]) -> None:
            grad_s = args["score_bwd0"]
            for i in range(1, shards):
                grad_s = grad_s + args[f"score_bwd{i}"]
            tie = args["encode"]["tie"]
            # Popped, so that the tie holds the only reference: autograd then keeps the tensor
            # as .grad instead of copying it. The lookup adds its rows to it in place.
            tie.preload(args["loss"].pop("grad_table"))
            args["encode"]["session"].backward(grad_s)
            tie.settle()

        tasks.append(self._task("encode_bwd", "encode_bwd", t, encode_bwd))
        for i, (lo, hi) in enumerate(bounds):
            edges.append(
                Edge(f"score_bwd{i}", "encode_bwd", sess_bytes + (hi - lo) * w.hidden * F32)
            )
        edges += [Edge("encode", "encode_bwd", sess_bytes), Edge("loss", "encode_bwd", 0)]
        self._tail(tasks, edges, "encode_bwd", t)
        return TaskGraph(tasks, edges)

    def _tail(self, tasks: list[Task], edges: list[Edge], after: str, t: int) -> None:
        optimizer = self.optimizer

        def step(args: Mapping[str, Any]) -> None:
            optimizer.step()

        tasks.append(self._task("optimizer", "optimizer", t, step))
        edges.append(Edge(after, "optimizer", self.workload.param_bytes))
        # No parameter server in the local trainer: the exchange is a zero-cost placeholder
        # that keeps its place in the graph (after the step, before the next pull).
        tasks.append(self._task("ps_exchange", "ps_exchange", 1, lambda args: None))
        edges.append(Edge("optimizer", "ps_exchange", 0))

    # -- data parallel --------------------------------------------------------------------------
    def _data_parallel_graph(self) -> TaskGraph:
        spec, w, model = self.spec, self.workload, self.model
        d = spec.replicas
        normalize = model.config.normalize
        chunk = spec.chunk
        params = list(model.parameters())
        emb_index = next(i for i, p in enumerate(params) if p is model.embedding.weight)
        tasks: list[Task] = []
        edges: list[Edge] = []
        rows = w.batch_size // d
        grad_bytes = w.param_bytes
        for r in range(d):
            tasks.append(self._batch_task(f"batch{r}", "index", (r, d)))

            def replica(args: Mapping[str, Any], r: int = r) -> dict[str, Any]:
                batch: SessionBatch | None = args[f"batch{r}"]
                if batch is None:
                    return {"loss_sum": 0.0}  # no pairs: no loss and no gradient
                with tied(model.embedding.weight) as tie:
                    session = model.scoring_session(model.encode(batch))
                s = session.detach()
                keep = keeps_exp(s, normalize)
                items = self._items()
                inv = inverse_norms(items) if normalize else None
                acc = s.new_zeros(s.shape) if keep else None
                blocks, parts = forward_blocks(s, items, inv, keep, 0, items.shape[0], chunk, acc)
                lse = combine_parts(parts, keep)
                cols = batch.targets - 1
                target = (s * items[cols]).sum(1)
                if inv is not None:
                    target = target * inv[cols]
                total = int(args["index"].size)
                return {
                    "tie": tie,
                    "session": session,
                    "s": s,
                    "keep": keep,
                    "cols": cols,
                    "inv": inv,
                    "blocks": blocks,
                    "acc": acc,
                    "lse": lse,
                    "loss_sum": (lse - target).sum() / total,  # this replica's share of the mean
                    "scale": torch.ones((), device=s.device) / total,
                }

            def backward(args: Mapping[str, Any], r: int = r) -> list[Tensor | None]:
                rep = args[f"forward{r}"]
                if "session" not in rep:
                    return [None] * len(params)
                grad_s = torch.zeros_like(rep["s"])
                grad_table = torch.empty_like(model.embedding.weight)
                grad_table[0].zero_()
                backward_blocks(
                    rep["blocks"],
                    0,
                    chunk,
                    rep["s"],
                    self._items(),
                    rep["inv"],
                    rep["cols"],
                    rep["lse"],
                    rep["scale"],
                    rep["keep"],
                    grad_s,
                    grad_table,
                    rep["acc"],
                )
                tie = rep["tie"]
                tie.preload(grad_table)  # the lookup adds its rows and returns it as its gradient
                grads: list[Tensor | None] = list(
                    torch.autograd.grad(rep["session"], params, grad_s, allow_unused=True)
                )
                left = tie.take()  # no lookup took it: add the lookups' gradient the plain way
                if left is not None:
                    emb = grads[emb_index]
                    grads[emb_index] = left if emb is None else left.add_(emb)
                return grads

            tasks.append(self._task(f"forward{r}", f"replica_fwd/{d}:c{chunk}", 1, replica))
            tasks.append(self._task(f"backward{r}", f"replica_bwd/{d}:c{chunk}", 1, backward))
            edges += [
                Edge(f"batch{r}", f"forward{r}", w.batch_bytes // d),
                Edge(f"forward{r}", f"backward{r}", rows * w.num_items * F32),
                Edge(f"backward{r}", "allreduce", grad_bytes),
            ]

        def allreduce(args: Mapping[str, Any]) -> dict[str, Any]:
            _zero_grad(model)
            value = 0.0
            for r in range(d):
                value += float(args[f"forward{r}"]["loss_sum"])
            _check_finite(value, "data-parallel step")
            for k, p in enumerate(params):
                parts = [args[f"backward{r}"][k] for r in range(d)]
                present = [g for g in parts if g is not None]
                if not present:
                    continue
                total = present[0]
                for g in present[1:]:
                    total = total + g
                p.grad = total
            return {"value": value}

        # A whole-core sum of d dense gradients: it waits for every replica anyway.
        tasks.append(self._task("allreduce", "allreduce", spec.threads, allreduce))
        edges += [Edge(f"forward{r}", "allreduce", F32) for r in range(d)]
        self._tail(tasks, edges, "allreduce", spec.threads)
        return TaskGraph(tasks, edges)
