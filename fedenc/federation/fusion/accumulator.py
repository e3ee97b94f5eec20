"""Streaming weighted sums: ``Σ w_i θ_i`` and ``Σ w_i`` in a flat buffer the size of one model.

Each update is folded in as it arrives and can then be dropped, so fusing K replies costs the
memory of one model (two buffers, below), never K. The buffers are allocated once and reused round
after round while the model's layout stays the same: no allocator churn, and the pages stay warm.

Checked folding: an update must be rejected whole if any value is NaN/Inf, and a rejected update
must leave the sum exactly as it was. Checking first and adding second reads every update twice
from memory; instead each fold writes ``spare = active + w·θ`` block by block (about 4 MB, so the
block is still in cache when its sum is taken: NaN/Inf propagate into the sum) and swaps the two
buffers only when every block is finite. The out-of-place add moves the same bytes as an in-place
one, the check costs a pass over cached data, and a bad update just leaves ``spare`` as scratch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedenc.federation.parameters import BadUpdateError, Parameters, cast_like, check_finite

BLOCK = 1 << 20  # elements per checked block: 4 MB of float32 stays in this L3 between the passes
_DTYPES = {"auto": None, "float32": torch.float32, "float64": torch.float64}


def parse_accumulator_dtype(option: str) -> torch.dtype | None:
    """Parse the ``accumulator_dtype`` option of the streaming rules (None means auto)."""
    if option not in _DTYPES:
        raise ValueError(f"accumulator_dtype must be one of {sorted(_DTYPES)}, got {option!r}")
    return _DTYPES[option]


class WeightedAccumulator:
    """``Σ w_i θ_i`` per tensor name in views of one flat buffer, plus ``Σ w_i``.

    ``dtype`` None ("auto") accumulates in float32 unless the model has float64 tensors: float32
    keeps the fold memory-bound at one read of the update plus one read-modify-write of the
    buffer; float64 trades twice the buffer traffic for sums that are exact for equal sets.
    """

    def __init__(self, dtype: torch.dtype | None = None) -> None:
        self._dtype_option = dtype
        self._buffer: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None  # the checked fold's target, allocated on first use
        self._layout: tuple[tuple[str, torch.Size], ...] = ()
        self._views: dict[str, torch.Tensor] = {}
        self._spare_views: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0
        self.count = 0

    @property
    def buffer(self) -> torch.Tensor | None:
        """The flat buffer (None before the first ``reset``)."""
        return self._buffer

    def reset(self, reference: Mapping[str, torch.Tensor]) -> None:
        """Start a new sum shaped like ``reference``; reuses the buffer when the layout is known."""
        dtype = self._dtype_option or (
            torch.float64
            if any(t.dtype == torch.float64 for t in reference.values())
            else torch.float32
        )
        device = next(iter(reference.values())).device if reference else torch.device("cpu")
        layout = tuple((name, t.shape) for name, t in reference.items())
        buffer = self._buffer
        if (
            buffer is None
            or layout != self._layout
            or buffer.dtype != dtype
            or buffer.device != device
        ):
            total = sum(t.numel() for t in reference.values())
            buffer = torch.zeros(total, dtype=dtype, device=device)
            self._buffer, self._layout = buffer, layout
            self._views = self._views_of(buffer)
            self._spare, self._spare_views = None, {}
        else:
            buffer.zero_()
        self.total_weight = 0.0
        self.count = 0

    def _views_of(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in self._layout:
            numel = shape.numel()
            views[name] = buffer[offset : offset + numel].view(shape)
            offset += numel
        return views

    def add(self, params: Mapping[str, torch.Tensor], weight: float) -> None:
        """``acc += weight · params`` in place; ``params`` already validated, values included."""
        if self._buffer is None:
            raise RuntimeError("WeightedAccumulator.add before reset")
        for name, view in self._views.items():
            view.add_(params[name], alpha=weight)
        self.total_weight += weight
        self.count += 1

    def add_checked(self, params: Mapping[str, torch.Tensor], weight: float, child: str) -> None:
        """``acc += weight · params`` unless a value of ``params`` (or of the sum) is NaN/Inf.

        Raises :class:`BadUpdateError` naming the tensors with NaN/Inf and leaves the sum exactly
        as it was. ``params`` must already match the layout (names, shapes, dtypes, devices).
        """
        if self._buffer is None:
            raise RuntimeError("WeightedAccumulator.add_checked before reset")
        if self._spare is None:
            self._spare = torch.empty_like(self._buffer)
            self._spare_views = self._views_of(self._spare)
        partials: list[torch.Tensor] = []
        for name, view in self._views.items():
            src, dst = params[name].reshape(-1), self._spare_views[name].view(-1)
            acc = view.view(-1)
            for lo in range(0, acc.numel(), BLOCK):
                out = dst[lo : lo + BLOCK]
                torch.add(acc[lo : lo + BLOCK], src[lo : lo + BLOCK], alpha=weight, out=out)
                partials.append(out.sum())
        if partials and not bool(torch.isfinite(torch.stack(partials).sum())):
            check_finite(params, child)
            # Every input finite: a finite-overflow of the partial sums (or of the fold itself).
            if not all(bool(torch.isfinite(v).all()) for v in self._spare_views.values()):
                raise BadUpdateError(child, f"weight {weight:g} x update overflows the sum")
        self._buffer, self._spare = self._spare, self._buffer
        self._views, self._spare_views = self._spare_views, self._views
        self.total_weight += weight
        self.count += 1

    def sums(self) -> dict[str, torch.Tensor]:
        """The raw per-name sums (views of the buffer: read them before the next ``reset``)."""
        return self._views

    def weighted_mean(
        self, like: Mapping[str, torch.Tensor], denominator: float | None = None
    ) -> Parameters:
        """``Σ w_i θ_i / denominator`` (default ``Σ w_i``) as fresh tensors in ``like``'s dtypes."""
        total = self.total_weight if denominator is None else denominator
        if total <= 0.0:
            raise ValueError(f"cannot divide a weighted sum by {total}")
        return {name: cast_like(view / total, like[name]) for name, view in self._views.items()}
