"""Stop rules: each one on a literal sequence of round reports, composed, and built from specs."""

from __future__ import annotations

import math

import pytest
import torch

from fedenc.federation.stopping import (
    AllOf,
    AnyOf,
    Deadline,
    MaxRounds,
    Plateau,
    RelativeChange,
    RoundReport,
    StopRule,
    build_stop_rule,
    relative_change,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(round: int, change: float | None = None, **metrics: float) -> RoundReport:
    return RoundReport(
        round=round,
        participants=["a", "b"],
        num_samples=10,
        metrics={k.replace("_at_", "@"): v for k, v in metrics.items()},
        param_change=change,
        seconds=1.0,
    )


def run(rule: StopRule, reports: list[RoundReport]) -> list[str | None]:
    return [rule.update(r) for r in reports]


def test_max_rounds() -> None:
    out = run(MaxRounds(3), [report(r) for r in (1, 2, 3, 4)])
    assert out[:2] == [None, None]
    assert out[2] is not None and "max_rounds" in out[2] and "3" in out[2]
    assert out[3] is not None
    with pytest.raises(ValueError, match="max_rounds"):
        MaxRounds(0)


def test_relative_change() -> None:
    rule = RelativeChange(1e-3)
    out = run(rule, [report(1, 0.1), report(2, None), report(3, 5e-4)])
    assert out[:2] == [None, None]
    assert out[2] is not None and "relative_change" in out[2]
    patient = RelativeChange(1e-3, patience=2)
    changes = [5e-4, 0.2, 5e-4, 1e-4]  # the large change resets the count
    assert [
        r is not None for r in run(patient, [report(i + 1, c) for i, c in enumerate(changes)])
    ] == [
        False,
        False,
        False,
        True,
    ]
    for bad in (0, -1e-3, math.nan, math.inf):
        with pytest.raises(ValueError, match="eps"):
            RelativeChange(bad)


def test_plateau_max() -> None:
    rule = Plateau("valid_recall@20", patience=3)
    values = [0.10, 0.20, 0.20, 0.19, 0.20, 0.21]
    out = run(rule, [report(i + 1, valid_recall_at_20=v) for i, v in enumerate(values)])
    assert out[:4] == [None] * 4
    assert out[4] is not None
    assert "valid_recall@20" in out[4] and "best 0.2 at round 2" in out[4]
    assert out[5] is None  # 0.21 is an improvement: the count starts again
    assert rule.best == 0.21 and rule.best_round == 6


def test_plateau_min_delta_and_missing_metric_and_nan() -> None:
    rule = Plateau("valid_recall@20", patience=2, min_delta=0.05)
    reports = [
        report(1, valid_recall_at_20=0.10),
        report(2),  # not evaluated this round: skipped
        report(3, valid_recall_at_20=0.14),  # +0.04 < min_delta: no improvement
        report(4, valid_recall_at_20=math.nan),  # NaN: no improvement
    ]
    out = run(rule, reports)
    assert out[:3] == [None, None, None]
    assert out[3] is not None and "2 evaluated rounds" in out[3]


def test_plateau_min_mode() -> None:
    rule = Plateau("loss", patience=1, mode="min")
    assert rule.update(report(1, loss=2.0)) is None
    assert rule.update(report(2, loss=1.5)) is None
    assert rule.update(report(3, loss=1.6)) is not None


@pytest.mark.parametrize(
    ("options", "option"),
    [({"patience": 0}, "patience"), ({"min_delta": -0.1}, "min_delta"), ({"mode": "up"}, "mode")],
)
def test_plateau_bad_options(options: dict[str, object], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        Plateau("m", **options)  # type: ignore[arg-type]


def test_deadline_counts_from_the_first_update() -> None:
    clock = FakeClock()
    rule = Deadline(60, clock=clock)
    clock.now += 500  # time before the first update does not count
    assert rule.update(report(1)) is None
    clock.now += 59.5
    assert rule.update(report(2)) is None
    clock.now += 0.5
    reason = rule.update(report(3))
    assert reason is not None and "deadline" in reason and "60.0 s" in reason


def test_deadline_explicit_start_and_resume() -> None:
    clock = FakeClock()
    rule = Deadline(10, clock=clock)
    rule.start()
    clock.now += 7
    assert rule.update(report(1)) is None
    state = rule.state_dict()
    assert state == {"elapsed": 7.0}
    other_clock = FakeClock()
    other_clock.now = 5.0
    resumed = Deadline(10, clock=other_clock)
    resumed.load_state_dict(state)
    other_clock.now += 3
    assert resumed.update(report(2)) is not None  # 7 + 3 >= 10
    with pytest.raises(ValueError, match="deadline_s"):
        Deadline(0)


def test_any_of_reports_every_rule_that_fired_and_updates_all() -> None:
    plateau = Plateau("m", patience=1)
    rule = AnyOf(MaxRounds(2), plateau)
    assert rule.update(report(1, m=0.5)) is None
    reason = rule.update(report(2, m=0.4))
    assert reason is not None and "max_rounds" in reason and "plateau" in reason
    only = AnyOf(MaxRounds(5), Plateau("m", patience=1))
    only.update(report(1, m=0.5))
    assert only.update(report(2, m=0.6)) is None
    fired = only.update(report(3, m=0.6))
    assert fired is not None and fired.startswith("plateau") and "max_rounds" not in fired


def test_all_of() -> None:
    rule = AllOf(MaxRounds(2), RelativeChange(0.01))
    assert rule.update(report(1, 0.001)) is None  # small change, but too early
    assert rule.update(report(2, 0.5)) is None  # late enough, but still moving
    reason = rule.update(report(3, 0.001))
    assert reason is not None and "max_rounds" in reason and " and " in reason
    with pytest.raises(ValueError):
        AnyOf()


def test_composite_state_round_trip_and_reset() -> None:
    rule = AnyOf(Plateau("m", patience=2), RelativeChange(0.1, patience=2))
    rule.update(report(1, 0.01, m=0.5))
    rule.update(report(2, 0.5, m=0.4))
    state = rule.state_dict()
    fresh = AnyOf(Plateau("m", patience=2), RelativeChange(0.1, patience=2))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh.update(report(3, 0.5, m=0.3)) is not None  # plateau: second stale round
    fresh.reset()
    assert fresh.update(report(4, 0.5, m=0.3)) is None
    with pytest.raises(ValueError):
        AnyOf(MaxRounds(1)).load_state_dict(state)


def test_build_stop_rule_from_dict() -> None:
    clock = FakeClock()
    spec = {
        "max_rounds": 20,
        "plateau": {"metric": "valid_recall@20", "patience": 3},
        "deadline_s": 600,
    }
    rule = build_stop_rule(spec, clock=clock)
    assert isinstance(rule, AnyOf)
    kinds = [type(r) for r in rule.rules]
    assert kinds == [MaxRounds, Plateau, Deadline]
    assert rule.update(report(1)) is None
    clock.now += 601
    reason = rule.update(report(2))
    assert reason is not None and reason.startswith("deadline")
    assert isinstance(build_stop_rule({"max_rounds": 5}), MaxRounds)


def test_build_stop_rule_from_strings() -> None:
    rule = build_stop_rule("max_rounds=20, plateau=valid_recall@20:3:0.001, deadline_s=600")
    assert isinstance(rule, AnyOf)
    plateau = rule.rules[1]
    assert isinstance(plateau, Plateau)
    assert (plateau.metric, plateau.patience, plateau.min_delta) == ("valid_recall@20", 3, 0.001)
    rounds = build_stop_rule("20")
    assert isinstance(rounds, MaxRounds) and rounds.rounds == 20
    change = build_stop_rule("relative_change=1e-4")
    assert isinstance(change, RelativeChange) and change.eps == 1e-4
    js = build_stop_rule('{"relative_change": {"eps": 0.01, "patience": 2}}')
    assert isinstance(js, RelativeChange) and js.patience == 2


def test_build_nested() -> None:
    rule = build_stop_rule(
        {"all_of": [{"max_rounds": 3}, {"relative_change": 0.01}], "max_rounds": 10}
    )
    assert isinstance(rule, AnyOf) and isinstance(rule.rules[0], AllOf)
    assert rule.update(report(2, 0.001)) is None  # all_of: round 3 not reached yet
    assert rule.update(report(3, 0.5)) is None  # ... still changing
    assert rule.update(report(3, 0.001)) == (
        "max_rounds: round 3 of 3 done and relative_change: 0.001 < eps 0.01"
    )
    fresh = build_stop_rule(
        {"all_of": [{"max_rounds": 3}, {"relative_change": 0.01}], "max_rounds": 10}
    )
    assert fresh.update(report(10, 0.5)) == "max_rounds: round 10 of 10 done"  # any_of


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({"max_round": 3}, "max_round"),
        ({}, "empty"),
        ("", "empty"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"max_rounds": "ten"}, "max_rounds"),
        ({"deadline_s": -5}, "deadline_s"),
        ({"plateau": {"patience": 3}}, "metric"),
        ({"plateau": {"metric": "m", "patiense": 3}}, "plateau"),
        ({"any_of": {"max_rounds": 3}}, "any_of"),
        ("max_rounds", "key=value"),
        ("max_rounds=abc", "max_rounds"),
        ("plateu=valid_recall@20:3", r"unknown stop rule key\(s\) \['plateu'\]"),
        ("{not json", "JSON"),
        (42, "mapping"),
    ],
)
def test_build_stop_rule_rejects_bad_specs(spec: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        build_stop_rule(spec)  # type: ignore[arg-type]


def test_relative_change_helper_is_exported() -> None:
    old = {"w": torch.tensor([1.0, 0.0])}
    new = {"w": torch.tensor([1.0, 0.1])}
    assert relative_change(old, new) == pytest.approx(0.1)


def test_a_plateau_metric_no_evaluated_round_reports_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    rule = Plateau("valid_recal@20", patience=1)
    with caplog.at_level(logging.WARNING, logger="fedenc.federation.stopping"):
        assert rule.update(report(1, train_loss=5.0)) is None  # not evaluated: no warning
        assert caplog.text == ""
        assert rule.update(report(2, train_loss=4.0, **{"valid_recall@20": 30.0})) is None
        assert rule.update(report(3, train_loss=3.0, **{"valid_recall@20": 31.0})) is None
    assert caplog.text.count("plateau metric 'valid_recal@20' is not among round 2") == 1
    assert "train_loss, valid_recall@20" in caplog.text


def test_a_registered_stop_rule_is_built_from_strings_and_specs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from fedenc.federation import stopping

    monkeypatch.setattr(stopping, "_PLUGINS", {})
    monkeypatch.setattr(stopping, "_loaded_entry_points", True)

    @stopping.register_stop_rule("recall_above")
    class RecallAbove(stopping.StopRule):
        def __init__(self, threshold: float, metric: str = "valid_recall@20") -> None:
            self.threshold, self.metric = float(threshold), metric

        def update(self, report: RoundReport) -> str | None:
            value = report.metrics.get(self.metric)
            if value is not None and value >= self.threshold:
                return f"recall_above: {self.metric} {value:g} >= {self.threshold:g}"
            return None

    rule = build_stop_rule("max_rounds=50,recall_above=30")
    assert rule.update(report(1, **{"valid_recall@20": 10.0})) is None
    assert "recall_above: valid_recall@20 31 >= 30" in str(
        rule.update(report(2, **{"valid_recall@20": 31.0}))
    )
    rule = build_stop_rule({"recall_above": {"threshold": 5, "metric": "valid_mrr@20"}})
    assert rule.update(report(1, **{"valid_mrr@20": 6.0})) is not None
    with pytest.raises(ValueError, match=r"stop rule 'recall_above' \(RecallAbove\): .*thresh"):
        build_stop_rule({"recall_above": {"thresh": 5}})
    # a value its constructor cannot read: the rule is named too (float('abc') alone was not)
    with pytest.raises(ValueError, match=r"stop rule 'recall_above' \(RecallAbove\): could not"):
        build_stop_rule("recall_above=abc")
    with pytest.raises(ValueError, match=r"known: max_rounds, .*, recall_above"):
        build_stop_rule("recal_above=3")
    with pytest.raises(ValueError, match="already taken"):
        stopping.register_stop_rule("plateau")(RecallAbove)


def test_a_plateau_on_a_test_metric_is_refused() -> None:
    # Model selection never looks at test: stopping on a test metric would.
    with pytest.raises(ValueError, match="would choose when to stop by the test split"):
        build_stop_rule("plateau=test_recall@20:3")


def test_a_master_refuses_a_plateau_on_a_metric_no_round_reports() -> None:
    # A misspelt metric used to be accepted (Control API included) and never stopped the job.
    from fedenc.federation.master import MasterConfig

    with pytest.raises(ValueError, match="did you mean 'valid_recall@20'"):
        MasterConfig(num_items=10, stop="plateau=valid_recal@20:3")
    with pytest.raises(ValueError, match="not one a round reports"):
        MasterConfig(num_items=10, stop={"any_of": [{"max_rounds": 9}, {"plateau": "loss:2"}]})
    with pytest.raises(ValueError, match=r"evaluated on 'valid' at K = 20, 10"):
        MasterConfig(num_items=10, stop="plateau=valid_recall@50:3")  # no such cut-off
    with pytest.raises(ValueError, match="not one a round reports"):
        MasterConfig(num_items=10, eval_split="test", stop="plateau=valid_recall@20:3")
    MasterConfig(num_items=10, stop="plateau=valid_mrr@10:2")
    MasterConfig(num_items=10, stop="plateau=train_loss:2:0:min")
