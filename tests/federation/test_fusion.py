"""Fusion rules: each rule's arithmetic on literal tensors, streaming = batch, bad replies rejected
without poisoning the round, reused buffers, server-optimizer state, the registry and plugins."""

from __future__ import annotations

import io
import logging
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from fedenc.federation.fusion import (
    EmptyRoundError,
    FusionOutputError,
    FusionRule,
    UnknownFusionRuleError,
    available_fusion_rules,
    build_fusion_rule,
    register_fusion_rule,
)
from fedenc.federation.fusion import registry as registry_module
from fedenc.federation.fusion.krum import krum_scores
from fedenc.federation.fusion.weighted_sum import WeightedSum
from fedenc.federation.parameters import BadUpdateError, Parameters

BUILTIN = [
    "clipped_mean",
    "fedadam",
    "fedavgm",
    "fedyogi",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "trimmed_mean",
    "weighted_sum",
]
STREAMING = ["weighted_sum", "mean", "clipped_mean", "fedavgm", "fedadam", "fedyogi"]
BATCH = ["median", "trimmed_mean", "krum", "multi_krum"]


def ps(dtype: torch.dtype = torch.float32, **values: Any) -> Parameters:
    """A parameter set from literal values."""
    return {name: torch.tensor(value, dtype=dtype) for name, value in values.items()}


def fuse(
    rule: FusionRule,
    current: Parameters,
    updates: list[tuple[str, Parameters, int]],
    round: int = 1,
) -> Parameters:
    rule.begin(round, current)
    for child, params, n in updates:
        rule.add(child, params, n)
    return rule.result()


def assert_same(actual: Parameters, expected: Parameters, exact: bool = False) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        if exact:
            assert torch.equal(actual[name], expected[name]), (name, actual[name], expected[name])
        else:
            assert_close(actual[name], expected[name])


ZERO = ps(w=[0.0, 0.0], b=[0.0])
T1 = ps(w=[1.0, 2.0], b=[4.0])
T2 = ps(w=[5.0, 6.0], b=[8.0])


# -- weighted_sum: the patent's rule ------------------------------------------------------------


def test_weighted_sum_literal_n_1_3() -> None:
    out = fuse(build_fusion_rule("weighted_sum"), ZERO, [("a", T1, 1), ("b", T2, 3)])
    # 0.25 θ1 + 0.75 θ2
    assert_same(out, ps(w=[4.0, 5.0], b=[7.0]), exact=True)


def test_weighted_sum_is_the_default_and_fedavg_alias() -> None:
    assert type(build_fusion_rule()) is WeightedSum
    assert type(build_fusion_rule("fedavg")) is WeightedSum
    assert WeightedSum.name == "weighted_sum"


def test_equal_sets_come_back_unchanged_not_shrunk_by_k() -> None:
    theta = ps(w=[[1.5, -2.25], [0.125, 3.0]], b=[-7.5])
    out = fuse(
        build_fusion_rule("weighted_sum"),
        theta,
        [(c, theta, n) for c, n in zip("abc", [2, 5, 9], strict=True)],
    )
    assert_same(out, theta, exact=True)
    # the classic bug: mean of the weighted sets gives θ/K
    shrunk = {k: v / 3 for k, v in theta.items()}
    assert not torch.allclose(out["w"], shrunk["w"])


def test_equal_random_sets_exact_with_float64_accumulator() -> None:
    gen = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    rule = build_fusion_rule("weighted_sum", accumulator_dtype="float64")
    out = fuse(rule, theta, [(f"c{i}", theta, n) for i, n in enumerate([3, 7, 11])])
    assert_same(out, theta, exact=True)


def test_weights_renormalise_over_responders() -> None:
    # three children were asked; "c" never replied: weights are 1/4, 3/4, not 1/6, 3/6
    rule = build_fusion_rule("weighted_sum")
    out = fuse(rule, ZERO, [("a", T1, 1), ("b", T2, 3)])
    assert_same(out, ps(w=[4.0, 5.0], b=[7.0]), exact=True)
    assert rule.participants == ["a", "b"]
    assert rule.num_samples == {"a": 1, "b": 3}


def test_mean_literal_ignores_sample_counts() -> None:
    out = fuse(build_fusion_rule("mean"), ZERO, [("a", T1, 1), ("b", T2, 3)])
    assert_same(out, ps(w=[3.0, 4.0], b=[6.0]), exact=True)


def test_integer_tensors_are_fused_and_rounded() -> None:
    current = {"x": torch.zeros(1), "n": torch.tensor([0])}
    a = {"x": torch.tensor([1.0]), "n": torch.tensor([10])}
    b = {"x": torch.tensor([2.0]), "n": torch.tensor([13])}
    out = fuse(build_fusion_rule("weighted_sum"), current, [("a", a, 1), ("b", b, 1)])
    assert out["n"].dtype == torch.long
    assert out["n"].tolist() == [12]  # round(11.5) to even


# -- streaming memory and buffer reuse -------------------------------------------------------------


