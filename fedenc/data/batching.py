"""Session-graph batches, built with vectorised tensor code.

A batch of ``B`` prefixes becomes padded click matrices plus one directed graph per session over
its unique items (SR-GNN, Wu et al. AAAI 2019). Nothing here loops over sessions in Python: unique
nodes come from one ``torch.unique`` over ``row * (N + 1) + item`` keys, edges from one scatter, so
a batch of 100 costs well under a millisecond. :func:`build_batch_reference` is the straightforward
per-session loop, kept as the test oracle and the benchmark baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from fedenc.data.sessions import Examples, IntArray


@dataclass
class SessionBatch:
    """One padded batch of session prefixes and their graphs (``L`` clicks, ``U`` unique nodes).

    ``positions`` are the reversed click positions of US20220114218A1: along the click order they
    run ``n, n-1, ..., 1`` (the last click is 1), 0 on padding. ``node_positions`` gives each unique
    node the reversed position of its most recent click.
    """

    items: Tensor  # (B, L) int64 click item ids, 0 = padding, chronological, left-aligned
    mask: Tensor  # (B, L) bool
    lengths: Tensor  # (B,) int64
    positions: Tensor  # (B, L) int64, n..1 then 0
    nodes: Tensor  # (B, U) int64 unique item ids (ascending), 0 = padding
    node_mask: Tensor  # (B, U) bool
    node_positions: Tensor  # (B, U) int64
    alias: Tensor  # (B, L) int64 node index of each click (0 on padding)
    edges: Tensor  # (B, U, U) float 0/1, edges[b, u, v] = 1 iff some click u is followed by v
    adj_in: Tensor  # (B, U, U) float, row i: incoming edges of node i / in-degree
    adj_out: Tensor  # (B, U, U) float, row i: outgoing edges of node i / out-degree
    targets: Tensor  # (B,) int64 next item ids (1..N), or -1 when unknown

    @property
    def size(self) -> int:
        return int(self.items.shape[0])

    @property
    def last(self) -> Tensor:
        """Index (into L) of every session's last click."""
        return self.lengths - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SessionBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
        }
        return SessionBatch(**moved)


