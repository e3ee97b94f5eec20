"""The fusion-rule interface: how the master turns the children's updated parameter sets into the
next target set (the patent's "first preset rule" and its rivals).

A round is ``begin(round, current)``, then ``add(child, params, num_samples)`` once per reply, in
any order and as replies arrive (from several threads if need be), then ``result()``. Streaming
rules fold each reply into state the size of one model and drop it; batch rules keep the K sets
until ``result()``. Every reply is validated against ``current`` before it touches any state, so a
bad reply raises :class:`~fedenc.federation.parameters.BadUpdateError` (the caller logs and skips
it) and the round goes on as if it never came. Weights are derived from the replies that were
accepted, so they renormalise over whoever actually answered.

Rules never modify ``current`` or an update; batch rules keep references to the updates until
``result()``, so a caller must not reuse those tensors before then.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedenc.federation.parameters import (
    BadUpdateError,
    Parameters,
    check_compatible,
    check_num_samples,
    check_row_weights,
)


class EmptyRoundError(RuntimeError):
    """``result()`` was asked for a round in which no update was accepted."""


class FusionOutputError(RuntimeError):
    """A rule's ``_fuse()`` returned a set that cannot be the next target (other names, shapes
    or dtypes than ``current``, or NaN/Inf values): a bug of the rule, not of any child."""


class FusionRuleFailed(FusionOutputError, ValueError):
    """A rule's own ``_add`` / ``_fuse`` raised (a plugin's bug, or a rule that cannot fuse this
    round, such as Krum with fewer updates than it selects): the error names the rule and the
    round, and nothing of the round is kept. A ``ValueError`` too, as rules raise for bad
    settings."""


def _rule_failed(rule: FusionRule, round_: int | None, err: Exception) -> FusionRuleFailed:
    what = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    name = rule.name or type(rule).__name__
    return FusionRuleFailed(f"fusion rule {name!r} failed in round {round_}: {what}")


class FusionRule(ABC):
    """One fusion rule; see the module docstring for the round protocol.

    Subclasses implement ``_begin`` / ``_add`` / ``_fuse`` (and ``_state`` / ``_load_state`` when
    they keep optimizer state across rounds); this class does the validation, the bookkeeping of
    who took part, the locking and the round's life cycle.
    """

    name: ClassVar[str] = ""
    """The registry name, set by :func:`~fedenc.federation.fusion.registry.register_fusion_rule`."""
    streaming: ClassVar[bool] = False
    """True when the rule's memory is one model plus state, whatever the number of replies."""
    checks_values: ClassVar[bool] = False
    """True when ``_add`` checks the update's values for NaN/Inf itself, as it folds them in (and
    leaves its state untouched when it raises); otherwise they are checked before ``_add``. The
    structure is always checked first, and ``_add_rows`` is always given checked values."""
    row_weighted: ClassVar[bool] = False
    """True when the rule fuses the row-weighted tensors of a round (the item table) row by row,
    each child weighted by its row weights (the samples that touched the row); other rules ignore
    row weights."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._round: int | None = None
        self._current: Parameters | None = None
        self._participants: list[str] = []
        self._samples: dict[str, int] = {}
        self._rejected: dict[str, str] = {}
        self._result: Parameters | None = None
        self._row_names: tuple[str, ...] = ()

    # -- round life cycle ------------------------------------------------------------------------

    def begin(self, round: int, current: Parameters, row_weighted: Sequence[str] = ()) -> None:
        """Open round ``round`` with ``current`` as the present target (the reference that every
        update is checked against, and the point that delta-based rules move from).
        ``row_weighted`` names the tensors whose rows updates may weight one by one."""
        unknown = [name for name in row_weighted if name not in current]
        if unknown:
            raise ValueError(f"row-weighted tensor(s) {unknown} are not in the target")
        with self._lock:
            self._round = round
            self._current = current
            self._row_names = tuple(row_weighted)
            self._participants = []
            self._samples = {}
            self._rejected = {}
            self._result = None
            self._clear_round()
            self._begin(current)

    def add(
        self,
        child: str,
        params: Parameters,
        num_samples: int,
        row_weights: Mapping[str, Any] | None = None,
    ) -> None:
        """Fold in ``child``'s updated set trained on ``num_samples`` samples; ``row_weights``
        optionally weights the rows of the round's row-weighted tensors (one weight per row).

        Raises :class:`BadUpdateError` (state untouched) for a malformed set or row weights, a
        bad sample count or a second reply from the same child in this round.
        """
        current = self._open_round()
        try:
            n = check_num_samples(num_samples, child)
            if child in self._samples:
                raise BadUpdateError(child, f"a second update in round {self._round}")
            by_rows = self.row_weighted and bool(self._row_names)
            check_compatible(current, params, child, values=by_rows or not self.checks_values)
            rows = (
                check_row_weights(current, row_weights, self._row_names, child)
                if row_weights
                else {}
            )
            with self._lock:
                if self._result is not None or self._current is not current:
                    raise RuntimeError(f"round {self._round} closed while {child!r} was added")
                if child in self._samples:
                    raise BadUpdateError(child, f"a second update in round {self._round}")
                try:
                    if by_rows:
                        self._add_rows(child, params, n, rows)
                    else:
                        self._add(child, params, n)
                except BadUpdateError:
                    raise
                except Exception as err:
                    raise _rule_failed(self, self._round, err) from err
                self._participants.append(child)
                self._samples[child] = n
        except BadUpdateError as err:
            self._rejected[child] = err.reason
            raise

    def result(self) -> Parameters:
        """The new target set (fresh tensors in ``current``'s names, order and dtypes). Closes the
        round: later calls return the same set, and ``add`` raises until the next ``begin``."""
        self._open_round(allow_closed=True)
        with self._lock:
            if self._result is None:
                if not self._participants:
                    raise EmptyRoundError(
                        f"round {self._round}: no update was accepted"
                        + (f" (rejected: {', '.join(self._rejected)})" if self._rejected else "")
                    )
                try:
                    fused = self._fuse()
                except Exception as err:
                    raise _rule_failed(self, self._round, err) from err
                try:  # a rule's bug must not become the published encoder
                    check_compatible(self.current, fused, "fusion")
                except BadUpdateError as err:
                    raise FusionOutputError(
                        f"fusion rule {self.name or type(self).__name__!r} returned a bad target "
                        f"in round {self._round}: {err.reason}"
                    ) from None
                self._result = {name: fused[name] for name in self.current}
            return self._result

    # -- what happened -----------------------------------------------------------------------------

    @property
    def round(self) -> int | None:
        """The open (or last) round, None before the first ``begin``."""
        return self._round

    @property
    def current(self) -> Parameters:
        """The reference set given to ``begin``."""
        if self._current is None:
            raise RuntimeError("no round has begun: call begin(round, current) first")
        return self._current

    @property
    def participants(self) -> list[str]:
        """Children whose update was accepted this round, in arrival order."""
        return list(self._participants)

    @property
    def num_samples(self) -> dict[str, int]:
        """Accepted children's sample counts this round."""
        return dict(self._samples)

    def child_weights(self) -> dict[str, float] | None:
        """Each accepted child's weight in this round's fusion (what the round report shows),
        or None for a rule without per-child weights (coordinate-wise median, trimmed mean).
        This default is the patent's sample-count weights ``n_i / Σ n_j``."""
        samples = self.num_samples
        total = sum(samples.values())
        return {child: n / total for child, n in samples.items()} if total else {}

    def details(self) -> dict[str, Any]:
        """What else the rule decided this round, for the round report (Krum's selection, the
        clip factors); JSON-ready."""
        return {}

    @property
    def rejected(self) -> dict[str, str]:
        """Children whose update was rejected this round, with the reason."""
        return dict(self._rejected)

    @property
    def min_updates(self) -> int:
        """The fewest accepted updates ``result()`` can work with (more for robust rules)."""
        return 1

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The state that must survive a master restart (server-optimizer moments, step count);
        scratch buffers and the open round are not part of it."""
        return {"rule": self.name, **self._state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (possibly after ``torch.save``/``load``)."""
        if state.get("rule") != self.name:
            raise ValueError(
                f"state_dict is for fusion rule {state.get('rule')!r}, not {self.name!r}"
            )
        with self._lock:
            self._load_state({k: v for k, v in state.items() if k != "rule"})

    # -- for subclasses --------------------------------------------------------------------------

    def _open_round(self, allow_closed: bool = False) -> Parameters:
        if self._current is None:
            raise RuntimeError("no round has begun: call begin(round, current) first")
        if self._result is not None and not allow_closed:
            raise RuntimeError(f"round {self._round} is closed: call begin() for the next round")
        return self._current

    def _clear_round(self) -> None:  # noqa: B027 (the base classes' own reset)
        """The base classes' per-round reset, run before ``_begin`` (which a rule overrides
        without having to call ``super()``)."""

    def _begin(self, current: Parameters) -> None:  # noqa: B027 (optional hook)
        """Reset the rule's own per-round state for a round starting from ``current`` (the
        updates a :class:`BatchFusionRule` keeps are already cleared)."""

    @abstractmethod
    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        """Fold in an update that has already been validated."""

    def _add_rows(
        self, child: str, params: Parameters, num_samples: int, rows: Mapping[str, Any]
    ) -> None:
        """``_add`` with row weights (float64 vectors, validated); only row-weighted rules."""
        raise NotImplementedError(f"{type(self).__name__} declares row_weighted but no _add_rows")

    @property
    def row_names(self) -> tuple[str, ...]:
        """The tensors this round fuses row by row (when the rule is row-weighted)."""
        return self._row_names

    @abstractmethod
    def _fuse(self) -> Parameters:
        """The target from the accepted updates (at least one)."""

    def _state(self) -> dict[str, Any]:
        return {}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"fusion rule {self.name!r} keeps no state, got {sorted(state)}")


class BatchFusionRule(FusionRule):
    """A rule that needs all K sets at once (order statistics, pairwise distances)."""

    streaming = False

    def __init__(self) -> None:
        super().__init__()
        self._updates: list[tuple[str, Parameters, int]] = []

    def _clear_round(self) -> None:
        self._updates = []

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        self._updates.append((child, params, num_samples))

    def _sorted_updates(self) -> list[tuple[str, Parameters, int]]:
        """The updates by child name, so the result does not depend on arrival order."""
        return sorted(self._updates, key=lambda update: update[0])