@pytest.mark.parametrize("name", ["weighted_sum", "mean", "clipped_mean", "fedavgm"])
def test_accumulation_buffer_is_reused_across_rounds(name: str) -> None:
    rule: Any = build_fusion_rule(name)
    first = fuse(rule, ZERO, [("a", T1, 1), ("b", T2, 3)], round=1)
    first_copy = {k: v.clone() for k, v in first.items()}
    pointer = rule.buffer.data_ptr()
    second = fuse(rule, first, [("a", T2, 1)], round=2)
    assert rule.buffer.data_ptr() == pointer
    assert_same(first, first_copy, exact=True)  # results never alias the buffer
    if name in ("weighted_sum", "mean"):
        assert_same(second, T2, exact=True)  # the buffer was zeroed between rounds


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [False, True])
def test_last_rounds_sums_never_leak_into_the_next(dtype: str, rows: bool) -> None:
    # The buffer is not zeroed between rounds: the first update overwrites it, or the row-weighted
    # path zeroes it before folding in place.
    current = _table([0.0, 0.0], [0.0, 0.0])
    huge = {"emb": torch.full((2, 2), 1e6), "w": torch.full((2,), -1e6)}
    a = {"emb": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "w": torch.tensor([0.5, 0.25])}
    b = {"emb": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "w": torch.tensor([1.5, 2.0])}
    weights = {"emb": torch.tensor([1.0, 2.0])} if rows else None
    names = ["emb"] if rows else []

    def second_round(rule: WeightedSum) -> dict[str, torch.Tensor]:
        rule.begin(2, current, row_weighted=names)
        rule.add("a", a, 1, weights)
        rule.add("b", b, 3)
        return rule.result()

    reused = WeightedSum(accumulator_dtype=dtype)
    reused.begin(1, current, row_weighted=names)
    reused.add("x", huge, 7)
    reused.result()
    fresh = WeightedSum(accumulator_dtype=dtype)
    assert_same(second_round(reused), second_round(fresh), exact=True)


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_rules_keep_no_reference_to_updates(name: str) -> None:
    rule = build_fusion_rule(name)
    assert rule.streaming
    rule.begin(1, ZERO)
    update = {k: v.clone() for k, v in T1.items()}
    ref = weakref.ref(update["w"])
    rule.add("a", update, 2)
    del update
    assert ref() is None
    rule.result()


@pytest.mark.parametrize("name", BATCH)
def test_batch_rules_say_so(name: str) -> None:
    assert not build_fusion_rule(name).streaming


# -- streaming = batch -------------------------------------------------------------------------


def batch_reference(
    name: str, current: Parameters, updates: list[tuple[str, Parameters, int]]
) -> Parameters:
    """What each streaming rule must give, written as the plain K-set formula in float64."""
    ns = torch.tensor([float(n) for _, _, n in updates], dtype=torch.float64)
    out: Parameters = {}
    for key, x in current.items():
        stack = torch.stack([p[key].double() for _, p, _ in updates])
        shape = (-1,) + (1,) * (stack.dim() - 1)
        if name == "mean":
            value = stack.mean(0)
        elif name == "clipped_mean":
            norms = torch.tensor(
                [
                    math.sqrt(
                        sum(
                            float(((p[k].double() - current[k].double()) ** 2).sum())
                            for k in current
                        )
                    )
                    for _, p, _ in updates
                ],
                dtype=torch.float64,
            )
            scale = torch.clamp(0.5 / norms, max=1.0)
            deltas = stack - x.double()
            value = x.double() + (deltas * (ns * scale).view(shape)).sum(0) / ns.sum()
        else:
            value = (stack * ns.view(shape)).sum(0) / ns.sum()
        out[key] = value.to(x.dtype)
    return out


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(["weighted_sum", "mean", "clipped_mean"]),
    k=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    counts=st.lists(st.integers(1, 1000), min_size=5, max_size=5),
)
def test_streaming_equals_batch(name: str, k: int, seed: int, counts: list[int]) -> None:
    gen = torch.Generator().manual_seed(seed)
    current = {"w": torch.randn(3, 2, generator=gen), "b": torch.randn(2, generator=gen)}
    updates = [
        (
            f"c{i}",
            {key: v + 0.5 * torch.randn(v.shape, generator=gen) for key, v in current.items()},
            counts[i],
        )
        for i in range(k)
    ]
    options = {"clip_norm": 0.5} if name == "clipped_mean" else {}
    out = fuse(build_fusion_rule(name, **options), current, updates)
    assert_same(out, batch_reference(name, current, updates))
    # arrival order changes only float rounding
    shuffled = fuse(build_fusion_rule(name, **options), current, updates[::-1])
    assert_same(shuffled, out)


@pytest.mark.parametrize("name", BATCH)
def test_batch_rules_do_not_depend_on_arrival_order(name: str) -> None:
    ups = [(f"c{i}", ps(w=[float(i), float(i * i % 5)], b=[float(-i)]), i + 1) for i in range(5)]
    results = [
        fuse(build_fusion_rule(name), ZERO, list(order))
        for order in (ups, ups[::-1], ups[2:] + ups[:2])
    ]
    for other in results[1:]:
        assert_same(other, results[0], exact=True)


# -- bad replies --------------------------------------------------------------------------------


BAD: dict[str, Callable[[], tuple[object, object]]] = {
    "missing": lambda: ({"w": torch.ones(2)}, 1),
    "extra": lambda: ({**T1, "head": torch.ones(1)}, 1),
    "shape": lambda: ({"w": torch.ones(3), "b": torch.ones(1)}, 1),
    "dtype": lambda: ({"w": torch.ones(2, dtype=torch.float64), "b": torch.ones(1)}, 1),
    "nan": lambda: ({"w": torch.tensor([1.0, math.nan]), "b": torch.ones(1)}, 1),
    "inf": lambda: ({"w": torch.tensor([math.inf, 1.0]), "b": torch.ones(1)}, 1),
    "zero-samples": lambda: (T1, 0),
}