def pad_prefixes(examples: Examples, index: IntArray) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the prefixes of ``examples[index]`` into a padded (B, L) matrix, vectorised."""
    start = examples.start[index]
    length = examples.length[index]
    width = int(length.max()) if length.size else 1
    cols = np.arange(width, dtype=np.int64)
    mask = cols[None, :] < length[:, None]
    flat = np.where(mask, start[:, None] + cols[None, :], 0)
    items = np.where(mask, examples.sessions.items[flat], 0)
    return (
        torch.from_numpy(items),
        torch.from_numpy(mask),
        torch.from_numpy(length.astype(np.int64, copy=True)),
    )


def graph_batch(items: Tensor, mask: Tensor, lengths: Tensor, targets: Tensor) -> SessionBatch:
    """Build the session graphs of a padded click matrix (any device)."""
    bsz, width = items.shape
    device = items.device
    rows = torch.arange(bsz, device=device)
    stride = int(items.max().item()) + 1 if items.numel() else 1
    row_of_click = rows[:, None].expand(bsz, width)[mask]
    keys = row_of_click * stride + items[mask]
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    uniq_row = torch.div(uniq, stride, rounding_mode="floor")
    counts = torch.bincount(uniq_row, minlength=bsz)
    row_start = torch.cumsum(counts, 0) - counts
    num_nodes = int(counts.max().item()) if bsz else 1
    node_col = torch.arange(uniq.numel(), device=device) - row_start[uniq_row]

    nodes = torch.zeros(bsz, num_nodes, dtype=torch.int64, device=device)
    nodes[uniq_row, node_col] = uniq - uniq_row * stride
    node_mask = torch.zeros(bsz, num_nodes, dtype=torch.bool, device=device)
    node_mask[uniq_row, node_col] = True
    alias = torch.zeros(bsz, width, dtype=torch.int64, device=device)
    alias[mask] = inverse - row_start[row_of_click]

    positions = (lengths[:, None] - torch.arange(width, device=device)[None, :]).clamp_min(0)
    positions = positions * mask
    node_positions = torch.zeros(bsz, num_nodes, dtype=torch.int64, device=device)
    # Most recent click of a node = smallest reversed position among its clicks.
    big = torch.full_like(node_positions, width + 1)
    node_positions = big.scatter_reduce(1, alias, torch.where(mask, positions, width + 1), "amin")
    node_positions = torch.where(node_mask, node_positions, 0)

    edges = torch.zeros(bsz, num_nodes, num_nodes, dtype=torch.float32, device=device)
    if width > 1:
        step = mask[:, 1:]
        b = rows[:, None].expand(bsz, width - 1)[step]
        edges[b, alias[:, :-1][step], alias[:, 1:][step]] = 1.0
    out_deg = edges.sum(2, keepdim=True).clamp_min(1.0)
    in_deg = edges.sum(1, keepdim=True).clamp_min(1.0)
    adj_out = edges / out_deg
    adj_in = (edges / in_deg).transpose(1, 2).contiguous()
    return SessionBatch(
        items=items,
        mask=mask,
        lengths=lengths,
        positions=positions,
        nodes=nodes,
        node_mask=node_mask,
        node_positions=node_positions,
        alias=alias,
        edges=edges,
        adj_in=adj_in,
        adj_out=adj_out,
        targets=targets,
    )


def build_batch(
    examples: Examples, index: IntArray, device: torch.device | str = "cpu"
) -> SessionBatch:
    """The :class:`SessionBatch` of ``examples[index]``, built on ``device``: padding happens on
    the host, the graphs on the device, so only the click matrix crosses the bus."""
    items, mask, lengths = pad_prefixes(examples, index)
    targets = torch.from_numpy(examples.target[index].astype(np.int64, copy=True))
    if torch.device(device).type != "cpu":
        items, mask, lengths, targets = (
            t.pin_memory().to(device, non_blocking=True) for t in (items, mask, lengths, targets)
        )
    return graph_batch(items, mask, lengths, targets)


def batch_from_sessions(sessions: Sequence[Sequence[int]]) -> SessionBatch:
    """A batch from literal item-id lists (targets unknown): handy for inference and tests."""
    if not sessions or any(len(s) == 0 for s in sessions):
        raise ValueError("every session needs at least one click")
    low = min(min(s) for s in sessions)
    if low < 1:  # 0 would be read as padding, a negative id would wrap around the table
        raise ValueError(f"item ids start at 1 (0 is padding), got {low}")
    width = max(len(s) for s in sessions)
    items = torch.zeros(len(sessions), width, dtype=torch.int64)
    for i, s in enumerate(sessions):
        items[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.int64)
    lengths = torch.as_tensor([len(s) for s in sessions], dtype=torch.int64)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return graph_batch(items, mask, lengths, torch.full((len(sessions),), -1, dtype=torch.int64))


def build_batch_reference(examples: Examples, index: IntArray) -> SessionBatch:
    """Per-session Python loop in the style of the public SR-GNN code: the oracle and baseline."""
    prefixes = [examples.prefix(int(j)).tolist() for j in index]
    width = max(len(p) for p in prefixes)
    node_lists = [sorted(set(p)) for p in prefixes]
    num_nodes = max(len(n) for n in node_lists)
    bsz = len(prefixes)
    items = np.zeros((bsz, width), dtype=np.int64)
    mask = np.zeros((bsz, width), dtype=bool)
    positions = np.zeros((bsz, width), dtype=np.int64)
    nodes = np.zeros((bsz, num_nodes), dtype=np.int64)
    node_mask = np.zeros((bsz, num_nodes), dtype=bool)
    node_positions = np.zeros((bsz, num_nodes), dtype=np.int64)
    alias = np.zeros((bsz, width), dtype=np.int64)
    edges = np.zeros((bsz, num_nodes, num_nodes), dtype=np.float32)
    adj_in = np.zeros_like(edges)
    adj_out = np.zeros_like(edges)
    for b, (p, ns) in enumerate(zip(prefixes, node_lists, strict=True)):
        n = len(p)
        where = {item: k for k, item in enumerate(ns)}
        items[b, :n] = p
        mask[b, :n] = True
        positions[b, :n] = np.arange(n, 0, -1)
        nodes[b, : len(ns)] = ns
        node_mask[b, : len(ns)] = True
        for t, item in enumerate(p):
            alias[b, t] = where[item]
            node_positions[b, where[item]] = n - t
        for t in range(n - 1):
            edges[b, where[p[t]], where[p[t + 1]]] = 1.0
        e = edges[b]
        out_deg = np.maximum(e.sum(1), 1.0)
        in_deg = np.maximum(e.sum(0), 1.0)
        adj_out[b] = e / out_deg[:, None]
        adj_in[b] = (e / in_deg[None, :]).T
    return SessionBatch(
        items=torch.from_numpy(items),
        mask=torch.from_numpy(mask),
        lengths=torch.from_numpy(mask.sum(1).astype(np.int64)),
        positions=torch.from_numpy(positions),
        nodes=torch.from_numpy(nodes),
        node_mask=torch.from_numpy(node_mask),
        node_positions=torch.from_numpy(node_positions),
        alias=torch.from_numpy(alias),
        edges=torch.from_numpy(edges),
        adj_in=torch.from_numpy(adj_in),
        adj_out=torch.from_numpy(adj_out),
        targets=torch.from_numpy(examples.target[index].astype(np.int64, copy=True)),
    )
