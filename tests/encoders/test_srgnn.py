"""The ``srgnn`` encoder (reversed position embeddings, US20220114218A1), the registry and the
shared/head split of the encoder base class."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fedenc.data.batching import batch_from_sessions
from fedenc.encoders.base import EncoderConfig, SessionEncoder
from fedenc.encoders.registry import (
    UnknownEncoderError,
    available_encoders,
    build_encoder,
    encoder_class,
)
from fedenc.encoders.srgnn import SRGNN

HIDDEN = 8
NUM_ITEMS = 20
BUILTIN = ("edge_attn", "skip_rnn", "srgnn")
# Same transition graph {1->2, 2->1, 1->3, 3->1}, different click order.
SAME_GRAPH = [[1, 2, 1, 3, 1], [1, 3, 1, 2, 1]]


def make_srgnn(seed: int = 0, **options: object) -> SRGNN:
    torch.manual_seed(seed)
    model = build_encoder("srgnn", NUM_ITEMS, hidden=HIDDEN, **options)
    assert isinstance(model, SRGNN)
    return model.eval()


def test_same_graph_different_order_told_apart_only_with_positions() -> None:
    batch = batch_from_sessions(SAME_GRAPH)
    # The premise: identical graphs and nodes, different node positions.
    assert torch.equal(batch.nodes[0], batch.nodes[1])
    assert torch.equal(batch.adj_in[0], batch.adj_in[1])
    assert torch.equal(batch.adj_out[0], batch.adj_out[1])
    assert not torch.equal(batch.node_positions[0], batch.node_positions[1])

    with torch.no_grad():
        with_pos = make_srgnn(use_positions=True).encode(batch)
        without = make_srgnn(use_positions=False).encode(batch)
    assert (with_pos[0] - with_pos[1]).abs().max() > 1e-3
    torch.testing.assert_close(without[0], without[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 2])
def test_widths_concatenated_2d_with_positions_d_without(steps: int) -> None:
    batch = batch_from_sessions([[1, 2, 3], [4, 4]])
    model = make_srgnn(steps=steps)
    assert model.gnn.hidden == 2 * HIDDEN
    assert model.readout.in_features == 2 * HIDDEN
    assert model.readout.out_features == HIDDEN
    assert model.position is not None
    h = model.node_features(batch)
    assert h.shape == (2, batch.nodes.shape[1], 2 * HIDDEN)
    # item ⊕ position, in that order.
    torch.testing.assert_close(h[..., :HIDDEN], model.item_vectors(batch.nodes))
    torch.testing.assert_close(h[..., HIDDEN:], model.position(batch.node_positions))
    assert model.encode(batch).shape == (2, HIDDEN)

    plain = make_srgnn(steps=steps, use_positions=False)
    assert plain.position is None
    assert plain.gnn.hidden == HIDDEN and plain.readout.in_features == HIDDEN
    assert plain.node_features(batch).shape == (2, batch.nodes.shape[1], HIDDEN)
    assert plain.encode(batch).shape == (2, HIDDEN)


def test_long_sessions_share_the_last_position_embedding() -> None:
    model = make_srgnn(max_position=3)
    # 5 distinct clicks: positions 5, 4, 3, 2, 1 -> the first three share embedding row 3.
    batch = batch_from_sessions([[1, 2, 3, 4, 5]])
    pos = model.node_features(batch)[0, :, HIDDEN:]
    torch.testing.assert_close(pos[0], pos[2])
    torch.testing.assert_close(pos[1], pos[2])
    assert not torch.allclose(pos[2], pos[3])


def test_score_columns_are_items_one_to_n() -> None:
    model = make_srgnn()
    weights = model.embedding.weight[1:]
    picks = torch.tensor([1, 7, 20])
    with torch.no_grad():
        # A session vector pointing at item k scores item k highest, at exactly the scale.
        scores = model.score(model.embedding.weight[picks])
    assert scores.shape == (3, NUM_ITEMS)
    assert scores.argmax(1).tolist() == (picks - 1).tolist()
    torch.testing.assert_close(
        scores[torch.arange(3), picks - 1], torch.full((3,), model.config.scale)
    )
    session = torch.randn(4, HIDDEN)
    with torch.no_grad():
        want = F.normalize(session, dim=-1) @ F.normalize(weights, dim=-1).t() * 12.0
        torch.testing.assert_close(model.score(session), want)


def test_score_without_normalisation_is_a_plain_dot_product() -> None:
    model = make_srgnn(normalize=False)
    session = torch.randn(3, HIDDEN)
    with torch.no_grad():
        want = session @ model.embedding.weight[1:].t()
        torch.testing.assert_close(model.score(session), want)
        batch = batch_from_sessions([[1, 2], [3]])
        torch.testing.assert_close(
            model(batch), model.encode(batch) @ model.embedding.weight[1:].t()
        )


@pytest.mark.parametrize("use_positions", [True, False])
def test_gradients_reach_every_parameter(use_positions: bool) -> None:
    model = make_srgnn(use_positions=use_positions, steps=2).train()
    batch = batch_from_sessions([[1, 2, 1, 3], [4, 5], [6]])
    loss = F.cross_entropy(model(batch), torch.tensor([3, 5, 1]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # The padding rows of the embeddings are never trained.
    grad = model.embedding.weight.grad
    assert grad is not None and torch.all(grad[0] == 0)


@pytest.mark.parametrize("use_positions", [True, False])
def test_padding_invariance(use_positions: bool) -> None:
    model = make_srgnn(use_positions=use_positions, steps=2)
    short = [3, 1, 3]
    with torch.no_grad():
        alone = model.encode(batch_from_sessions([short]))
        padded = model.encode(batch_from_sessions([[9, 8, 7, 6, 5, 4, 9, 2], short, [11]]))
    torch.testing.assert_close(padded[1], alone[0], rtol=0, atol=1e-6)


def test_registry_builds_the_builtin_types() -> None:
    assert set(BUILTIN) <= set(available_encoders())
    assert available_encoders() == sorted(available_encoders())
    for name in BUILTIN:
        torch.manual_seed(0)
        model = build_encoder(name, NUM_ITEMS, hidden=4)
        assert isinstance(model, SessionEncoder)
        assert isinstance(model, encoder_class(name))
        assert model.type_name == name
        assert model.config.num_items == NUM_ITEMS and model.config.hidden == 4
        with torch.no_grad():
            scores = model.eval()(batch_from_sessions([[1, 2], [3]]))
        assert scores.shape == (2, NUM_ITEMS)


def test_unknown_encoder_lists_the_available_types() -> None:
    with pytest.raises(UnknownEncoderError) as info:
        encoder_class("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in BUILTIN:
        assert name in message
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownEncoderError, match="available"):
        build_encoder("nope", NUM_ITEMS)


@pytest.mark.parametrize("name", BUILTIN)
def test_shared_and_head_parameters_partition_the_model(name: str) -> None:
    torch.manual_seed(0)
    model = build_encoder(name, NUM_ITEMS, hidden=4)
    names = [n for n, _ in model.named_parameters()]
    shared, head = model.shared_parameter_names(), model.head_parameter_names()
    assert head == ["embedding.weight"]
    assert not set(shared) & set(head)
    assert sorted(shared + head) == sorted(names)
    # Both lists keep named_parameters' order (the federation's wire order).
    assert shared == [n for n in names if n in set(shared)]
    assert shared  # there is an encoder to share


def test_build_encoder_refuses_options_srgnn_does_not_read() -> None:
    # srgnn reads no extra options: a typo must not train the default silently.
    with pytest.raises(ValueError, match="encoder 'srgnn' has no option 'bar', 'foo'"):
        build_encoder("srgnn", NUM_ITEMS, hidden=4, steps=2, foo=1, extra={"bar": "x"})
    model = build_encoder("srgnn", NUM_ITEMS, hidden=4, steps=2)
    assert model.config.hidden == 4 and model.config.steps == 2 and model.config.extra == {}


def test_encoder_config_validates() -> None:
    with pytest.raises(ValueError, match="num_items"):
        EncoderConfig(num_items=0)
    with pytest.raises(ValueError, match="hidden"):
        EncoderConfig(num_items=5, hidden=0)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_reset_parameters_is_deterministic_under_manual_seed() -> None:
    model = make_srgnn()
    torch.manual_seed(3)
    model.reset_parameters()
    first = state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(3)
    model.reset_parameters()
    again = state(model)
    assert first.keys() == again.keys()
    for k in first:
        assert torch.equal(first[k], again[k]), k
    # Uniform in ±1/sqrt(d), SR-GNN's initialisation.
    bound = 1.0 / HIDDEN**0.5
    assert all(float(v.abs().max()) <= bound for v in first.values())
    torch.manual_seed(4)
    model.reset_parameters()
    assert not torch.equal(state(model)["embedding.weight"], first["embedding.weight"])
    # Building twice from the same seed gives the same encoder.
    a, b = state(make_srgnn(seed=5)), state(make_srgnn(seed=5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_packed_and_padded_propagation_give_the_same_loss_and_gradients() -> None:
    """A CPU packs the real nodes (``node_mask``); a GPU propagates the padded batch to avoid
    a host sync. Both must train the same model."""
    import dataclasses

    model = make_srgnn(seed=3).double()
    sessions = [[1, 2, 1, 3, 1], [4, 5], [6, 7, 8, 6, 9, 10, 11], [12]]
    batch = batch_from_sessions(sessions)
    batch = dataclasses.replace(
        batch,
        adj_in=batch.adj_in.double(),
        adj_out=batch.adj_out.double(),
        targets=torch.tensor([2, 6, 12, 1]),
    )
    results = []
    for variant in (batch, dataclasses.replace(batch, node_mask=None)):
        model.zero_grad()
        loss = model.loss(variant)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_positions", [True, False])
@pytest.mark.parametrize("steps", [1, 2])
def test_frozen_inference_encodes_as_the_trained_weights_do(
    use_positions: bool, steps: int
) -> None:
    """Inside ``frozen_scoring()`` an eval-mode, no-grad encode folds the edge projections into
    the GRU and takes the first step's position share from a table: the same session vectors."""
    model = make_srgnn(seed=6, use_positions=use_positions, steps=steps, max_position=3).double()
    sessions = [[1, 2, 1, 3, 1], [4, 5], [6, 7, 8, 6, 9, 10, 11], [12], [13, 13]]
    batch = batch_from_sessions(sessions)  # the 7-click session runs past max_position
    with torch.no_grad():
        plain = model.encode(batch)
        with model.frozen_scoring():
            frozen = model.encode(batch)
            assert "_frozen_cell" in model.__dict__
        assert "_frozen_cell" not in model.__dict__  # released with the scope
    torch.testing.assert_close(frozen, plain, rtol=1e-10, atol=1e-12)