@pytest.mark.parametrize("kind", list(BAD))
@pytest.mark.parametrize("name", BUILTIN)
def test_bad_update_is_rejected_and_does_not_poison_the_round(name: str, kind: str) -> None:
    good = [("a", T1, 1), ("b", T2, 3), ("c", ps(w=[2.0, -1.0], b=[0.5]), 2)]
    expected = fuse(build_fusion_rule(name), ZERO, good)

    rule: Any = build_fusion_rule(name)
    rule.begin(1, ZERO)
    rule.add(*good[0])
    before = rule.buffer.clone() if getattr(rule, "buffer", None) is not None else None
    params, n = BAD[kind]()
    with pytest.raises(BadUpdateError) as caught:
        rule.add("evil", params, n)
    assert caught.value.child == "evil" and "'evil'" in str(caught.value)
    if before is not None:
        assert torch.equal(rule.buffer, before)  # accumulator unchanged
    for update in good[1:]:
        rule.add(*update)
    assert_same(rule.result(), expected, exact=True)
    assert rule.participants == ["a", "b", "c"]
    assert "evil" in rule.rejected


@pytest.mark.parametrize("position", ["first", "later"])
@pytest.mark.parametrize("name", ["weighted_sum", "fedadam"])
def test_a_bad_value_found_mid_fold_is_taken_back_out(name: str, position: str) -> None:
    # Rules that check values as they fold (checks_values) have folded a reply's first tensors
    # by the time they meet a NaN in a later one: those must come back out.
    gen = torch.Generator().manual_seed(0)
    current = {"a": torch.zeros(7), "b": torch.zeros(2, 5), "c": torch.zeros(3)}

    def draw() -> Parameters:
        return {k: torch.randn(v.shape, generator=gen) for k, v in current.items()}

    good = [("x", draw(), 2), ("y", draw(), 5)]
    evil = draw()
    evil["b"][1, 3] = math.nan  # "a" is folded before "b" is seen
    evil["c"][0] = math.inf
    expected = fuse(build_fusion_rule(name), current, good)

    rule: Any = build_fusion_rule(name)
    assert rule.checks_values
    rule.begin(1, current)
    if position == "later":
        rule.add(*good[0])
    with pytest.raises(BadUpdateError, match=r"'b' has 1 NaN/Inf value.*'c' has 1 NaN/Inf"):
        rule.add("evil", evil, 3)
    for update in good[1:] if position == "later" else good:
        rule.add(*update)
    # A first reply only overwrote stale sums; a later one is subtracted back (float rounding).
    assert_same(rule.result(), expected, exact=position == "first")
    assert rule.participants == ["x", "y"] and "evil" in rule.rejected


def test_values_no_training_produces_are_refused_and_the_honest_reply_kept() -> None:
    # Finite, but their weighted sums overflow float32: a child sending 1e37s used to turn the
    # fused encoder into Infs, which failed the whole job.
    big = {"w": torch.full((4,), 1e37), "b": torch.ones(1)}
    honest = {"w": torch.full((4,), 2.0), "b": torch.ones(1)}
    rule = build_fusion_rule("weighted_sum")
    rule.begin(1, {"w": torch.zeros(4), "b": torch.zeros(1)})
    rule.add("honest", honest, 300)
    with pytest.raises(BadUpdateError, match=r"'w' has 4 NaN/Inf value\(s\) \(or beyond"):
        rule.add("hostile", big, 300)
    assert torch.equal(rule.result()["w"], honest["w"])


def test_second_reply_from_same_child_is_rejected() -> None:
    rule = build_fusion_rule("weighted_sum")
    rule.begin(1, ZERO)
    rule.add("a", T1, 1)
    with pytest.raises(BadUpdateError, match="second update"):
        rule.add("a", T2, 3)
    assert_same(rule.result(), T1, exact=True)


@pytest.mark.parametrize("name", BUILTIN)
def test_rules_never_modify_current_or_updates(name: str) -> None:
    current = ps(w=[0.5, -0.5], b=[1.0])
    ups = [(f"c{i}", ps(w=[float(i), 2.0 - i], b=[float(i) / 2]), i + 1) for i in range(4)]
    snapshot = [{k: v.clone() for k, v in p.items()} for _, p, _ in ups]
    current_copy = {k: v.clone() for k, v in current.items()}
    out = fuse(build_fusion_rule(name), current, ups)
    assert_same(current, current_copy, exact=True)
    for (_, p, _), copy in zip(ups, snapshot, strict=True):
        assert_same(p, copy, exact=True)
    for key in out:  # fresh tensors
        assert out[key].data_ptr() not in {p[key].data_ptr() for _, p, _ in ups}
        assert out[key].data_ptr() != current[key].data_ptr()


# -- round life cycle ---------------------------------------------------------------------------


def test_round_life_cycle() -> None:
    rule = build_fusion_rule("weighted_sum")
    with pytest.raises(RuntimeError, match="begin"):
        rule.add("a", T1, 1)
    rule.begin(1, ZERO)
    with pytest.raises(BadUpdateError):
        rule.add("bad", {"w": torch.ones(2)}, 1)
    with pytest.raises(EmptyRoundError, match="bad"):
        rule.result()
    rule.add("a", T1, 1)
    out = rule.result()
    assert rule.result() is out  # cached: a server optimizer never steps twice
    with pytest.raises(RuntimeError, match="closed"):
        rule.add("b", T2, 1)
    rule.begin(2, out)
    assert rule.participants == [] and rule.rejected == {} and rule.round == 2


