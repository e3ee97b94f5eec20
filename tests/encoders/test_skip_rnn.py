"""Skip RNN (US20210406641A1): node-graph unit, start/end regions, executors and the encoder."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from torch import Tensor, nn

from fedenc.data.batching import batch_from_sessions
from fedenc.encoders.base import EncoderConfig
from fedenc.encoders.layers import Node, NodeGraphUnit, SkipGRU, SkipRule
from fedenc.encoders.registry import available_encoders, build_encoder
from fedenc.encoders.skip_rnn import SkipRNN

H = 6


def items_of(rows: list[list[int]]) -> Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def big_items(items: Tensor, prev: Tensor, step: int) -> Tensor:
    return items >= 20


def make_unit(side: int = 0, **kw: object) -> SkipGRU:
    torch.manual_seed(0)
    return SkipGRU(4, H, side_features=side, **kw)  # type: ignore[arg-type]


def random_inputs(bsz: int, length: int, side: int) -> tuple[Tensor, Tensor, Tensor | None]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, length + 1, (bsz,), generator=g)
    lengths[0] = length
    items = torch.randint(1, 25, (bsz, length), generator=g)
    repeat = torch.rand(bsz, length, generator=g) < 0.3
    for t in range(1, length):  # sprinkle repeated clicks
        items[:, t] = torch.where(repeat[:, t], items[:, t - 1], items[:, t])
    items = items * (torch.arange(length)[None, :] < lengths[:, None])
    x = torch.randn(bsz, length, 4, generator=g)
    p = torch.randn(bsz, length, side, generator=g) if side else None
    return items, x, p


# -- literal executor == vectorised path ------------------------------------------------------
@pytest.mark.parametrize(
    ("side", "skip", "skip_output"),
    [
        (0, ["padding", "repeat"], ["padding"]),
        (3, ["padding", "repeat"], ["padding"]),
        (3, ["padding", big_items], ["repeat"]),
        (2, [], []),  # nothing skipped: the fused cell on the whole batch every step
    ],
)
def test_literal_matches_vectorised_outputs_and_grads(
    side: int, skip: list[object], skip_output: list[object]
) -> None:
    unit = make_unit(side, skip=skip, skip_output=skip_output)
    items, x, p = random_inputs(5, 7, side)
    results, grads = [], []
    for executor in ("literal", "vectorised"):
        xs = x.clone().requires_grad_(True)
        ps = None if p is None else p.clone().requires_grad_(True)
        out = unit(xs, items, ps, executor=executor)
        loss = (out.outputs.sin().sum() + out.hiddens.pow(2).sum() + out.hidden.sum()) * 0.5
        inputs = [xs] + ([] if ps is None else [ps])
        grads.append(torch.autograd.grad(loss, [*unit.parameters(), *inputs]))
        results.append(out)
    lit, vec = results
    for a, b in zip(lit[:4], vec[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(*grads, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)
    assert lit.op_counts is not None and vec.op_counts is None


def test_literal_op_counts_match_the_active_masks() -> None:
    unit = make_unit(3)
    items, x, p = random_inputs(5, 7, 3)
    out = unit(x, items, p, executor="literal")
    keep_cell, keep_out = unit.active(items)
    assert out.op_counts is not None
    expected = {n: int(keep_cell.sum()) for n in SkipGRU.CELL_NODES}
    expected |= {n: int(keep_out.sum()) for n in SkipGRU.OUTPUT_NODES}
    assert dict(out.op_counts) == expected
    assert int(keep_cell.sum()) < items.numel()  # the example really skips something


# -- conditions ---------------------------------------------------------------------------------
@pytest.mark.parametrize("executor", ["literal", "vectorised"])
def test_right_padding_does_not_change_the_final_state(executor: str) -> None:
    unit = make_unit(2)
    g = torch.Generator().manual_seed(3)
    x, p = torch.randn(1, 5, 4, generator=g), torch.randn(1, 5, 2, generator=g)
    short = unit(x[:, :3], items_of([[4, 8, 2]]), p[:, :3], executor=executor)
    padded = unit(x, items_of([[4, 8, 2, 0, 0]]), p, executor=executor)
    assert torch.equal(short.hidden, padded.hidden)
    assert torch.equal(short.output, padded.output)
    # Control: without the padding condition the padding steps do change the state.
    plain = make_unit(2, skip=[], skip_output=[])
    assert not torch.allclose(
        plain(x[:, :3], items_of([[4, 8, 2]]), p[:, :3], executor=executor).hidden,
        plain(x, items_of([[4, 8, 2, 0, 0]]), p, executor=executor).hidden,
    )


@pytest.mark.parametrize("executor", ["literal", "vectorised"])
def test_repeated_click_keeps_the_hidden_state_only_when_repeat_skipping_is_on(
    executor: str,
) -> None:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    items = items_of([[3, 3, 9], [7, 7, 7]])
    on = make_unit(skip=["padding", "repeat"])(x, items, executor=executor)
    assert torch.equal(on.hiddens[:, 1], on.hiddens[:, 0])
    assert torch.equal(on.hiddens[1, 2], on.hiddens[1, 0])
    assert not torch.equal(on.hiddens[0, 2], on.hiddens[0, 1])  # a new item updates
    off = make_unit(skip=["padding"])(x, items, executor=executor)
    assert not torch.allclose(off.hiddens[:, 1], off.hiddens[:, 0])
    torch.testing.assert_close(off.hiddens[:, 0], on.hiddens[:, 0])


@pytest.mark.parametrize("executor", ["literal", "vectorised"])
def test_user_predicate_skips_the_steps_it_marks(executor: str) -> None:
    unit = make_unit(skip=["padding", big_items], skip_output=["padding", big_items])
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 5, 4, generator=g)
    items = items_of([[3, 21, 5, 30, 6]])  # 21 and 30 are skipped by the predicate
    out = unit(x, items, executor=executor)
    kept = unit(x[:, [0, 2, 4]], items_of([[3, 5, 6]]), executor=executor)
    torch.testing.assert_close(out.hidden, kept.hidden, rtol=0, atol=1e-6)
    assert torch.equal(out.outputs[:, 1], out.outputs[:, 0])
    assert torch.equal(out.hiddens[:, 3], out.hiddens[:, 2])
    assert not torch.equal(out.hiddens[:, 2], out.hiddens[:, 1])


def test_predicate_receives_the_step_and_previous_items() -> None:
    seen: list[tuple[list[int], list[int], int]] = []

    def odd_steps(items: Tensor, prev: Tensor, step: int) -> Tensor:
        seen.append((items.tolist(), prev.tolist(), step))
        return torch.full_like(items, step % 2 == 1, dtype=torch.bool)

    rule = SkipRule(odd_steps)
    keep = rule.keep_matrix(items_of([[1, 2, 3], [4, 5, 0]]))
    assert keep.tolist() == [[True, False, True], [True, False, True]]
    assert seen == [([1, 4], [0, 0], 0), ([2, 5], [1, 4], 1), ([3, 0], [2, 5], 2)]


def test_bad_conditions_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown skip condition"):
        SkipRule(["padding", "typo"])
    bad = SkipRule(lambda items, prev, step: items)  # not a bool mask
    with pytest.raises(ValueError, match="bool tensor"):
        bad.keep_matrix(items_of([[1, 2]]))


# -- start/end nodes and tags --------------------------------------------------------------
def test_tagged_nodes_are_not_executed_in_a_hand_built_graph() -> None:
    """Two independent regions; each start node tags only its own nodes."""
    calls: list[tuple[str, int]] = []

    def op(name: str, fn: object) -> Node:
        def run(*args: Tensor) -> Tensor:
            calls.append((name, int(args[0].numel())))
            return fn(*args)  # type: ignore[operator,no-any-return]

        return Node(name, inputs=inputs[name], output=name + "_v", fn=run)

    inputs = {"a1": ("x", "h"), "a2": ("a1_v",), "b1": ("a2_v", "y")}
    nodes = [
        Node("sa", "start", region="A", rule=SkipRule(["padding", "repeat"])),
        op("a1", lambda x, h: x + h),
        op("a2", lambda v: 2 * v),
        Node("ea", "end", region="A", passthrough=(("a2_v", "h"),)),
        Node("sb", "start", region="B", rule=SkipRule("padding")),
        op("b1", lambda v, y: v + y),
        Node("eb", "end", region="B", passthrough=(("b1_v", "y"),)),
    ]
    graph = NodeGraphUnit(nodes, sources=("x", "h", "y"))
    assert graph.regions == {"A": ("a1", "a2"), "B": ("b1",)}
    items = items_of([[5, 5, 7, 0], [3, 4, 0, 0]])
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4, 1) + 1
    zero = torch.zeros(2, 1)
    steps, final = graph.run({"x": x}, {"h": zero, "y": zero}, {"h": "a2_v", "y": "b1_v"}, items)
    # Row 0: A runs at steps 0, 2 (step 1 repeats, 3 pads); B runs at 0, 1, 2.
    # Row 1: A runs at 0, 1; B runs at 0, 1.
    assert graph.op_counts == Counter({"a1": 4, "a2": 4, "b1": 5})
    assert graph.skipped_regions == Counter({"A": 4, "B": 3})
    row0 = ["a1", "a2", "b1", "b1", "a1", "a2", "b1"]
    row1 = ["a1", "a2", "b1", "a1", "a2", "b1"]
    assert [c[0] for c in calls] == row0 + row1
    # h: row 0 = 2*(1+0)=2, kept at step 1, 2*(3+2)=10 at step 2, kept at step 3.
    assert steps["h"][0, :, 0].tolist() == [2.0, 2.0, 10.0, 10.0]
    assert steps["y"][0, :, 0].tolist() == [2.0, 4.0, 14.0, 14.0]
    assert final["h"][1, 0].item() == 2 * (6 + 2 * 5)


def test_skip_gru_op_counts_on_a_hand_built_example() -> None:
    unit = make_unit(2)  # cell: padding + repeat, output: padding
    items = items_of([[5, 5, 7, 0], [3, 4, 0, 0]])
    x, p = torch.randn(2, 4, 4), torch.randn(2, 4, 2)
    out = unit(x, items, p, executor="literal")
    expected = Counter({n: 4 for n in SkipGRU.CELL_NODES})
    expected.update({n: 5 for n in SkipGRU.OUTPUT_NODES})
    assert out.op_counts == expected
    # The repeat click (row 0, step 1) tagged the cell only: y moved (new side features), h did not.
    assert torch.equal(out.hiddens[0, 1], out.hiddens[0, 0])
    assert not torch.allclose(out.outputs[0, 1], out.outputs[0, 0])


@pytest.mark.parametrize("executor", ["literal", "vectorised"])
def test_start_nodes_do_nothing_when_the_condition_holds(executor: str) -> None:
    """With every click satisfying the condition the unit is exactly a GRU."""
    unit = make_unit()
    gru = nn.GRU(4, H, batch_first=True)
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    gru.load_state_dict({f"{n}_l0": getattr(unit, n).detach() for n in names})
    x = torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(6))
    items = items_of([[1, 2, 3, 4], [5, 6, 5, 6], [9, 8, 7, 1]])  # no padding, no repeats
    out = unit(x, items, executor=executor)
    expected, _ = gru(x)
    torch.testing.assert_close(out.hiddens, expected, rtol=1e-5, atol=1e-6)
    cell = nn.GRUCell(4, H)
    cell.load_state_dict({k.replace("_l0", ""): v for k, v in gru.state_dict().items()})
    torch.testing.assert_close(out.hiddens[:, 0], cell(x[:, 0]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out.outputs, torch.tanh(out.hiddens @ unit.out_weight.t() + unit.out_bias)
    )


def test_graph_validation() -> None:
    fn = torch.neg
    with pytest.raises(ValueError, match="topological"):
        NodeGraphUnit([Node("a", inputs=("b_v",), output="a_v", fn=fn)], sources=("x",))
    with pytest.raises(ValueError, match="no end node"):
        NodeGraphUnit([Node("s", "start", region="R", rule=SkipRule("padding"))], sources=("x",))
    with pytest.raises(ValueError, match="inside"):
        NodeGraphUnit(
            [
                Node("s", "start", region="R", rule=SkipRule()),
                Node("t", "start", region="Q", rule=SkipRule()),
            ],
            sources=("x",),
        )


def test_reprs_are_stable() -> None:
    unit = SkipGRU(4, H, side_features=2, skip=["padding", big_items])
    assert repr(unit) == (
        "SkipGRU(4, 6, out=6, side=2, skip=['padding', 'big_items'], "
        "skip_output=['padding'], executor='vectorised')"
    )
    assert repr(unit.node_graph()) == (
        "NodeGraphUnit(cell skip=['padding', 'big_items']: input_proj, hidden_proj, reset_gate, "
        "update_gate, candidate, blend; output skip=['padding']: output_proj, output_act)"
    )


def test_deepcopy_runs_on_its_own_parameters() -> None:
    unit = make_unit()
    twin = copy.deepcopy(unit)
    with torch.no_grad():
        twin.weight_hh.add_(0.5)
    items, x, _ = random_inputs(2, 3, 0)
    a = unit(x, items, executor="literal").hidden
    b = twin(x, items, executor="literal").hidden
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, twin(x, items, executor="vectorised").hidden)


# -- encoder --------------------------------------------------------------------------------
def test_registry_builds_skip_rnn_by_name() -> None:
    assert "skip_rnn" in available_encoders()
    enc = build_encoder("skip_rnn", 30, hidden=8, skip=["padding"], executor="literal")
    assert isinstance(enc, SkipRNN) and enc.type_name == "skip_rnn"
    assert enc.rnn.cell_rule.names == ("padding",) and enc.rnn.executor == "literal"
    with pytest.raises(ValueError, match="encoder 'skip_rnn' has no option 'skp'"):
        build_encoder("skip_rnn", 30, hidden=8, skp=["padding"])
    with pytest.raises(ValueError, match="unknown skip_rnn options"):
        SkipRNN(EncoderConfig(num_items=30, hidden=8, extra={"skp": ["padding"]}))
    assert all(not n.startswith("embedding.") for n in enc.shared_parameter_names())
    assert enc.head_parameter_names() == ["embedding.weight"]


@pytest.mark.parametrize("use_positions", [True, False])
def test_encode_shapes_are_finite(use_positions: bool) -> None:
    torch.manual_seed(0)
    enc = build_encoder("skip_rnn", 40, hidden=8, use_positions=use_positions)
    batch = batch_from_sessions([[1, 2, 2, 3], [4], [5, 6, 7, 7, 7, 8]])
    session = enc.encode(batch)
    assert session.shape == (3, 8) and torch.isfinite(session).all()
    scores = enc(batch)
    assert scores.shape == (3, 40) and torch.isfinite(scores).all()
    assert isinstance(enc, SkipRNN)
    enc.rnn.executor = "literal"
    torch.testing.assert_close(enc.encode(batch), session, rtol=1e-5, atol=1e-5)


def test_encoder_is_padding_invariant() -> None:
    torch.manual_seed(0)
    enc = build_encoder("skip_rnn", 40, hidden=8).eval()
    alone = enc.encode(batch_from_sessions([[3, 9, 9, 4]]))
    padded = enc.encode(batch_from_sessions([[3, 9, 9, 4], [1, 2, 3, 4, 5, 6, 7]]))
    torch.testing.assert_close(padded[:1], alone, rtol=1e-5, atol=1e-6)


def test_gradients_reach_all_parameters() -> None:
    torch.manual_seed(0)
    enc = build_encoder("skip_rnn", 40, hidden=8, dropout=0.1)
    batch = batch_from_sessions([[1, 2, 2, 3], [4, 5], [6, 7, 8, 8, 9, 10]])
    loss = nn.functional.cross_entropy(enc(batch), torch.tensor([3, 5, 10]))
    torch.autograd.backward(loss)
    for name, param in enc.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
