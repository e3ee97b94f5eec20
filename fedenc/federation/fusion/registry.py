"""Fusion rules by name: the built-in ones and any that another package registers through the
``fedenc.fusion`` entry-point group, so users add rules without editing fedenc::

    # in the plugin's pyproject.toml
    [project.entry-points."fedenc.fusion"]
    my_rule = "my_package.fusion:MyRule"      # a FusionRule subclass

Built-in names win over a plugin of the same name; a plugin that fails to load is logged and
skipped, so it cannot break the built-in rules.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from importlib import import_module
from typing import TYPE_CHECKING, Any, TypeVar

from fedenc.plugins import did_you_mean, load_entry_points, load_failure_note

if TYPE_CHECKING:
    from fedenc.federation.fusion.base import FusionRule

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "fedenc.fusion"
DEFAULT_RULE = "weighted_sum"

R = TypeVar("R", bound="type[FusionRule]")

_REGISTRY: dict[str, type[FusionRule]] = {}
_ALIASES: dict[str, str] = {}
# Modules of the built-in rules; importing one runs its @register_fusion_rule.
_BUILTIN_MODULES = (
    "fedenc.federation.fusion.weighted_sum",
    "fedenc.federation.fusion.mean",
    "fedenc.federation.fusion.median",
    "fedenc.federation.fusion.trimmed_mean",
    "fedenc.federation.fusion.krum",
    "fedenc.federation.fusion.clipped_mean",
    "fedenc.federation.fusion.server_optimizers",
)
_loaded_entry_points = False


class UnknownFusionRuleError(KeyError):
    """A fusion-rule name that is neither built in nor registered; the message lists the names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown fusion rule"


def register_fusion_rule(name: str, aliases: tuple[str, ...] = ()) -> Callable[[R], R]:
    """Class decorator: make a :class:`FusionRule` subclass available as ``name``
    (and as each of ``aliases``)."""

    def decorate(cls: R) -> R:
        from fedenc.federation.fusion.base import FusionRule

        if not (isinstance(cls, type) and issubclass(cls, FusionRule)):
            raise TypeError(f"fusion rule {name!r} must be a FusionRule subclass, got {cls!r}")
        for key in (name, *aliases):
            taken = _REGISTRY.get(_ALIASES.get(key, key))
            if taken is not None and taken is not cls:
                raise ValueError(f"fusion rule {key!r} is already registered by {taken}")
        cls.name = name
        _REGISTRY[name] = cls
        for alias in aliases:
            _ALIASES[alias] = name
        return cls

    return decorate


def _load() -> None:
    global _loaded_entry_points
    for module in _BUILTIN_MODULES:
        import_module(module)
    if _loaded_entry_points:
        return
    _loaded_entry_points = True
    load_entry_points(
        ENTRY_POINT_GROUP,
        "fusion",
        lambda name: _REGISTRY.get(_ALIASES.get(name, name)),
        lambda name, cls: register_fusion_rule(name)(cls),
    )


def available_fusion_rules() -> list[str]:
    """The registered rule names (aliases such as ``fedavg`` resolve to one of them)."""
    _load()
    return sorted(_REGISTRY)


def fusion_rule_class(name: str) -> type[FusionRule]:
    """The class registered as ``name`` (or as an alias of it)."""
    _load()
    try:
        return _REGISTRY[_ALIASES.get(name, name)]
    except KeyError:
        raise UnknownFusionRuleError(
            f"unknown fusion rule {name!r}; {did_you_mean(name, [*_REGISTRY, *_ALIASES])}"
            f"available: {', '.join(sorted(_REGISTRY))}"
            + load_failure_note(ENTRY_POINT_GROUP, name)
        ) from None


def build_fusion_rule(name: str = DEFAULT_RULE, **options: Any) -> FusionRule:
    """A fresh rule ``name`` configured by ``options``.

    Unknown option names and bad values raise ``ValueError`` naming the option.
    """
    cls = fusion_rule_class(name)
    signature = inspect.signature(cls)
    try:
        signature.bind(**options)
    except TypeError as err:
        accepted = ", ".join(p for p in signature.parameters) or "none"
        raise ValueError(f"fusion rule {name!r}: {err} (options: {accepted})") from None
    return cls(**options)
