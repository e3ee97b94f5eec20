"""Stop rules, the patent's "second preset rule": when the master stops the rounds and publishes
the target encoder.

After each fused round the master builds a :class:`RoundReport` and calls ``rule.update(report)``;
a string is the reason to stop (it goes into the job's log and metadata), None means go on. The
rules:

- :class:`MaxRounds` — stop once round ``n`` is done: a hard budget.
- :class:`RelativeChange` — stop when ``‖θ_t − θ_{t−1}‖ / ‖θ_{t−1}‖ < ε`` (for ``patience``
  rounds in a row): the target has converged, more rounds only cost traffic.
- :class:`Plateau` — stop when a validation metric has not improved by more than ``min_delta`` for
  ``patience`` rounds that report it: early stopping on what matters, not on the parameters.
- :class:`Deadline` — stop once ``seconds`` of wall clock have passed since :meth:`Deadline.start`
  (or the first update): a time budget.
- :class:`AnyOf` / :class:`AllOf` — compose them; every member sees every report, so stateful
  members (plateau, deadline) stay current.

:func:`build_stop_rule` makes one from a dict or a short string, as scenario files and the CLI give
them.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from fedenc.federation.parameters import relative_change
from fedenc.plugins import load_entry_points, load_failure_note

__all__ = [
    "AllOf",
    "AnyOf",
    "Deadline",
    "MaxRounds",
    "Plateau",
    "RelativeChange",
    "RoundReport",
    "StopRule",
    "build_stop_rule",
    "register_stop_rule",
    "relative_change",
]

Clock = Callable[[], float]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundReport:
    """What the master knows after fusing a round.

    ``round`` counts from 1; ``num_samples`` is the participants' total; ``param_change`` is
    :func:`relative_change` of the target over the round (None when unknown); ``seconds`` is the
    round's wall-clock duration.
    """

    round: int
    participants: list[str] = field(default_factory=list)
    num_samples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    param_change: float | None = None
    seconds: float = 0.0


def _int_option(option: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value!r}")
    return value


def _float_option(option: str, value: object, *, positive: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (value <= 0 if positive else value < 0)
    ):
        raise ValueError(
            f"{option} must be a finite number {'>' if positive else '>='} 0, got {value!r}"
        )
    return float(value)


class StopRule(ABC):
    """Decides, round by round, whether training should stop."""

    @abstractmethod
    def update(self, report: RoundReport) -> str | None:
        """Take in ``report``; a reason string when training should stop, else None."""

    def reset(self) -> None:  # noqa: B027 (optional hook)
        """Forget everything seen so far (a new job)."""

    def start(self) -> None:  # noqa: B027 (optional hook)
        """The job starts (before it waits for its children): rules that measure time start
        their clock here."""

    def state_dict(self) -> dict[str, Any]:
        """What a master must checkpoint to resume this rule."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")


class MaxRounds(StopRule):
    """Stop after round ``rounds``."""

    def __init__(self, rounds: int) -> None:
        self.rounds = _int_option("max_rounds", rounds, 1)

    def update(self, report: RoundReport) -> str | None:
        if report.round >= self.rounds:
            return f"max_rounds: round {report.round} of {self.rounds} done"
        return None


class RelativeChange(StopRule):
    """Stop when the relative parameter change stays below ``eps`` for ``patience`` rounds."""

    def __init__(self, eps: float, patience: int = 1) -> None:
        self.eps = _float_option("relative_change eps", eps, positive=True)
        self.patience = _int_option("relative_change patience", patience, 1)
        self._below = 0

    def update(self, report: RoundReport) -> str | None:
        change = report.param_change
        if change is None:
            return None
        self._below = self._below + 1 if change < self.eps else 0
        if self._below >= self.patience:
            rounds = f" for {self._below} rounds" if self.patience > 1 else ""
            return f"relative_change: {change:.3g} < eps {self.eps:g}{rounds}"
        return None

    def reset(self) -> None:
        self._below = 0

    def state_dict(self) -> dict[str, Any]:
        return {"below": self._below}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._below = int(state.get("below", 0))


#: Counters a child's train reply may carry (its computing servers, its two-level PS) that the
#: round's metrics report, summed over the round's accepted children.
CHILD_COUNTER_PREFIXES: Final = ("elastic_", "ps_")


