"""Building blocks shared by the session encoders, one layer per module."""

from fedenc.encoders.layers.edge_attention import DirectedEdgeAttention
from fedenc.encoders.layers.gated_graph import GatedGraphCell
from fedenc.encoders.layers.node_graph import Node, NodeGraphUnit, SkipRule
from fedenc.encoders.layers.readout import SoftAttentionReadout
from fedenc.encoders.layers.skip_gru import SkipGRU, SkipGRUOutput

__all__ = [
    "DirectedEdgeAttention",
    "GatedGraphCell",
    "Node",
    "NodeGraphUnit",
    "SkipGRU",
    "SkipGRUOutput",
    "SkipRule",
    "SoftAttentionReadout",
]