def test_frozen_scope_keeps_training_differentiable() -> None:
    """With autograd on (or in train mode) the frozen scope encodes the ordinary way: the folded
    weights have no gradient."""
    model = make_srgnn(seed=7)
    batch = batch_from_sessions([[1, 2, 3], [4, 5, 4]])
    with model.frozen_scoring():
        session = model.encode(batch)
        assert "_frozen_cell" not in model.__dict__
    session.sum().backward()  # type: ignore[no-untyped-call]
    assert model.gnn.w_ih.weight.grad is not None
    with torch.no_grad(), model.train().frozen_scoring():
        model.encode(batch)
        assert "_frozen_cell" not in model.__dict__


def test_recommend_lists_catalog_ids_and_can_leave_out_the_clicked_items() -> None:
    model = build_encoder("srgnn", 30, hidden=8)
    model.train()
    items, scores = model.recommend([[1, 2, 3]], k=27, exclude_clicked=True)
    assert model.training  # put back as it was
    assert sorted(items[0].tolist()) == list(range(4, 31))
    assert torch.isfinite(scores).all() and bool((scores[0, :-1] >= scores[0, 1:]).all())
    with pytest.raises(ValueError, match="more than the items a session did not click"):
        model.recommend([[1, 2, 3]], k=28, exclude_clicked=True)
    with pytest.raises(ValueError, match=r"k must lie in 1\.\.30"):
        model.recommend([[1]], k=31)