def round_metrics(split: str = "valid", ks: Sequence[int] = (20, 10)) -> list[str]:
    """The metrics a federated round reports when it is evaluated on ``split`` with cut-offs
    ``ks`` (besides the children's ``elastic_*`` and ``ps_*`` counters)."""
    ranked = [f"{split}_{name}@{k}" for k in ks for name in ("recall", "mrr")]
    return [*ranked, f"{split}_examples", "train_loss"]


def unknown_round_metrics(
    rule: StopRule, split: str = "valid", ks: Sequence[int] = (20, 10)
) -> list[str]:
    """Why ``rule`` (or a member of it) watches a metric a federated round never reports (see
    :func:`round_metrics`), one line each: such a plateau would never stop the job, silently."""
    if isinstance(rule, _Composite):
        return [why for member in rule.rules for why in unknown_round_metrics(member, split, ks)]
    known = round_metrics(split, ks)
    if not isinstance(rule, Plateau) or rule.metric in known:
        return []
    if rule.metric.startswith(CHILD_COUNTER_PREFIXES):
        return []
    close = difflib.get_close_matches(rule.metric, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return [
        f"plateau metric {rule.metric!r} is not one a round reports (rounds are evaluated on "
        f"{split!r} at K = {', '.join(map(str, ks))}: {', '.join(known)}; and the children's "
        f"elastic_* and ps_* counters){hint}"
    ]


class Plateau(StopRule):
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` rounds.

    ``mode`` "max" (recall, MRR) or "min" (loss). Reports without the metric are skipped (not
    every round is evaluated); a NaN value counts as no improvement.
    """

    def __init__(
        self, metric: str, patience: int = 3, min_delta: float = 0.0, mode: str = "max"
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"plateau metric must be a non-empty string, got {metric!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"plateau mode must be 'max' or 'min', got {mode!r}")
        if metric.startswith("test_"):
            raise ValueError(
                f"plateau on {metric!r} would choose when to stop by the test split: stop on a "
                "validation metric (e.g. valid_recall@20, with eval-split = 'valid')"
            )
        self.metric = metric
        self.patience = _int_option("plateau patience", patience, 1)
        self.min_delta = _float_option("plateau min_delta", min_delta, positive=False)
        self.mode = mode
        self._warned = False
        self.reset()

    def reset(self) -> None:
        self.best: float | None = None
        self.best_round: int | None = None
        self._stale = 0

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, report: RoundReport) -> str | None:
        if self.metric not in report.metrics:
            evaluated = any(key.startswith(("valid_", "test_")) for key in report.metrics)
            if evaluated and not self._warned:  # an evaluated round without it: a misspelling?
                self._warned = True
                log.warning(
                    "plateau metric %r is not among round %d's metrics (%s): this rule "
                    "cannot stop the run",
                    self.metric,
                    report.round,
                    ", ".join(sorted(report.metrics)),
                )
            return None
        value = float(report.metrics[self.metric])
        if self._improves(value):
            self.best, self.best_round, self._stale = value, report.round, 0
            return None
        self._stale += 1
        if self._stale >= self.patience:
            best = "none" if self.best is None else f"{self.best:.4g} at round {self.best_round}"
            return (
                f"plateau: {self.metric} not improved by more than {self.min_delta:g} "
                f"for {self._stale} evaluated rounds (best {best})"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_round": self.best_round, "stale": self._stale}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.best_round = state.get("best_round")
        self._stale = int(state.get("stale", 0))


class Deadline(StopRule):
    """Stop once ``seconds`` of wall clock have passed since :meth:`start` (called by the master
    when the job starts, before it waits for its children; a resumed job goes on from the time
    its checkpoint recorded) or, failing that, since the first update. ``clock`` is
    injectable."""

    def __init__(self, seconds: float, clock: Clock = time.monotonic) -> None:
        self.seconds = _float_option("deadline_s", seconds, positive=True)
        self._clock = clock
        self._start: float | None = None

    def start(self) -> None:
        """Start the clock now, unless it is running."""
        if self._start is None:
            self._start = self._clock()

    @property
    def elapsed(self) -> float:
        """Seconds since the start (0 before it)."""
        return 0.0 if self._start is None else self._clock() - self._start

    def update(self, report: RoundReport) -> str | None:
        self.start()
        elapsed = self.elapsed
        if elapsed >= self.seconds:
            return f"deadline: {elapsed:.1f} s elapsed, limit {self.seconds:g} s"
        return None

    def reset(self) -> None:
        self._start = None

    def state_dict(self) -> dict[str, Any]:
        return {"elapsed": None if self._start is None else self.elapsed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        elapsed = state.get("elapsed")
        self._start = None if elapsed is None else self._clock() - float(elapsed)


class _Composite(StopRule):
    def __init__(self, *rules: StopRule) -> None:
        if not rules:
            raise ValueError(f"{type(self).__name__} needs at least one stop rule")
        for rule in rules:
            if not isinstance(rule, StopRule):
                raise TypeError(f"{type(self).__name__} takes StopRule objects, got {rule!r}")
        self.rules = list(rules)

    def _reasons(self, report: RoundReport) -> list[str | None]:
        return [rule.update(report) for rule in self.rules]  # every rule sees every report

    def reset(self) -> None:
        for rule in self.rules:
            rule.reset()

    def start(self) -> None:
        for rule in self.rules:
            rule.start()

    def state_dict(self) -> dict[str, Any]:
        return {"rules": [rule.state_dict() for rule in self.rules]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        states = state.get("rules", [])
        if len(states) != len(self.rules):
            raise ValueError(f"state has {len(states)} stop rules, this one {len(self.rules)}")
        for rule, sub in zip(self.rules, states, strict=True):
            rule.load_state_dict(sub)


class AnyOf(_Composite):
    """Stop when any member says so; the reason lists every member that did."""

    def update(self, report: RoundReport) -> str | None:
        reasons = [r for r in self._reasons(report) if r is not None]
        return "; ".join(reasons) if reasons else None


class AllOf(_Composite):
    """Stop when every member says so in the same round."""

    def update(self, report: RoundReport) -> str | None:
        reasons = self._reasons(report)
        if all(r is not None for r in reasons):
            return " and ".join(r for r in reasons if r is not None)
        return None


_KEYS = ("max_rounds", "relative_change", "plateau", "deadline_s", "any_of", "all_of")
ENTRY_POINT_GROUP = "fedenc.stop"
S = TypeVar("S", bound=type[StopRule])
# Stop rules of other packages: spec key -> class, built from the key's value (a mapping:
# keyword arguments; a list: positional ones; anything else: the one argument).
_PLUGINS: dict[str, type[StopRule]] = {}
_loaded_entry_points = False


def register_stop_rule(key: str) -> Callable[[S], S]:
    """Class decorator: make a :class:`StopRule` subclass usable as ``key`` in stop specs
    (``--stop 'key=VALUE'``, a scenario's ``[stop]`` table, JSON). Another package can also
    list it under the ``fedenc.stop`` entry-point group."""

    def decorate(cls: S) -> S:
        if not (isinstance(cls, type) and issubclass(cls, StopRule)):
            raise TypeError(f"register_stop_rule({key!r}) needs a StopRule subclass, got {cls!r}")
        if key in _KEYS or (key in _PLUGINS and _PLUGINS[key] is not cls):
            raise ValueError(f"stop rule key {key!r} is already taken")
        _PLUGINS[key] = cls
        return cls

    return decorate


def _load_plugins() -> None:
    global _loaded_entry_points
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    load_entry_points(
        ENTRY_POINT_GROUP,
        "stop-rule",
        lambda name: name if name in _KEYS else _PLUGINS.get(name),
        lambda name, cls: register_stop_rule(name)(cls),
    )


def _known_keys() -> tuple[str, ...]:
    _load_plugins()
    return (*_KEYS, *sorted(_PLUGINS))


def _plugin(key: str, value: Any) -> StopRule:
    cls = _PLUGINS[key]
    try:
        if isinstance(value, Mapping):
            return cls(**{str(k): v for k, v in value.items()})
        if isinstance(value, list):
            return cls(*value)
        return cls(value)  # type: ignore[call-arg]
    except (TypeError, ValueError) as err:  # arguments its constructor refused: name the rule
        raise ValueError(f"stop rule {key!r} ({cls.__name__}): {err}") from None


def _plateau(value: object) -> Plateau:
    if isinstance(value, str):  # "metric[:patience[:min_delta[:mode]]]"
        parts = value.split(":")
        if not 1 <= len(parts) <= 4:
            raise ValueError(
                f"plateau: expected metric[:patience[:min_delta[:mode]]], got {value!r}"
            )
        options: dict[str, Any] = {"metric": parts[0]}
        if len(parts) > 1:
            options["patience"] = _number(parts[1], "plateau patience")
        if len(parts) > 2:
            options["min_delta"] = _number(parts[2], "plateau min_delta")
        if len(parts) > 3:
            options["mode"] = parts[3]
        return Plateau(**options)
    if isinstance(value, Mapping):
        unknown = set(value) - {"metric", "patience", "min_delta", "mode"}
        if unknown or "metric" not in value:
            raise ValueError(
                f"plateau takes metric, patience, min_delta, mode; got {sorted(map(str, value))}"
            )
        return Plateau(**{str(k): v for k, v in value.items()})
    raise ValueError(f"plateau must be a mapping or 'metric:patience', got {value!r}")


def _relative_change(value: object) -> RelativeChange:
    if isinstance(value, Mapping):
        unknown = set(value) - {"eps", "patience"}
        if unknown or "eps" not in value:
            raise ValueError(f"relative_change takes eps, patience; got {sorted(map(str, value))}")
        return RelativeChange(**{str(k): v for k, v in value.items()})
    if isinstance(value, str):
        value = _number(value, "relative_change")
    return RelativeChange(value)  # type: ignore[arg-type]


def _number(text: str, option: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{option}: expected a number, got {text!r}") from None


def _plugin_value(text: str) -> Any:
    """A plugin rule's value in a ``key=value`` string: a number when it reads as one."""
    try:
        return _number(text, "")
    except ValueError:
        return text


def _parse_string(spec: str) -> Any:
    text = spec.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"stop rule: not valid JSON ({err})") from None
    if text.isdigit():
        return {"max_rounds": int(text)}
    parsed: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise ValueError(f"stop rule: expected key=value, got {item!r}")
        known = _known_keys()
        if key not in known:  # before its value is read as a number: name the key
            raise ValueError(
                f"unknown stop rule key(s) {[key]}; known: {', '.join(known)}"
                + load_failure_note(ENTRY_POINT_GROUP, key)
            )
        if key in ("plateau", "relative_change"):
            parsed[key] = value  # their own parsers read the text
        elif key in _PLUGINS:
            parsed[key] = _plugin_value(value)
        else:
            parsed[key] = _number(value, key)
    return parsed


def build_stop_rule(
    spec: Mapping[str, Any] | str | StopRule, clock: Clock = time.monotonic
) -> StopRule:
    """A stop rule from a spec; several keys combine with :class:`AnyOf`.

    Dict keys: ``max_rounds`` (int), ``relative_change`` (eps, or {eps, patience}), ``plateau``
    ({metric, patience, min_delta, mode}, or "metric:patience:min_delta:mode"), ``deadline_s``,
    ``any_of`` / ``all_of`` (lists of specs). Strings: JSON, a bare round count ("20"), or
    ``key=value`` pairs such as "max_rounds=20,plateau=valid_recall@20:3,deadline_s=600".
    """
    if isinstance(spec, StopRule):
        return spec
    if isinstance(spec, str):
        spec = _parse_string(spec)
    if not isinstance(spec, Mapping):
        raise ValueError(f"stop rule spec must be a mapping or a string, got {spec!r}")
    known = _known_keys()
    unknown = [str(key) for key in spec if key not in known]
    if unknown:
        notes = "".join(load_failure_note(ENTRY_POINT_GROUP, key) for key in unknown)
        raise ValueError(f"unknown stop rule key(s) {unknown}; known: {', '.join(known)}{notes}")
    rules: list[StopRule] = []
    for key, value in spec.items():
        if key == "max_rounds":
            rules.append(MaxRounds(value))
        elif key == "relative_change":
            rules.append(_relative_change(value))
        elif key == "plateau":
            rules.append(_plateau(value))
        elif key == "deadline_s":
            rules.append(Deadline(value, clock=clock))
        elif key in _PLUGINS:
            rules.append(_plugin(str(key), value))
        else:
            if isinstance(value, str | Mapping) or not isinstance(value, Sequence):
                raise ValueError(f"{key} must be a list of stop rule specs, got {value!r}")
            members = [build_stop_rule(item, clock=clock) for item in value]
            rules.append(AnyOf(*members) if key == "any_of" else AllOf(*members))
    if not rules:
        raise ValueError(f"empty stop rule spec: give at least one of {', '.join(_KEYS)}")
    return rules[0] if len(rules) == 1 else AnyOf(*rules)
