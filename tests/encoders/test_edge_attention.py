"""The ``edge_attn`` encoder and its :class:`DirectedEdgeAttention` layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from fedenc.data.batching import SessionBatch, batch_from_sessions
from fedenc.encoders.base import EncoderConfig
from fedenc.encoders.edge_attention import EdgeAttentionEncoder
from fedenc.encoders.layers import DirectedEdgeAttention
from fedenc.encoders.registry import available_encoders, build_encoder

HIDDEN = 8
NUM_ITEMS = 20
# Branching nodes (2 in the first session: in from 1 and 3, out to 3 and 4), a single click,
# a self-loop, and a hub node (1 in the last session).
SESSIONS = [[1, 2, 3, 2, 4], [5, 6, 5, 7], [8], [9, 9, 10], [1, 3, 1, 2, 1, 4]]


def make_encoder(**options: object) -> EdgeAttentionEncoder:
    torch.manual_seed(0)
    config = EncoderConfig(num_items=NUM_ITEMS, hidden=HIDDEN, steps=2, **options)  # type: ignore[arg-type]
    return EdgeAttentionEncoder(config).eval()


def make_layer() -> DirectedEdgeAttention:
    torch.manual_seed(1)
    return DirectedEdgeAttention(HIDDEN)


def reference_attention(
    layer: DirectedEdgeAttention, h: torch.Tensor, edges: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The docstring's formula, one node and one direction at a time."""
    k = layer.key(h)
    bsz, num_nodes, _ = h.shape
    out = torch.zeros(2, bsz, num_nodes, num_nodes)
    for b in range(bsz):
        for i in range(num_nodes):
            for d, nbrs in enumerate((edges[b, :, i], edges[b, i, :])):  # in, out
                js = torch.nonzero(nbrs).flatten()
                if js.numel() == 0:
                    continue
                e = torch.stack(
                    [
                        layer.att_self[d] @ k[b, i]
                        + layer.att_nbr[d] @ k[b, j]
                        + layer.att_rel[d] @ (k[b, i] * k[b, j])
                        for j in js
                    ]
                )
                out[d, b, i, js] = torch.softmax(F.leaky_relu(e, layer.negative_slope), 0)
    return out[0], out[1]


def permute_nodes(batch: SessionBatch, perm: torch.Tensor) -> SessionBatch:
    """Relabel the unique nodes of every row: new node ``u`` of row ``b`` is old ``perm[b, u]``."""
    inverse = torch.argsort(perm, dim=1)
    rows = torch.arange(batch.size)[:, None]

    def square(m: torch.Tensor) -> torch.Tensor:
        return m[rows[:, :, None], perm[:, :, None], perm[:, None, :]]

    return SessionBatch(
        items=batch.items,
        mask=batch.mask,
        lengths=batch.lengths,
        positions=batch.positions,
        nodes=batch.nodes[rows, perm],
        node_mask=batch.node_mask[rows, perm],
        node_positions=batch.node_positions[rows, perm],
        alias=inverse[rows, batch.alias],
        edges=square(batch.edges),
        adj_in=square(batch.adj_in),
        adj_out=square(batch.adj_out),
        targets=batch.targets,
    )


def test_weights_match_reference_and_normalise_per_direction() -> None:
    batch = batch_from_sessions(SESSIONS)
    layer = make_layer()
    h = torch.randn(batch.size, batch.nodes.shape[1], HIDDEN)
    with torch.no_grad():
        alpha_in, alpha_out = layer.attention(h, batch.edges)
        ref_in, ref_out = reference_attention(layer, h, batch.edges)
    torch.testing.assert_close(alpha_in, ref_in)
    torch.testing.assert_close(alpha_out, ref_out)

    present = batch.edges > 0
    for alpha, nbr in ((alpha_in, present.transpose(1, 2)), (alpha_out, present)):
        assert (alpha[~nbr] == 0.0).all()  # exactly zero off the graph
        has = nbr.any(-1)
        torch.testing.assert_close(alpha.sum(-1)[has], torch.ones(int(has.sum())))
        assert (alpha.sum(-1)[~has] == 0.0).all()
    # Node 2 of the first session has two in- and two out-neighbours; its weights depend on
    # the features, so they are not uniform.
    node = int((batch.nodes[0] == 2).nonzero())
    assert int(present[0, :, node].sum()) == 2 and int(present[0, node].sum()) == 2
    assert not torch.allclose(alpha_in[0, node][present[0, :, node]], torch.full((2,), 0.5))


def test_nodes_without_neighbours_get_zero_weights_and_finite_outputs() -> None:
    batch = batch_from_sessions([[1, 2, 3], [7]])
    layer = make_layer()
    h = torch.randn(2, batch.nodes.shape[1], HIDDEN, requires_grad=True)
    alpha_in, alpha_out = layer.attention(h, batch.edges)
    first, last = int(batch.alias[0, 0]), int(batch.alias[0, 2])
    assert (alpha_in[0, first] == 0).all() and (alpha_out[0, first] != 0).any()
    assert (alpha_out[0, last] == 0).all() and (alpha_in[0, last] != 0).any()
    assert (alpha_in[1] == 0).all() and (alpha_out[1] == 0).all()  # single click: no edges
    out = layer(h, batch.edges)
    assert torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert torch.isfinite(grad).all()
    # Zero aggregates: the isolated node's update only sees its own state.
    alone = layer(h[1:, :1], batch.edges[1:, :1, :1])
    torch.testing.assert_close(out[1, 0], alone[0, 0])

    encoder = make_encoder()
    session = encoder.encode(batch)
    assert session.shape == (2, HIDDEN) and torch.isfinite(session).all()