@pytest.mark.parametrize(
    ("sessions", "error", "message"),
    [
        ([1, 2, 3], TypeError, r"session 0 is 1, not a list of item ids .*\[\[12, 5, 7\]\]"),
        ([], ValueError, "no sessions given"),
        ([[]], ValueError, "session 0 has no clicks"),
        ([[1.5, 2]], TypeError, "item ids are integers, got 1.5"),
        ([["1", "2"]], TypeError, "item ids are integers, got '1'"),
        ([[1], [0, 2]], ValueError, r"session 1: item id 0 is outside the encoder's catalog"),
        ([[31]], ValueError, r"item id 31 is outside the encoder's catalog \(1\.\.30\)"),
        ("12 5", TypeError, "sessions must be a list of sessions"),
    ],
)
def test_recommend_names_what_is_wrong_with_its_sessions(
    sessions: object, error: type[Exception], message: str
) -> None:
    model = build_encoder("srgnn", 30, hidden=8)
    with pytest.raises(error, match=message):
        model.recommend(sessions, k=5)  # type: ignore[arg-type]


def test_recommend_takes_a_2d_tensor_of_sessions_as_lists() -> None:
    model = build_encoder("srgnn", 30, hidden=8)
    ids, _ = model.recommend(torch.tensor([[1, 2, 3]]), k=5)  # type: ignore[arg-type]
    assert torch.equal(ids, model.recommend([[1, 2, 3]], k=5)[0])