def test_a_batch_rule_whose_begin_forgets_super_still_sees_only_this_rounds_updates() -> None:
    from fedenc.federation.fusion import BatchFusionRule

    class Counting(BatchFusionRule):
        def _begin(self, current: Parameters) -> None:  # no super()._begin(current)
            self.seen = 0

        def _fuse(self) -> Parameters:
            updates = self._sorted_updates()
            self.seen = len(updates)
            return dict(updates[0][1])

    rule = Counting()
    for round in (1, 2):
        rule.begin(round, ZERO)
        rule.add("a", T1, 1)
        rule.add("b", T2, 1)
        rule.result()
        assert rule.seen == 2, f"round {round} fused {rule.seen} updates"


def test_concurrent_adds() -> None:
    ups = [(f"c{i}", ps(w=[float(i), 1.0], b=[2.0 * i]), i + 1) for i in range(8)]
    rule = build_fusion_rule("weighted_sum", accumulator_dtype="float64")
    rule.begin(1, ZERO)
    threads = [threading.Thread(target=rule.add, args=u) for u in ups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(rule.participants) == [c for c, _, _ in ups]
    assert_same(rule.result(), batch_reference("weighted_sum", ZERO, ups))


# -- robust batch rules -------------------------------------------------------------------------


def one_d(*values: float) -> list[tuple[str, Parameters, int]]:
    return [(f"c{i}", ps(x=[v]), 1) for i, v in enumerate(values)]


X0 = ps(x=[0.0])


def test_median_literal() -> None:
    assert fuse(build_fusion_rule("median"), X0, one_d(1.0, 10.0, 3.0))["x"].item() == 3.0
    assert fuse(build_fusion_rule("median"), X0, one_d(1.0, 20.0, 2.0, 10.0))["x"].item() == 6.0
    two_d = [
        ("a", ps(w=[1.0, 9.0], b=[0.0]), 1),
        ("b", ps(w=[5.0, 2.0], b=[4.0]), 9),
        ("c", ps(w=[3.0, 4.0], b=[100.0]), 1),
    ]
    assert_same(fuse(build_fusion_rule("median"), ZERO, two_d), ps(w=[3.0, 4.0], b=[4.0]))


def test_trimmed_mean_literal() -> None:
    ups = one_d(100.0, 1.0, 2.0, 3.0, -50.0)
    assert fuse(build_fusion_rule("trimmed_mean", beta=0.2), X0, ups)["x"].item() == 2.0
    assert fuse(build_fusion_rule("trimmed_mean", beta=0.0), X0, ups)["x"].item() == pytest.approx(
        11.2
    )
    # ⌊0.1·5⌋ = 0: nothing trimmed
    assert fuse(build_fusion_rule("trimmed_mean", beta=0.1), X0, ups)["x"].item() == pytest.approx(
        11.2
    )
    ups6 = one_d(1.0, 2.0, 3.0, 4.0, 5.0, 600.0)
    assert fuse(build_fusion_rule("trimmed_mean", beta=0.4), X0, ups6)["x"].item() == 3.5


def test_krum_scores_literal() -> None:
    # 1-D points 0, 1, 3, 10; f = 0 → K − f − 2 = 2 nearest
    # d²: a-b 1, a-c 9, a-d 100, b-c 4, b-d 81, c-d 49
    scores = krum_scores([ps(x=[v]) for v in (0.0, 1.0, 3.0, 10.0)], num_malicious=0)
    assert scores == [10.0, 5.0, 13.0, 130.0]
    with pytest.raises(ValueError, match="num_malicious=2"):
        krum_scores([ps(x=[v]) for v in (0.0, 1.0, 3.0, 10.0)], num_malicious=2)


def test_krum_and_multi_krum_literal() -> None:
    ups = [
        ("a", ps(x=[0.0]), 1),
        ("b", ps(x=[1.0]), 3),
        ("c", ps(x=[3.0]), 1),
        ("d", ps(x=[10.0]), 1),
    ]
    krum: Any = build_fusion_rule("krum")
    assert fuse(krum, X0, ups)["x"].item() == 1.0
    assert krum.selected == ["b"]
    multi: Any = build_fusion_rule("multi_krum", num_selected=2)
    assert fuse(multi, X0, ups)["x"].item() == 0.75  # (1·0 + 3·1) / 4
    assert sorted(multi.selected) == ["a", "b"]
    uniform = build_fusion_rule("multi_krum", num_selected=2, weighted=False)
    assert fuse(uniform, X0, ups)["x"].item() == 0.5
    with pytest.raises(ValueError, match="num_selected=5"):
        fuse(build_fusion_rule("multi_krum", num_selected=5), X0, ups)
    with pytest.raises(ValueError, match="num_malicious=2"):
        fuse(build_fusion_rule("krum", num_malicious=2), X0, ups)
    assert build_fusion_rule("multi_krum", num_malicious=2, num_selected=6).min_updates == 6


def test_krum_picks_an_honest_update_among_byzantine_outliers() -> None:
    gen = torch.Generator().manual_seed(1)
    honest = [(f"h{i}", {"w": 0.01 * torch.randn(6, generator=gen) + 1.0}, 10) for i in range(5)]
    byzantine = [
        ("z0", {"w": torch.full((6,), 100.0)}, 1000),
        ("z1", {"w": torch.full((6,), -80.0)}, 1000),
    ]
    current = {"w": torch.ones(6)}
    krum: Any = build_fusion_rule("krum", num_malicious=2)
    out = fuse(krum, current, byzantine[:1] + honest + byzantine[1:])
    assert krum.selected[0].startswith("h")
    assert_same(out, {c: p for c, p, _ in honest}[krum.selected[0]], exact=True)
    multi: Any = build_fusion_rule("multi_krum", num_malicious=2)  # m = K − f = 5
    out = fuse(multi, current, honest + byzantine)
    assert sorted(multi.selected) == [c for c, _, _ in honest]
    assert float((out["w"] - 1.0).abs().max()) < 0.05
    # the weighted sum is dragged far away by the same outliers
    fedavg = fuse(build_fusion_rule("weighted_sum"), current, honest + byzantine)
    assert float((fedavg["w"] - 1.0).abs().max()) > 5


# -- clipped mean -------------------------------------------------------------------------------


def test_clipped_mean_literal() -> None:
    current = ps(w=[1.0, 1.0])
    a = ps(w=[4.0, 5.0])  # δ = (3, 4), ‖δ‖ = 5 → clipped to 2: (1.2, 1.6)
    b = ps(w=[1.6, 1.8])  # δ = (0.6, 0.8), ‖δ‖ = 1 → kept
    rule: Any = build_fusion_rule("clipped_mean", clip_norm=2.0)
    assert_same(
        fuse(rule, current, [("a", a, 1), ("b", b, 3)]), ps(w=[1.75, 2.0])
    )  # 1 + (1.2+1.8)/4
    assert rule.scales == {"a": pytest.approx(0.4), "b": 1.0}
    uniform = build_fusion_rule("clipped_mean", clip_norm=2.0, weighted=False)
    assert_same(fuse(uniform, current, [("a", a, 1), ("b", b, 3)]), ps(w=[1.9, 2.2]))


def test_clipped_mean_without_clipping_is_the_weighted_sum() -> None:
    ups = [("a", T1, 1), ("b", T2, 3)]
    clipped = fuse(build_fusion_rule("clipped_mean", clip_norm=1e6), ZERO, ups)
    assert_same(clipped, fuse(build_fusion_rule("weighted_sum"), ZERO, ups), exact=True)


# -- server optimizers, hand-checked for two rounds ------------------------------------------------


def two_rounds(name: str, **options: Any) -> tuple[float, float, FusionRule]:
    """x0 = 1; round 1: replies 0 (n=1) and 4 (n=3) → mean 3, Δ1 = 2; round 2: one reply x1 − 0.5,
    Δ2 = −0.5. float64 so the hand values hold to 1e-12."""
    rule = build_fusion_rule(name, **options)
    x0 = ps(torch.float64, x=[1.0])
    first = [("a", ps(torch.float64, x=[0.0]), 1), ("b", ps(torch.float64, x=[4.0]), 3)]
    x1 = fuse(rule, x0, first)
    x2 = fuse(rule, x1, [("a", {"x": x1["x"] - 0.5}, 5)], round=2)
    return x1["x"].item(), x2["x"].item(), rule


def test_fedavgm_two_rounds() -> None:
    x1, x2, _ = two_rounds("fedavgm", server_lr=0.5, momentum=0.5)
    assert x1 == pytest.approx(2.0, abs=1e-12)  # m1 = 2, x1 = 1 + 0.5·2
    assert x2 == pytest.approx(2.25, abs=1e-12)  # m2 = 0.5·2 − 0.5 = 0.5, x2 = 2 + 0.5·0.5


def test_fedavgm_with_lr_1_and_no_momentum_is_fedavg() -> None:
    x1, x2, _ = two_rounds("fedavgm", server_lr=1.0, momentum=0.0)
    assert x1 == pytest.approx(3.0, abs=1e-12)
    assert x2 == pytest.approx(2.5, abs=1e-12)


def test_fedadam_two_rounds() -> None:
    x1, x2, rule = two_rounds("fedadam", server_lr=0.1, beta1=0.5, beta2=0.5, tau=0.5)
    # v0 = τ² = 0.25; m1 = 0.5·2 = 1; v1 = 0.5·0.25 + 0.5·4 = 2.125
    e1 = 1.0 + 0.1 * 1.0 / (math.sqrt(2.125) + 0.5)
    # m2 = 0.5·1 + 0.5·(−0.5) = 0.25; v2 = 0.5·2.125 + 0.5·0.25 = 1.1875
    e2 = e1 + 0.1 * 0.25 / (math.sqrt(1.1875) + 0.5)
    assert x1 == pytest.approx(e1, abs=1e-12)
    assert x2 == pytest.approx(e2, abs=1e-12)
    state: Any = rule
    assert state.moments["m"]["x"].item() == pytest.approx(0.25)
    assert state.moments["v"]["x"].item() == pytest.approx(1.1875)
    assert state.steps == 2


def test_fedadam_with_bias_correction() -> None:
    x1, _, _ = two_rounds(
        "fedadam", server_lr=0.1, beta1=0.5, beta2=0.5, tau=0.5, bias_correction=True
    )
    lr1 = 0.1 * math.sqrt(1 - 0.5) / (1 - 0.5)
    assert x1 == pytest.approx(1.0 + lr1 * 1.0 / (math.sqrt(2.125) + 0.5), abs=1e-12)


def test_fedyogi_two_rounds() -> None:
    x1, x2, rule = two_rounds("fedyogi", server_lr=0.1, beta1=0.5, beta2=0.5, tau=0.5)
    # v1 = 0.25 − 0.5·4·sign(0.25 − 4) = 2.25; m1 = 1 → x1 = 1 + 0.1/(1.5 + 0.5) = 1.05
    assert x1 == pytest.approx(1.05, abs=1e-12)
    # v2 = 2.25 − 0.5·0.25·sign(2.25 − 0.25) = 2.125 (Adam: 1.1875); m2 = 0.25
    assert x2 == pytest.approx(1.05 + 0.1 * 0.25 / (math.sqrt(2.125) + 0.5), abs=1e-12)
    state: Any = rule
    assert state.moments["v"]["x"].item() == pytest.approx(2.125)


def test_server_optimizers_pass_integer_tensors_through_the_weighted_mean() -> None:
    current = {"x": torch.zeros(1), "n": torch.tensor([0])}
    ups = [
        ("a", {"x": torch.ones(1), "n": torch.tensor([4])}, 1),
        ("b", {"x": torch.ones(1), "n": torch.tensor([8])}, 3),
    ]
    for name in ("fedavgm", "fedadam", "fedyogi"):
        out = fuse(build_fusion_rule(name), current, ups)
        assert out["n"].dtype == torch.long and out["n"].tolist() == [7]
        assert out["x"].dtype == torch.float32


# -- checkpointing ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTIN)
def test_state_dict_round_trip(name: str) -> None:
    ups1 = [("a", T1, 1), ("b", T2, 3), ("c", ps(w=[0.0, 1.0], b=[2.0]), 2)]
    ups2 = [("a", T2, 2), ("b", ps(w=[1.0, 1.0], b=[1.0]), 1), ("c", T1, 1)]
    rule = build_fusion_rule(name)
    x1 = fuse(rule, ZERO, ups1)
    buffer = io.BytesIO()
    torch.save(rule.state_dict(), buffer)
    buffer.seek(0)
    resumed = build_fusion_rule(name)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.state_dict().keys() == rule.state_dict().keys()
    assert_same(fuse(resumed, x1, ups2, round=2), fuse(rule, x1, ups2, round=2), exact=True)


def test_state_dict_checks_rule_and_layout() -> None:
    adam = build_fusion_rule("fedadam")
    fuse(adam, ZERO, [("a", T1, 1)])
    with pytest.raises(ValueError, match="fedadam"):
        build_fusion_rule("fedyogi").load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="keeps no state"):
        build_fusion_rule("weighted_sum").load_state_dict({"rule": "weighted_sum", "m": {}})
    other = build_fusion_rule("fedadam")
    other.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="does not match the model"):
        other.begin(2, ps(w=[1.0, 2.0, 3.0], b=[0.0]))
    assert build_fusion_rule("median").state_dict() == {"rule": "median"}