def test_relabelling_nodes_permutes_layer_and_keeps_session_vector() -> None:
    batch = batch_from_sessions(SESSIONS)
    gen = torch.Generator().manual_seed(3)
    num_nodes = batch.nodes.shape[1]
    perm = torch.stack([torch.randperm(num_nodes, generator=gen) for _ in range(batch.size)])
    assert (perm != torch.arange(num_nodes)).any()
    moved = permute_nodes(batch, perm)
    rows = torch.arange(batch.size)[:, None]
    clicked = torch.where(batch.mask, moved.nodes[rows, moved.alias], 0)
    assert torch.equal(clicked, batch.items)

    layer = make_layer()
    h = torch.randn(batch.size, num_nodes, HIDDEN)
    with torch.no_grad():
        out = layer(h, batch.edges)
        out_moved = layer(h[rows, perm], moved.edges)
        a_in, a_out = layer.attention(h, batch.edges)
        m_in, m_out = layer.attention(h[rows, perm], moved.edges)
    torch.testing.assert_close(out_moved, out[rows, perm])
    square = (rows[:, :, None], perm[:, :, None], perm[:, None, :])
    torch.testing.assert_close(m_in, a_in[square])
    torch.testing.assert_close(m_out, a_out[square])

    encoder = make_encoder()
    with torch.no_grad():
        torch.testing.assert_close(encoder.encode(moved), encoder.encode(batch))
        w_in, _ = encoder.edge_weights(batch)
        v_in, _ = encoder.edge_weights(moved)
    torch.testing.assert_close(v_in, w_in[square])


def test_encode_and_score_shapes() -> None:
    batch = batch_from_sessions(SESSIONS)
    encoder = make_encoder()
    session = encoder.encode(batch)
    assert session.shape == (len(SESSIONS), HIDDEN) and torch.isfinite(session).all()
    logits = encoder(batch)
    assert logits.shape == (len(SESSIONS), NUM_ITEMS) and torch.isfinite(logits).all()
    alpha_in, alpha_out = encoder.edge_weights(batch)
    num_nodes = batch.nodes.shape[1]
    assert alpha_in.shape == alpha_out.shape == (len(SESSIONS), num_nodes, num_nodes)
    first_in, _ = encoder.edge_weights(batch, layer=0)
    h0 = encoder.item_vectors(batch.nodes)
    first = encoder.layers[0]
    assert isinstance(first, DirectedEdgeAttention)
    torch.testing.assert_close(first_in, first.attention(h0, batch.edges)[0])


@pytest.mark.parametrize("use_positions", [True, False])
def test_gradient_reaches_every_parameter(use_positions: bool) -> None:
    batch = batch_from_sessions(SESSIONS)
    encoder = make_encoder(use_positions=use_positions).train()
    targets = torch.tensor([4, 6, 1, 2, 9])
    torch.autograd.backward(F.cross_entropy(encoder(batch), targets))
    for name, p in encoder.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert (encoder.position is not None) == use_positions


def test_registry_builds_it_by_name() -> None:
    assert "edge_attn" in available_encoders()
    encoder = build_encoder("edge_attn", NUM_ITEMS, hidden=HIDDEN, steps=3)
    assert isinstance(encoder, EdgeAttentionEncoder)
    assert encoder.type_name == "edge_attn"
    assert len(encoder.layers) == 3
    assert encoder.head_parameter_names() == ["embedding.weight"]
    shared = encoder.shared_parameter_names()
    assert "position.weight" in shared and any(n.startswith("layers.2.") for n in shared)
    assert repr(encoder.layers[0]) == "DirectedEdgeAttention(8, negative_slope=0.2)"
    empty = build_encoder("edge_attn", NUM_ITEMS, hidden=HIDDEN, steps=0)
    assert isinstance(empty, EdgeAttentionEncoder)
    with pytest.raises(ValueError, match="steps=0"):
        empty.edge_weights(batch_from_sessions([[1, 2]]))


def test_reset_parameters_is_seeded_and_bounded() -> None:
    layer = make_layer()
    torch.manual_seed(2)
    layer.reset_parameters()
    before = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
    torch.manual_seed(2)
    layer.reset_parameters()
    for a, b in zip(before, layer.parameters(), strict=True):
        assert torch.equal(a, b)
        assert b.abs().max() <= HIDDEN**-0.5


def test_click_order_matters_only_with_positions() -> None:
    batch = batch_from_sessions([[1, 2, 1, 3, 1], [1, 3, 1, 2, 1]])
    assert torch.equal(batch.edges[0], batch.edges[1])  # same graph, different order
    assert torch.equal(batch.nodes[0], batch.nodes[1])
    with torch.no_grad():
        with_pos = make_encoder(use_positions=True).encode(batch)
        without = make_encoder(use_positions=False).encode(batch)
    assert not torch.allclose(with_pos[0], with_pos[1], atol=1e-4)
    torch.testing.assert_close(without[0], without[1])