def test_the_loss_refuses_a_batch_without_targets() -> None:
    model = build_encoder("srgnn", 30, hidden=8)
    # Without targets batch_from_sessions marks them -1, which would score item 29.
    with pytest.raises(ValueError, match=r"loss needs every session's target, .* 1\.\.30"):
        model.loss(batch_from_sessions([[1, 2, 3]]))
    import dataclasses

    batch = dataclasses.replace(batch_from_sessions([[1, 2, 3]]), targets=torch.tensor([4]))
    assert torch.isfinite(model.loss(batch))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hidden": "16"}, "hidden must be an int, got '16'"),
        ({"hidden": 16.0}, "hidden must be an int, got 16.0"),
        ({"normalize": 2}, "normalize must be a bool, got 2"),
        ({"scale": "12"}, "scale must be a number, got '12'"),
    ],
)
def test_encoder_options_of_the_wrong_type_are_named(
    options: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        build_encoder("srgnn", 30, **options)
    with pytest.raises(TypeError, match=r"num_items must be an int, got 50\.5"):
        build_encoder("srgnn", 50.5)  # type: ignore[arg-type]
    import numpy as np

    assert build_encoder("srgnn", np.int64(30), hidden=np.int64(8)).config.num_items == 30


def test_recommend_takes_each_session_as_an_array_too() -> None:
    import numpy as np

    model = build_encoder("srgnn", 30, hidden=8)
    want = model.recommend([[1, 2, 3], [4, 5]], k=3)[0]
    got = model.recommend([np.array([1, 2, 3]), torch.tensor([4, 5])], k=3)[0]  # type: ignore[list-item]
    assert torch.equal(got, want)
    assert build_encoder("srgnn", 30, hidden=8, use_positions=0).config.use_positions is False
