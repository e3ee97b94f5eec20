"""The Adam moments of the shared parameters, as named tensors that can travel with the encoder.

Cyclic weight transfer (``sampling = "cyclic"``, one child a round) hands the encoder from child
to child. If each child kept its own Adam moments, a child would resume from moments it left
many rounds ago: the second moment ``v`` (β₂ = 0.999, a memory of ~1,000 steps, longer than a
visit) still holds the larger gradients of an earlier, less trained model, so the steps stay too
small for most of the visit, and each child's first visit restarts Adam from zero on a trained
model. With ``carry-optimizer`` the moments travel with the encoder instead: each child takes the
step count, ``exp_avg`` and ``exp_avg_sq`` of the previous child, so a pass over the children
is, step for step, centralized Adam over the children's data in turn.

What it reveals: the moments are running averages of the previous children's gradients (and
their squares), more than the parameters alone show. Use it among children that accept that.

Tensor names: ``<parameter>/step``, ``<parameter>/exp_avg``, ``<parameter>/exp_avg_sq``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

MOMENTS = ("step", "exp_avg", "exp_avg_sq")


class OptimizerStateError(ValueError):
    """Optimizer state that does not fit the model (names, shapes, dtypes, values)."""


def _adam(optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Adam):
        raise OptimizerStateError(
            f"only Adam moments can be carried, the trainer uses {type(optimizer).__name__}"
        )
    if any(group.get("amsgrad") for group in optimizer.param_groups):
        raise OptimizerStateError("AMSGrad's running maximum is not carried")


def check_moments(
    reference: Mapping[str, torch.Tensor],
    names: Sequence[str],
    moments: Mapping[str, torch.Tensor],
) -> None:
    """:class:`OptimizerStateError` unless ``moments`` holds exactly the step and the two
    moments of each of ``names``, shaped and typed like ``reference[name]``, finite, with
    non-negative steps and second moments."""
    want = {f"{name}/{key}" for name in names for key in MOMENTS}
    problems = []
    missing, extra = sorted(want - set(moments)), sorted(set(moments) - want)
    if missing:
        problems.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    if extra:
        problems.append(f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}")
    for name in names if not problems else ():
        ref = reference[name]
        step = moments[f"{name}/step"]
        if step.numel() != 1 or not bool(torch.isfinite(step).all()) or float(step) < 0:
            problems.append(f"{name}/step must be one finite count >= 0")
        for key in ("exp_avg", "exp_avg_sq"):
            value = moments[f"{name}/{key}"]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                problems.append(
                    f"{name}/{key} is {value.dtype} {tuple(value.shape)}, "
                    f"expected {ref.dtype} {tuple(ref.shape)}"
                )
            elif not bool(torch.isfinite(value).all()):
                problems.append(f"{name}/{key} has NaN/Inf values")
            elif key == "exp_avg_sq" and bool((value < 0).any()):
                problems.append(f"{name}/{key} has negative values")
    if problems:
        raise OptimizerStateError("carried optimizer state refused: " + "; ".join(problems))


def export_moments(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.nn.Parameter],
    names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """The Adam state of ``params[name]`` for each of ``names`` (CPU copies). A parameter that has
    not taken a step yet exports a zero step and zero moments (what Adam starts from)."""
    _adam(optimizer)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        p = params[name]
        state = optimizer.state.get(p, {})
        step = state.get("step")
        out[f"{name}/step"] = (
            torch.zeros((), dtype=torch.float32)
            if step is None
            else torch.as_tensor(step, dtype=torch.float32).detach().cpu().clone()
        )
        for key in ("exp_avg", "exp_avg_sq"):
            value = state.get(key)
            out[f"{name}/{key}"] = (
                torch.zeros_like(p, device="cpu")
                if value is None
                else value.detach().to("cpu", copy=True)
            )
    return out


def import_moments(
    optimizer: torch.optim.Optimizer,
    params: Mapping[str, torch.nn.Parameter],
    names: Sequence[str],
    moments: Mapping[str, torch.Tensor],
) -> None:
    """Replace the Adam state of each of ``names`` by ``moments`` (as :func:`export_moments`
    makes them). Everything is checked before anything changes: :class:`OptimizerStateError`
    names what does not fit."""
    _adam(optimizer)
    check_moments(params, names, moments)
    fused = any(group.get("fused") for group in optimizer.param_groups)
    for name in names:
        p = params[name]
        # Adam keeps its step as a float32 tensor (on the parameter's device when fused).
        step = moments[f"{name}/step"].reshape(()).to(torch.float32)
        optimizer.state[p] = {
            # A copy: the optimizer steps it in place, and the caller's moments stay as given.
            "step": step.to(p.device, copy=True) if fused else step.clone(),
            "exp_avg": moments[f"{name}/exp_avg"].to(p.device, copy=True),
            "exp_avg_sq": moments[f"{name}/exp_avg_sq"].to(p.device, copy=True),
        }
