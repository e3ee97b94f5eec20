"""Fusion rules: the patent's ``weighted_sum`` (the default, = FedAvg) and its rivals, behind one
streaming interface (:class:`FusionRule`), by name or through the ``fedenc.fusion`` entry points."""

from fedenc.federation.fusion.base import (
    BatchFusionRule,
    EmptyRoundError,
    FusionOutputError,
    FusionRule,
    FusionRuleFailed,
)
from fedenc.federation.fusion.registry import (
    DEFAULT_RULE,
    UnknownFusionRuleError,
    available_fusion_rules,
    build_fusion_rule,
    fusion_rule_class,
    register_fusion_rule,
)

__all__ = [
    "DEFAULT_RULE",
    "BatchFusionRule",
    "EmptyRoundError",
    "FusionOutputError",
    "FusionRule",
    "FusionRuleFailed",
    "UnknownFusionRuleError",
    "available_fusion_rules",
    "build_fusion_rule",
    "fusion_rule_class",
    "register_fusion_rule",
]
