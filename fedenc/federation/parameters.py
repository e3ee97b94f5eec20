"""Parameter sets and the validation of a child's reply.

A parameter set is an ordered mapping of tensor name to tensor, the shared part of an encoder's
``state_dict``. The master's current target is the *reference*: a child's update must carry exactly
the same names, shapes, dtypes and devices, and only finite values. Anything else is rejected with
a :class:`BadUpdateError` that names the child and every problem, before any of it reaches an
accumulator, so one bad reply is logged and skipped and never poisons the round.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import torch

Parameters: TypeAlias = dict[str, torch.Tensor]
"""Tensor name -> tensor; the insertion order is the encoder's and is kept by every rule."""

_MAX_LISTED = 5  # names listed in one message before "... and N more"


class BadUpdateError(ValueError):
    """A child's reply that cannot be fused: ``child`` names the sender, ``reason`` the problem."""

    def __init__(self, child: str, reason: str) -> None:
        # A child checks the master's parameters with the same code, sender "master".
        what = "the master's parameters" if child == "master" else f"update from child {child!r}"
        super().__init__(f"rejected {what}: {reason}")
        self.child = child
        self.reason = reason


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


#: No trained parameter comes near this magnitude; values beyond it are refused like NaN/Inf, since
#: the weighted sums of a few of them overflow float32 (a child sending 1e37s turned the fused
#: encoder into Infs and failed the job).
MAX_ABS_VALUE = 1e30


def count_non_finite(tensor: torch.Tensor) -> int:
    """Number of NaN/Inf entries of ``tensor``, and of entries beyond ``MAX_ABS_VALUE`` in
    magnitude (0 for integer and bool tensors).

    Fast path: one ``aminmax`` (a vectorised reduction, as fast as reading the tensor once): NaN
    fails the comparisons, so a minimum and maximum within the bound prove every entry within
    it. Only a tensor with a bad value pays for the exact, slower count.
    """
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return 0
    if not tensor.is_complex():
        low, high = torch.aminmax(tensor)
        if -MAX_ABS_VALUE <= float(low) and float(high) <= MAX_ABS_VALUE:
            return 0
    return int((~(tensor.abs() <= MAX_ABS_VALUE)).sum())


def check_values(update: Mapping[str, torch.Tensor], child: str) -> None:
    """Raise :class:`BadUpdateError` naming every tensor of ``update`` with NaN/Inf values."""
    problems = []
    for name, value in update.items():
        bad = count_non_finite(value)
        if bad:
            problems.append(f"{name!r} has {bad} NaN/Inf value(s) (or beyond ±{MAX_ABS_VALUE:g})")
    if problems:
        raise BadUpdateError(child, "; ".join(problems))


