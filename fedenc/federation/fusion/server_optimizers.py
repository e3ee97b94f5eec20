"""Server optimizers: ``fedavgm``, ``fedadam``, ``fedyogi`` (Hsu et al. 2019; Reddi et al. 2021,
"Adaptive Federated Optimization", Algorithm 2).

All three treat the round's FedAvg step as a pseudo-gradient and feed it to an optimizer kept on
the master, x being the current target::

    Δ_t = Σ n_i θ_i / Σ n_i − x_t                        (the weighted_sum target minus x)
    fedavgm:  m_t = β m_{t−1} + Δ_t                       x_{t+1} = x_t + η m_t
    fedadam:  m_t = β1 m_{t−1} + (1 − β1) Δ_t
              v_t = β2 v_{t−1} + (1 − β2) Δ_t²            x_{t+1} = x_t + η m_t / (√v_t + τ)
    fedyogi:  m_t as fedadam
              v_t = v_{t−1} − (1 − β2) Δ_t² sign(v_{t−1} − Δ_t²)   x_{t+1} as fedadam

with m_0 = 0 and, as in the paper, v_0 = τ². ``fedadam`` optionally applies Adam's bias correction
(η_t = η √(1 − β2^t) / (1 − β1^t), t the server step; Flower does this), off by default as in
the paper.

Why: momentum smooths the round-to-round noise of partial participation and non-IID children
(FedAvgM); per-coordinate adaptive steps make the server robust to badly scaled pseudo-gradients,
Yogi's additive v update growing v more cautiously than Adam's when gradients are sparse, as with
embedding rows touched by few children. With η = 1 and β = 0, fedavgm is FedAvg.

Streaming: the weighted mean is accumulated exactly as in ``weighted_sum`` (one reused buffer);
the state is m (and v), one model each, kept across rounds and checkpointed by ``state_dict``.
Integer tensors (counters) take the weighted mean, rounded; they have no gradient to follow.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch

from fedenc.federation.fusion.accumulator import WeightedAccumulator, parse_accumulator_dtype
from fedenc.federation.fusion.base import FusionRule
from fedenc.federation.fusion.registry import register_fusion_rule
from fedenc.federation.parameters import Parameters, cast_like


def _positive(option: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not (value > 0 and math.isfinite(value))
    ):
        raise ValueError(f"{option} must be a finite number > 0, got {value!r}")
    return float(value)


def _decay(option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{option} must be in [0, 1), got {value!r}")
    return float(value)


class ServerOptimizer(FusionRule):
    """Weighted mean of the replies, then one optimizer step from the current target."""

    streaming = True
    checks_values = True  # tensor by tensor as it folds (WeightedAccumulator.add)
    _moment_names: tuple[str, ...] = ("m",)

    def __init__(self, server_lr: float, accumulator_dtype: str = "auto") -> None:
        super().__init__()
        self.server_lr = _positive("server_lr", server_lr)
        self._accumulator = WeightedAccumulator(parse_accumulator_dtype(accumulator_dtype))
        self._moments: dict[str, Parameters] = {}
        self.steps = 0
        """Server steps taken so far (rounds fused)."""

    @property
    def buffer(self) -> torch.Tensor | None:
        """The flat accumulation buffer (reused across rounds)."""
        return self._accumulator.buffer

    @property
    def moments(self) -> dict[str, Parameters]:
        """The optimizer state by moment name ("m", "v"), floating tensors only."""
        return self._moments

    def _begin(self, current: Parameters) -> None:
        for moment, tensors in self._moments.items():
            for name, ref in current.items():
                if ref.is_floating_point() and (
                    name not in tensors or tensors[name].shape != ref.shape
                ):
                    raise ValueError(
                        f"{self.name} state {moment!r} does not match the model at {name!r}"
                    )
        self._accumulator.reset(current)

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        self._accumulator.add(params, float(num_samples), child)

    def _initial(self, moment: str, ref: torch.Tensor) -> torch.Tensor:
        return torch.zeros(ref.shape, dtype=torch.promote_types(ref.dtype, torch.float32))

    def _fuse(self) -> Parameters:
        if not self._moments:
            self._moments = {
                moment: {
                    name: self._initial(moment, ref)
                    for name, ref in self.current.items()
                    if ref.is_floating_point()
                }
                for moment in self._moment_names
            }
        self.steps += 1
        total = self._accumulator.total_weight
        out: Parameters = {}
        for name, summed in self._accumulator.sums().items():
            ref = self.current[name]
            if not ref.is_floating_point():
                out[name] = cast_like(summed / total, ref)
                continue
            state_dtype = self._moments[self._moment_names[0]][name].dtype
            x = ref.to(state_dtype)
            delta = (summed / total).to(state_dtype).sub_(x)
            out[name] = cast_like(x.add(self._step(name, delta)), ref)
        return out

    @abstractmethod
    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        """Update the state with pseudo-gradient ``delta`` and return ``x_{t+1} − x_t``."""

    def _state(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            **{
                moment: {name: t.clone() for name, t in tensors.items()}
                for moment, tensors in self._moments.items()
            },
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        expected = {"steps", *self._moment_names}
        if state and set(state) != expected:
            raise ValueError(
                f"{self.name} state needs keys {sorted(expected)}, got {sorted(state)}"
            )
        if not state or not state["steps"]:
            self.steps, self._moments = 0, {}
            return
        moments: dict[str, Parameters] = {}
        for moment in self._moment_names:
            tensors = state[moment]
            if not isinstance(tensors, Mapping) or not all(
                isinstance(t, torch.Tensor) for t in tensors.values()
            ):
                raise ValueError(f"{self.name} state {moment!r} must map names to tensors")
            moments[moment] = {str(name): t.clone() for name, t in tensors.items()}
        self.steps, self._moments = int(state["steps"]), moments


@register_fusion_rule("fedavgm")
class FedAvgM(ServerOptimizer):
    """Server momentum: ``m = β m + Δ``, ``x += η m``."""

    def __init__(
        self, server_lr: float = 1.0, momentum: float = 0.9, accumulator_dtype: str = "auto"
    ) -> None:
        super().__init__(server_lr, accumulator_dtype)
        self.momentum = _decay("momentum", momentum)

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        m = self._moments["m"][name]
        m.mul_(self.momentum).add_(delta)
        return m * self.server_lr


class _AdaptiveOptimizer(ServerOptimizer):
    """Shared by FedAdam and FedYogi: first moment, second moment, ``x += η m / (√v + τ)``."""

    _moment_names = ("m", "v")

    def __init__(
        self,
        server_lr: float,
        beta1: float,
        beta2: float,
        tau: float,
        accumulator_dtype: str,
    ) -> None:
        super().__init__(server_lr, accumulator_dtype)
        self.beta1 = _decay("beta1", beta1)
        self.beta2 = _decay("beta2", beta2)
        self.tau = _positive("tau", tau)

    def _initial(self, moment: str, ref: torch.Tensor) -> torch.Tensor:
        start = super()._initial(moment, ref)
        return start.fill_(self.tau**2) if moment == "v" else start

    @abstractmethod
    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        """Second-moment update, in place."""

    def _learning_rate(self) -> float:
        return self.server_lr

    def _step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        m, v = self._moments["m"][name], self._moments["v"][name]
        m.mul_(self.beta1).add_(delta, alpha=1.0 - self.beta1)
        self._update_v(v, delta * delta)
        return (m * self._learning_rate()).div_(v.sqrt().add_(self.tau))


@register_fusion_rule("fedadam")
class FedAdam(_AdaptiveOptimizer):
    """Adam on the server: ``v = β2 v + (1 − β2) Δ²``."""

    def __init__(
        self,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        bias_correction: bool = False,
        accumulator_dtype: str = "auto",
    ) -> None:
        super().__init__(server_lr, beta1, beta2, tau, accumulator_dtype)
        self.bias_correction = bool(bias_correction)

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(delta_sq, alpha=1.0 - self.beta2)

    def _learning_rate(self) -> float:
        if not self.bias_correction:
            return self.server_lr
        t = self.steps
        return self.server_lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)


@register_fusion_rule("fedyogi")
class FedYogi(_AdaptiveOptimizer):
    """Yogi on the server: ``v = v − (1 − β2) Δ² sign(v − Δ²)``."""

    def __init__(
        self,
        server_lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        accumulator_dtype: str = "auto",
    ) -> None:
        super().__init__(server_lr, beta1, beta2, tau, accumulator_dtype)

    def _update_v(self, v: torch.Tensor, delta_sq: torch.Tensor) -> None:
        v.sub_(delta_sq * torch.sign(v - delta_sq), alpha=1.0 - self.beta2)
