"""GatedGraphCell against SR-GNN's GNNCell written out by hand, and SoftAttentionReadout."""

from __future__ import annotations

import torch

from fedenc.data.batching import SessionBatch, batch_from_sessions
from fedenc.encoders.layers import GatedGraphCell, SoftAttentionReadout
from fedenc.encoders.layers.gated_graph import PackedGraph

H = 4


def srgnn_gnn_cell(cell: GatedGraphCell, adj: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """SR-GNN's ``GNNCell`` (Wu et al., reference implementation), ``A = [A_in | A_out]``."""
    n = adj.shape[1]
    input_in = torch.matmul(adj[:, :, :n], cell.edge_in(hidden)) + cell.b_iah
    input_out = torch.matmul(adj[:, :, n : 2 * n], cell.edge_out(hidden)) + cell.b_oah
    inputs = torch.cat([input_in, input_out], 2)
    gi = inputs @ cell.w_ih.weight.t() + cell.w_ih.bias
    gh = hidden @ cell.w_hh.weight.t() + cell.w_hh.bias
    i_r, i_i, i_n = gi[..., :H], gi[..., H : 2 * H], gi[..., 2 * H :]
    h_r, h_i, h_n = gh[..., :H], gh[..., H : 2 * H], gh[..., 2 * H :]
    resetgate = torch.sigmoid(i_r + h_r)
    inputgate = torch.sigmoid(i_i + h_i)
    newgate = torch.tanh(i_n + resetgate * h_n)
    return newgate + inputgate * (hidden - newgate)


def test_gated_graph_cell_matches_srgnn_gnn_cell() -> None:
    torch.manual_seed(0)
    cell = GatedGraphCell(H)
    # Session [1, 2, 3, 1, 3]: 1->2, 2->3, 3->1, 1->3 (node i = item i + 1), written by hand.
    adj_out = torch.tensor([[[0, 0.5, 0.5], [0, 0, 1], [1, 0, 0]]])
    adj_in = torch.tensor([[[0, 0, 1], [1, 0, 0], [0.5, 0.5, 0]]])
    batch = batch_from_sessions([[1, 2, 3, 1, 3]])
    assert torch.equal(batch.adj_in, adj_in) and torch.equal(batch.adj_out, adj_out)
    h = torch.randn(1, 3, H)
    with torch.no_grad():
        got = cell(h, adj_in, adj_out)
        want = srgnn_gnn_cell(cell, torch.cat([adj_in, adj_out], 2), h)
    assert got.shape == (1, 3, H)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _mixed_batch_and_graph() -> tuple[SessionBatch, PackedGraph]:
    """Sessions of different lengths, repeated clicks, a self-loop and a single click."""
    batch = batch_from_sessions([[1, 2, 3, 1, 3], [4, 4, 5], [6], [7, 8, 9, 10, 7, 11]])
    counts = batch.node_mask.sum(1)
    start = counts.cumsum(0) - counts
    return batch, PackedGraph.from_batch(batch.edges, start, int(counts.sum()))


def test_packed_step_equals_the_padded_step_on_the_real_nodes() -> None:
    # Sessions of different lengths (so padding), repeated clicks, a self-loop and a single
    # click: the edge-list step over the real nodes must give the padded step's real rows.
    torch.manual_seed(2)
    cell = GatedGraphCell(H).double()
    batch, graph = _mixed_batch_and_graph()
    assert graph.src.shape == graph.dst.shape == (int(batch.edges.sum()),)
    h = torch.randn(*batch.node_mask.shape, H, dtype=torch.float64, requires_grad=True)
    padded = cell(h, batch.adj_in.double(), batch.adj_out.double())[batch.node_mask]
    packed = cell.propagate_packed(h[batch.node_mask], graph)
    torch.testing.assert_close(packed, padded)
    (g_padded,) = torch.autograd.grad(padded.square().sum(), h)
    (g_packed,) = torch.autograd.grad(packed.square().sum(), h)
    torch.testing.assert_close(g_packed, g_padded)


def test_gated_graph_cell_node_without_edges_only_sees_biases() -> None:
    torch.manual_seed(1)
    cell = GatedGraphCell(H)
    h = torch.randn(2, 2, H)
    zero = torch.zeros(2, 2, 2)
    with torch.no_grad():
        got = cell(h, zero, zero)
        # Changing the other node cannot change an isolated node.
        h2 = h.clone()
        h2[:, 1] += 5.0
        again = cell(h2, zero, zero)
        want = srgnn_gnn_cell(cell, torch.cat([zero, zero], 2), h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again[:, 0], got[:, 0])
    assert not torch.allclose(again[:, 1], got[:, 1])


def make_readout() -> SoftAttentionReadout:
    torch.manual_seed(2)
    return SoftAttentionReadout(H, 3)


def test_readout_matches_the_formula() -> None:
    readout = make_readout()
    clicks = torch.randn(1, 4, H)
    mask = torch.tensor([[True, True, True, False]])
    with torch.no_grad():
        got = readout(clicks, mask, torch.tensor([2]))
        v = clicks[0, :3]
        v_n = v[2]
        alpha = readout.q(torch.sigmoid(readout.w_last(v_n) + readout.w_click(v)))  # (3, 1)
        s_g = (alpha * v).sum(0)
        want = readout.combine(torch.cat([s_g, v_n]))
    assert got.shape == (1, 3)
    torch.testing.assert_close(got[0], want)


def test_readout_gives_padding_no_weight() -> None:
    readout = make_readout()
    clicks = torch.randn(2, 5, H)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    last = torch.tensor([2, 4])
    with torch.no_grad():
        base = readout(clicks, mask, last)
        noisy = clicks.clone()
        noisy[0, 3:] = torch.randn(2, H) * 100
        torch.testing.assert_close(readout(noisy, mask, last), base, rtol=0, atol=0)
        # The same rows without the padding columns give the same vector.
        torch.testing.assert_close(
            readout(clicks[:1, :3], mask[:1, :3], last[:1]), base[:1], rtol=1e-6, atol=1e-6
        )
        # ...while a real click does count.
        moved = clicks.clone()
        moved[0, 1] += 1.0
        assert not torch.allclose(readout(moved, mask, last)[0], base[0])


def test_fused_step_equals_the_packed_step() -> None:
    # Folding the edge projections into the GRU's input weights reorders sums only: the same
    # step, for a self-loop, repeated clicks and a node without edges (biases only).
    torch.manual_seed(5)
    cell = GatedGraphCell(H).double()
    _, graph = _mixed_batch_and_graph()
    h = torch.randn(graph.num_nodes, H, dtype=torch.float64)
    fused = cell.fused()
    assert fused.weight.shape == (9 * H, H) and not fused.weight.requires_grad
    with torch.no_grad():
        want = cell.propagate_packed(h, graph)
        torch.testing.assert_close(fused.step(h, graph), want)
        # A projection assembled elsewhere (an encoder's per-position table) is used as given.
        torch.testing.assert_close(fused.step(h, graph, fused.project(h)), want)
        assert not torch.allclose(fused.step(h, graph, fused.project(h) + 1.0), want)