def check_compatible(
    reference: Mapping[str, torch.Tensor], update: object, child: str, values: bool = True
) -> None:
    """Raise :class:`BadUpdateError` unless ``update`` matches ``reference`` name for name.

    Checks, all reported together: missing and extra names, non-tensor values, shape, dtype and
    device, then (only when the structure is right, and ``values`` is set) NaN/Inf values. Names
    may come in any order; the rules fuse by name and return the reference's order. A caller that
    passes ``values=False`` checks the values itself (the streaming accumulator does it tensor
    by tensor as it folds, while each tensor is still in cache).
    """
    if not isinstance(update, Mapping):
        raise BadUpdateError(child, f"expected a mapping of name to tensor, got {type(update)}")
    problems: list[str] = []
    missing = [name for name in reference if name not in update]
    extra = [str(name) for name in update if name not in reference]
    if missing:
        problems.append(f"missing tensor(s) {_listed(missing)}")
    if extra:
        problems.append(f"unexpected tensor(s) {_listed(extra)}")
    for name, ref in reference.items():
        if name not in update:
            continue
        value = update[name]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{name!r} is a {type(value).__name__}, not a torch.Tensor")
            continue
        if value.shape != ref.shape:
            problems.append(f"{name!r} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            problems.append(f"{name!r} has dtype {value.dtype}, expected {ref.dtype}")
        if value.device != ref.device:
            problems.append(f"{name!r} is on {value.device}, expected {ref.device}")
    if problems:
        raise BadUpdateError(child, "; ".join(problems))
    if values:
        check_values({name: update[name] for name in reference}, child)


def check_row_weights(
    reference: Mapping[str, torch.Tensor], row_weights: object, names: Sequence[str], child: str
) -> dict[str, torch.Tensor]:
    """``row_weights`` as float64 vectors, one per row of each named tensor; raise
    :class:`BadUpdateError` unless every entry names a row-weighted tensor of this round and is a
    finite, non-negative vector with one weight per row."""
    if not isinstance(row_weights, Mapping):
        raise BadUpdateError(
            child, f"row weights must map names to vectors, got {type(row_weights)}"
        )
    problems: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for name, value in row_weights.items():
        if name not in names:
            problems.append(f"row weights for {name!r}, which is not row-weighted this round")
            continue
        rows = reference[name].shape[0]
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != rows:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            problems.append(f"row weights of {name!r} must be a vector of {rows}, got {shape}")
            continue
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            problems.append(f"row weights of {name!r} have dtype {value.dtype}")
            continue
        weights = value.detach().to(device=reference[name].device, dtype=torch.float64)
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            problems.append(f"row weights of {name!r} must be finite and >= 0")
            continue
        out[name] = weights
    if problems:
        raise BadUpdateError(child, "; ".join(problems))
    return out


def check_num_samples(num_samples: object, child: str) -> int:
    """The child's sample count as an ``int``; :class:`BadUpdateError` unless it is an integer
    >= 1 (a child with no samples should have declined: it would get weight 0)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise BadUpdateError(child, f"num-examples must be an integer, got {num_samples!r}")
    if int(num_samples) < 1:
        raise BadUpdateError(child, f"num-examples must be >= 1, got {int(num_samples)}")
    return int(num_samples)


def cast_like(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``value`` in ``reference``'s dtype; integer and bool tensors are rounded first, so a fused
    counter stays a counter."""
    if reference.is_floating_point() or reference.is_complex():
        return value.to(reference.dtype)
    if value.is_floating_point():
        value = value.round()
    return value.to(reference.dtype)


def _squared(flat: torch.Tensor) -> float:
    # float32/64 stay as they are (a float64 copy of a big model costs 10x the dot itself);
    # integers and half precision are widened first.
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float64 if not flat.is_floating_point() else torch.float32)
    return float(torch.dot(flat, flat))


def squared_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """``‖a − b‖²`` over all tensors of two sets with the same names."""
    total = 0.0
    for name, x in a.items():
        y = b[name]
        if not (x.is_floating_point() and y.is_floating_point()):
            x, y = x.double(), y.double()
        total += _squared((x - y).reshape(-1))
    return total


def squared_norm(params: Mapping[str, torch.Tensor]) -> float:
    """``‖θ‖²`` over all tensors."""
    return sum((_squared(t.reshape(-1)) for t in params.values()), 0.0)


def relative_change(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> float:
    """``‖new − old‖ / ‖old‖`` over all tensors (L2): how far a round moved the target.

    0.0 when nothing moved; ``inf`` when ``old`` is all zeros and ``new`` is not.
    """
    if set(old) != set(new):
        raise ValueError(
            f"parameter sets differ: only in old {_listed([n for n in old if n not in new])}, "
            f"only in new {_listed([n for n in new if n not in old])}"
        )
    for name, tensor in old.items():
        if tensor.shape != new[name].shape:
            raise ValueError(
                f"{name!r}: shape {tuple(tensor.shape)} in old, {tuple(new[name].shape)} in new"
            )
    change = math.sqrt(squared_distance(new, old))
    base = math.sqrt(squared_norm(old))
    if base == 0.0:
        return 0.0 if change == 0.0 else math.inf
    return change / base
