"""Building blocks shared by the session encoders, one layer per module."""

from fedenc.encoders.layers.gated_graph import GatedGraphCell
from fedenc.encoders.layers.readout import SoftAttentionReadout

__all__ = ["GatedGraphCell", "SoftAttentionReadout"]