# -- registry and plugins -----------------------------------------------------------------------


def test_available_rules() -> None:
    assert set(BUILTIN) <= set(available_fusion_rules())
    for name in BUILTIN:
        assert build_fusion_rule(name).name == name


def test_unknown_rule_lists_the_available_ones() -> None:
    with pytest.raises(UnknownFusionRuleError) as caught:
        build_fusion_rule("fedsgd")
    assert isinstance(caught.value, KeyError)
    assert "'fedsgd'" in str(caught.value) and "weighted_sum" in str(caught.value)
    with pytest.raises(UnknownFusionRuleError, match=r"'medain'; did you mean 'median'\?"):
        build_fusion_rule("medain")
    from fedenc.encoders import UnknownEncoderError, build_encoder

    with pytest.raises(UnknownEncoderError, match=r"'srgn'; did you mean 'srgnn'\?"):
        build_encoder("srgn", 5)


@pytest.mark.parametrize(
    ("name", "options", "option"),
    [
        ("trimmed_mean", {"beta": -0.1}, "beta"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("clipped_mean", {"clip_norm": 0}, "clip_norm"),
        ("clipped_mean", {"clip_norm": -1.0}, "clip_norm"),
        ("krum", {"num_malicious": -1}, "num_malicious"),
        ("multi_krum", {"num_selected": 0}, "num_selected"),
        ("fedavgm", {"momentum": 1.0}, "momentum"),
        ("fedavgm", {"server_lr": 0.0}, "server_lr"),
        ("fedadam", {"tau": 0.0}, "tau"),
        ("fedadam", {"beta1": 1.5}, "beta1"),
        ("fedyogi", {"beta2": -0.1}, "beta2"),
        ("weighted_sum", {"accumulator_dtype": "float16"}, "accumulator_dtype"),
        ("weighted_sum", {"clip_norm": 1.0}, "clip_norm"),
        ("median", {"beta": 0.1}, "beta"),
    ],
)
def test_bad_options_name_the_option(name: str, options: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        build_fusion_rule(name, **options)


class Midpoint(FusionRule):
    """A third-party rule: the midpoint of the current target and the first reply."""

    streaming = True

    def _begin(self, current: Parameters) -> None:
        self.first: Parameters | None = None

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        self.first = self.first or params

    def _fuse(self) -> Parameters:
        assert self.first is not None
        return {k: (v + self.first[k]) / 2 for k, v in self.current.items()}


class FakeEntryPoint:
    def __init__(self, name: str, obj: Callable[[], object]) -> None:
        self.name, self.value, self._obj = name, f"plugin:{name}", obj

    def load(self) -> object:
        return self._obj()


def _boom() -> object:
    raise ImportError("plugin module is broken")


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    registry_module._load()
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    monkeypatch.setattr(registry_module, "_ALIASES", dict(registry_module._ALIASES))
    monkeypatch.setattr(registry_module, "_loaded_entry_points", False)


@pytest.mark.usefixtures("isolated_registry")
def test_entry_point_plugins(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plugins = [
        FakeEntryPoint("midpoint", lambda: Midpoint),
        FakeEntryPoint("broken", _boom),
        FakeEntryPoint("median", lambda: Midpoint),  # may not shadow a built-in
    ]

    def fake_entry_points(group: str) -> list[FakeEntryPoint]:
        assert group == "fedenc.fusion"
        return plugins

    monkeypatch.setattr("fedenc.plugins.entry_points", fake_entry_points)
    with caplog.at_level(logging.WARNING, logger="fedenc.plugins"):
        names = available_fusion_rules()
    assert "midpoint" in names and "broken" not in names
    assert "broken" in caplog.text and "shadows" in caplog.text
    out = fuse(build_fusion_rule("midpoint"), ZERO, [("a", T1, 1)])
    assert_same(out, ps(w=[0.5, 1.0], b=[2.0]))
    assert build_fusion_rule("median").name == "median"
    assert type(build_fusion_rule("median")) is not Midpoint


@pytest.mark.usefixtures("isolated_registry")
def test_register_a_class_directly() -> None:
    register_fusion_rule("midpoint2")(Midpoint)
    assert "midpoint2" in available_fusion_rules()
    assert isinstance(build_fusion_rule("midpoint2"), Midpoint)
    with pytest.raises(ValueError, match="already registered"):
        register_fusion_rule("weighted_sum")(Midpoint)
    with pytest.raises(TypeError, match="FusionRule subclass"):
        register_fusion_rule("nope")(int)  # type: ignore[type-var]


def test_all_builtin_names_are_unique() -> None:
    assert sorted(build_fusion_rule(n).name for n in BUILTIN) == BUILTIN


# -- row-weighted fusion of an item table ---------------------------------------------------------


def _table(*rows: list[float]) -> dict[str, torch.Tensor]:
    return {"emb": torch.tensor(rows, dtype=torch.float32), "w": torch.zeros(2)}


def test_row_weighted_sum_fuses_each_row_by_the_samples_that_touched_it() -> None:
    current = _table([0.0, 0.0], [0.0, 0.0], [9.0, 9.0])
    rule = WeightedSum()
    rule.begin(1, current, row_weighted=["emb"])
    a = {"emb": torch.tensor([[1.0, 1.0], [4.0, 4.0], [7.0, 7.0]]), "w": torch.full((2,), 1.0)}
    b = {"emb": torch.tensor([[3.0, 3.0], [8.0, 8.0], [5.0, 5.0]]), "w": torch.full((2,), 4.0)}
    rule.add("a", a, 10, {"emb": torch.tensor([1.0, 0.0, 0.0])})  # a touched row 0 once
    rule.add("b", b, 30, {"emb": torch.tensor([3.0, 2.0, 0.0])})
    out = rule.result()
    # row 0: (1*1 + 3*3) / 4; row 1: only b touched it; row 2: nobody, the target's row stays
    assert_close(out["emb"], torch.tensor([[2.5, 2.5], [8.0, 8.0], [9.0, 9.0]]))
    # the dense tensor keeps w_i = n_i / Σ n
    assert_close(out["w"], torch.full((2,), (10 * 1.0 + 30 * 4.0) / 40))


def test_a_child_without_row_weights_counts_its_samples_for_every_row() -> None:
    current = _table([0.0], [0.0])
    rule = WeightedSum()
    rule.begin(1, current, row_weighted=["emb"])
    rule.add("a", {"emb": torch.tensor([[2.0], [2.0]]), "w": torch.zeros(2)}, 2)
    rule.add(
        "b",
        {"emb": torch.tensor([[6.0], [6.0]]), "w": torch.zeros(2)},
        1,
        {"emb": torch.tensor([2.0, 0.0])},
    )
    out = rule.result()
    assert_close(out["emb"], torch.tensor([[4.0], [2.0]]))  # (2*2 + 2*6)/4 and (2*2)/2


def test_without_row_weighted_names_row_weights_change_nothing() -> None:
    current = _table([0.0], [0.0])
    plain, weighted = WeightedSum(), WeightedSum()
    plain.begin(1, current)
    weighted.begin(1, current)
    update = {"emb": torch.tensor([[2.0], [4.0]]), "w": torch.ones(2)}
    plain.add("a", update, 3)
    with pytest.raises(BadUpdateError, match="not row-weighted"):
        weighted.add("a", update, 3, {"emb": torch.tensor([1.0, 0.0])})
    weighted.add("a", update, 3)
    for name in current:
        assert torch.equal(plain.result()[name], weighted.result()[name])


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        (torch.tensor([1.0]), "vector of 2"),
        (torch.tensor([1.0, float("nan")]), "finite and >= 0"),
        (torch.tensor([1.0, -1.0]), "finite and >= 0"),
        (torch.ones(2, 2), "vector of 2"),
    ],
)
def test_bad_row_weights_are_rejected_and_leave_the_round_untouched(
    weights: torch.Tensor, reason: str
) -> None:
    current = _table([0.0], [0.0])
    rule = WeightedSum()
    rule.begin(1, current, row_weighted=["emb"])
    rule.add("good", {"emb": torch.tensor([[2.0], [2.0]]), "w": torch.ones(2)}, 1)
    with pytest.raises(BadUpdateError, match=reason):
        rule.add(
            "bad", {"emb": torch.tensor([[9.0], [9.0]]), "w": torch.ones(2)}, 1, {"emb": weights}
        )
    assert rule.participants == ["good"]
    assert_close(rule.result()["emb"], torch.tensor([[2.0], [2.0]]))


def test_begin_refuses_unknown_row_weighted_names() -> None:
    with pytest.raises(ValueError, match="not in the target"):
        WeightedSum().begin(1, _table([0.0]), row_weighted=["nope"])


class _Broken(FusionRule):
    """A rule whose bug shows in its output: NaN, a wrong shape or a lost tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        pass

    def _fuse(self) -> Parameters:
        out = {k: v.clone() for k, v in self.current.items()}
        if self.how == "nan":
            out["w"][0] = float("nan")
        elif self.how == "shape":
            out["w"] = torch.zeros(3)
        else:
            del out["w"]
        return out


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("nan", "'w' has 1 NaN/Inf value(s)"),
        ("shape", "'w' has shape (3,), expected (2,)"),
        ("missing", "missing tensor(s) 'w'"),
    ],
)
def test_a_rule_whose_output_cannot_be_the_target_is_named(how: str, reason: str) -> None:
    rule = _Broken(how)
    current = {"emb": torch.zeros(2, 2), "w": torch.zeros(2)}
    rule.begin(4, current)
    rule.add("a", {k: v + 1 for k, v in current.items()}, 10)
    with pytest.raises(FusionOutputError) as err:
        rule.result()
    message = str(err.value)
    assert message.startswith("fusion rule '_Broken' returned a bad target in round 4: ")
    assert reason in message


class _Raising(FusionRule):
    """A rule whose own code raises, where ``where`` says."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def _add(self, child: str, params: Parameters, num_samples: int) -> None:
        if self.where == "add":
            raise KeyError("scratch")

    def _fuse(self) -> Parameters:
        raise ZeroDivisionError("division by zero")


@pytest.mark.parametrize(
    ("where", "cause"), [("add", "KeyError: 'scratch'"), ("fuse", "ZeroDivisionError: division")]
)
def test_a_rule_that_raises_is_named_with_its_round(where: str, cause: str) -> None:
    # A plugin's bug was a raw traceback; it is now a FusionOutputError (the CLI's "nothing of
    # that round is kept" path) naming the rule, the round and the cause.
    from fedenc.federation.fusion import FusionRuleFailed

    rule = _Raising(where)
    current = {"w": torch.zeros(2)}
    rule.begin(3, current)
    with pytest.raises(FusionRuleFailed) as err:
        rule.add("a", {"w": torch.ones(2)}, 10)
        rule.result()
    assert isinstance(err.value, FusionOutputError)
    assert str(err.value).startswith("fusion rule '_Raising' failed in round 3: " + cause)


def _three_children(rule: FusionRule) -> FusionRule:
    current = {"w": torch.zeros(4)}
    rule.begin(1, current)
    for child, value, n in (("a", 1.0, 10), ("b", 2.0, 30), ("c", 50.0, 60)):
        rule.add(child, {"w": torch.full((4,), value)}, n)
    rule.result()
    return rule


@pytest.mark.parametrize(
    ("name", "options", "weights"),
    [
        ("weighted_sum", {}, {"a": 0.1, "b": 0.3, "c": 0.6}),
        ("mean", {}, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}),
        ("median", {}, None),
        ("trimmed_mean", {"beta": 0.34}, None),
        ("multi_krum", {"num_selected": 2}, {"a": 0.25, "b": 0.75, "c": 0.0}),
        ("fedadam", {}, {"a": 0.1, "b": 0.3, "c": 0.6}),
    ],
)
def test_each_rule_reports_the_weights_it_gave_the_children(
    name: str, options: dict[str, Any], weights: dict[str, float] | None
) -> None:
    # The round report's weights were n_i / Σ n whatever the rule: wrong for median, Krum, ...
    rule = _three_children(build_fusion_rule(name, **options))
    got = rule.child_weights()
    if weights is None:
        assert got is None
    else:
        assert got == pytest.approx(weights)


def test_krum_and_clipped_mean_report_what_they_decided() -> None:
    krum = _three_children(build_fusion_rule("multi_krum", num_selected=2))
    assert krum.details() == {"selected": ["a", "b"]}  # c, the outlier, is left out
    clipped = _three_children(build_fusion_rule("clipped_mean", clip_norm=4.0))
    scales = clipped.details()["clip_scales"]
    assert scales["a"] == 1.0 and scales["c"] == pytest.approx(4.0 / 100.0)
    weights = clipped.child_weights()
    assert weights is not None and weights["c"] == pytest.approx(0.6 * 0.04)
