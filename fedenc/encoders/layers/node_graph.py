"""Recurrent units as graphs of data-processing nodes with start/end skip regions (US20210406641A1).

A unit is an ordered list of :class:`Node` objects. **Op nodes** compute one named value from
named inputs; a **start node** and its **end node** delimit a region of op nodes. At every step,
each start node checks its preset condition on the step input:

* condition **not satisfied** – the start node tags every node after it up to its end node; tagged
  nodes do no work, and the end node passes the region's state through unchanged
  (``output ← state`` for each of its ``passthrough`` pairs);
* condition **satisfied** – the start node does nothing and the region's nodes run.

A unit may hold several independent start/end pairs, each with its own condition.

Conditions are written as :class:`SkipRule`: a list of *skip predicates*, each a row-wise callable
``(items_t, prev_items, step) -> bool mask`` that is ``True`` where the step should be **skipped**;
the preset condition of the region is that none of them holds. Built-in predicates:

* ``"padding"`` – the step input is padding (item 0);
* ``"repeat"`` – the step repeats the previous click (``items_t == prev_items``; the step before the
  first is item 0).

:class:`NodeGraphUnit` is the literal executor: per sample and per step it runs the nodes one by one
in topological order, honours the tags (a tagged node is not called at all) and counts every node
it does execute in :attr:`NodeGraphUnit.op_counts`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
from torch import Tensor

#: ``(items_t, prev_items, step) -> bool mask`` over the rows of one step, ``True`` = skip the step.
SkipPredicate = Callable[[Tensor, Tensor, int], Tensor]
SkipSpec: TypeAlias = str | SkipPredicate | Sequence[str | SkipPredicate] | None


def is_padding(items: Tensor, prev_items: Tensor, step: int) -> Tensor:
    """Skip predicate: the step input is padding (item 0)."""
    return items == 0


def is_repeat(items: Tensor, prev_items: Tensor, step: int) -> Tensor:
    """Skip predicate: the step repeats the previous click."""
    return items == prev_items


BUILTIN_SKIPS: dict[str, SkipPredicate] = {"padding": is_padding, "repeat": is_repeat}


def _predicate_name(fn: SkipPredicate) -> str:
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


class SkipRule:
    """The preset condition of one region: *no* skip predicate holds for the step input.

    ``spec`` is ``None`` / ``[]`` (never skip), a built-in name (``"padding"``, ``"repeat"``), a
    predicate, or a sequence of those. Predicates must be row-wise: they receive ``(B,)`` item ids,
    the previous step's ids and the step index, and return a ``(B,)`` bool mask (``True`` = skip).
    """

    def __init__(self, spec: SkipSpec = None) -> None:
        if spec is None:
            parts: list[str | SkipPredicate] = []
        elif isinstance(spec, str) or callable(spec):
            parts = [spec]
        else:
            parts = list(spec)
        self.names: tuple[str, ...] = tuple(
            p if isinstance(p, str) else _predicate_name(p) for p in parts
        )
        predicates: list[SkipPredicate] = []
        for p in parts:
            if isinstance(p, str):
                if p not in BUILTIN_SKIPS:
                    known = ", ".join(sorted(BUILTIN_SKIPS))
                    raise ValueError(f"unknown skip condition {p!r}; known: {known} or a callable")
                predicates.append(BUILTIN_SKIPS[p])
            elif callable(p):
                predicates.append(p)
            else:
                raise TypeError(f"a skip condition is a name or a callable, got {p!r}")
        self.predicates = tuple(predicates)
        self.builtin_only = all(isinstance(p, str) for p in parts)

    def skip(self, items: Tensor, prev_items: Tensor, step: int) -> Tensor:
        """``(B,)`` bool: rows whose step input does **not** satisfy the condition."""
        out = torch.zeros(items.shape, dtype=torch.bool, device=items.device)
        for name, fn in zip(self.names, self.predicates, strict=True):
            mask = fn(items, prev_items, step)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != out.shape:
                raise ValueError(
                    f"skip predicate {name!r} must return a bool tensor of shape "
                    f"{tuple(out.shape)}, got {mask!r}"
                )
            out = out | mask
        return out

    def satisfied(self, items: Tensor, prev_items: Tensor, step: int) -> Tensor:
        """``(B,)`` bool: rows whose step input satisfies the condition (their nodes run)."""
        return ~self.skip(items, prev_items, step)

    def keep_matrix(self, items: Tensor) -> Tensor:
        """``(B, L)`` bool: which (row, step) pairs satisfy the condition, for a click matrix."""
        prev = previous_items(items)
        if self.builtin_only:  # built-ins are element-wise and ignore the step: one shot
            return ~self.skip(items, prev, 0)
        cols = [self.satisfied(items[:, t], prev[:, t], t) for t in range(items.shape[1])]
        return torch.stack(cols, 1)

    def __repr__(self) -> str:
        return f"{list(self.names)!r}"


def previous_items(items: Tensor) -> Tensor:
    """``(B, L)`` ids of the previous click (0 before the first)."""
    return torch.cat([torch.zeros_like(items[:, :1]), items[:, :-1]], 1)


@dataclass(frozen=True)
class Node:
    """One node of a recurrent unit.

    ``kind="op"``: ``output = fn(*inputs)``. ``kind="start"``: opens ``region`` and checks
    ``rule``. ``kind="end"``: closes ``region``; when the region was tagged it sets
    ``output ← state`` for each ``(output, state)`` of ``passthrough``.
    """

    name: str
    kind: Literal["op", "start", "end"] = "op"
    inputs: tuple[str, ...] = ()
    output: str = ""
    fn: Callable[..., Tensor] | None = None
    region: str = ""
    rule: SkipRule | None = None
    passthrough: tuple[tuple[str, str], ...] = ()


class NodeGraphUnit:
    """Literal executor of a recurrent unit given as nodes in topological order.

    ``sources`` are the values available before the first node of a step (step inputs and
    states). The constructor checks that the order is topological, that every start node has one
    end node of the same region after it, that regions do not overlap, and that passthrough values
    exist. :attr:`regions` maps each region to the op nodes its start node tags.
    """

    def __init__(self, nodes: Sequence[Node], sources: Iterable[str]) -> None:
        self.nodes = tuple(nodes)
        self.sources = tuple(sources)
        self.regions: dict[str, tuple[str, ...]] = {}
        self.op_counts: Counter[str] = Counter()
        self.skipped_regions: Counter[str] = Counter()
        self._validate()

    def _validate(self) -> None:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError("node names must be unique")
        available = set(self.sources)
        open_region: str | None = None
        members: list[str] = []
        for node in self.nodes:
            if node.kind == "start":
                if open_region is not None:
                    raise ValueError(
                        f"start node {node.name!r} opens a region inside {open_region!r}"
                    )
                if node.rule is None or not node.region or node.region in self.regions:
                    raise ValueError(f"start node {node.name!r} needs a rule and a new region name")
                open_region, members = node.region, []
            elif node.kind == "end":
                if node.region != open_region:
                    raise ValueError(f"end node {node.name!r} closes {node.region!r}, not open")
                for out, state in node.passthrough:
                    if out not in available or state not in self.sources:
                        raise ValueError(f"end node {node.name!r}: bad passthrough {out}<-{state}")
                self.regions[node.region] = tuple(members)
                open_region = None
            else:
                if node.fn is None or not node.output:
                    raise ValueError(f"op node {node.name!r} needs fn and output")
                missing = [i for i in node.inputs if i not in available]
                if missing:
                    raise ValueError(f"node {node.name!r} is not in topological order: {missing}")
                available.add(node.output)
                if open_region is not None:
                    members.append(node.name)
        if open_region is not None:
            raise ValueError(f"region {open_region!r} has no end node")

    def step(self, env: dict[str, Tensor], items: Tensor, prev_items: Tensor, step: int) -> None:
        """Run the nodes once over ``env`` (one sample's step values), in place."""
        tagged: set[str] = set()
        tagged_regions: set[str] = set()
        for node in self.nodes:
            if node.name in tagged:
                continue  # tagged by its start node: does no work
            if node.kind == "start":
                assert node.rule is not None
                if bool(node.rule.skip(items, prev_items, step).any()):
                    tagged.update(self.regions[node.region])
                    tagged_regions.add(node.region)
                    self.skipped_regions[node.region] += 1
                # condition satisfied: the start node does nothing
            elif node.kind == "end":
                if node.region in tagged_regions:
                    for out, state in node.passthrough:
                        env[out] = env[state]
            else:
                assert node.fn is not None
                env[node.output] = node.fn(*(env[name] for name in node.inputs))
                self.op_counts[node.name] += 1

    def run(
        self,
        inputs: Mapping[str, Tensor],
        state: Mapping[str, Tensor],
        updates: Mapping[str, str],
        items: Tensor,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Run a batch one sample and one step at a time.

        ``inputs``: per-step values ``(B, L, …)``; ``state``: initial states ``(B, …)``;
        ``updates``: state name → the node value that becomes the next state; ``items``: ``(B, L)``
        click ids the start nodes check. Returns every state after every step ``(B, L, …)`` and the
        final states ``(B, …)``.
        """
        bsz, length = items.shape
        prev = previous_items(items)
        trajectories: dict[str, list[Tensor]] = {k: [] for k in updates}
        finals: dict[str, list[Tensor]] = {k: [] for k in updates}
        for b in range(bsz):
            current = {k: v[b : b + 1] for k, v in state.items()}
            steps: dict[str, list[Tensor]] = {k: [] for k in updates}
            for t in range(length):
                env = {k: v[b : b + 1, t] for k, v in inputs.items()}
                env.update(current)
                self.step(env, items[b, t : t + 1], prev[b, t : t + 1], t)
                current = {k: env[out] for k, out in updates.items()}
                for k, v in current.items():
                    steps[k].append(v)
            for k in updates:
                trajectories[k].append(torch.stack(steps[k], 1))
                finals[k].append(current[k])
        return (
            {k: torch.cat(v, 0) for k, v in trajectories.items()},
            {k: torch.cat(v, 0) for k, v in finals.items()},
        )

    def __repr__(self) -> str:
        segments: list[str] = []
        ops: list[str] = []
        head = ""
        for node in self.nodes:
            if node.kind == "op":
                ops.append(node.name)
                continue
            if ops:
                segments.append(head + ", ".join(ops))
            ops = []
            head = f"{node.region} skip={node.rule!r}: " if node.kind == "start" else ""
        if ops:
            segments.append(head + ", ".join(ops))
        return f"{self.__class__.__name__}({'; '.join(segments)})"
