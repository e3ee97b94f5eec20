"""Encoder types by name: the built-in ones and any registered through the
``fedenc.encoders`` entry-point group by another package. Built-in names win over a plugin of
the same name; a plugin that fails to load is logged and skipped, so it cannot break the
built-in encoders."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any, TypeVar

from fedenc.encoders.base import EncoderConfig, SessionEncoder
from fedenc.plugins import did_you_mean, load_entry_points, load_failure_note

E = TypeVar("E", bound=type[SessionEncoder])

_REGISTRY: dict[str, type[SessionEncoder]] = {}
_ENTRY_POINT_GROUP = "fedenc.encoders"
# Modules of the built-in encoders; importing one runs its @register_encoder.
_BUILTIN_MODULES = (
    "fedenc.encoders.srgnn",
    "fedenc.encoders.edge_attention",
    "fedenc.encoders.skip_rnn",
)
_loaded_entry_points = False


class UnknownEncoderError(KeyError):
    """An encoder type that is neither built in nor registered."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown encoder"


def register_encoder(name: str) -> Callable[[E], E]:
    """Class decorator: make an encoder available as ``name``."""

    def decorate(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"encoder type {name!r} is already registered by {_REGISTRY[name]}")
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_builtin_and_plugins() -> None:
    global _loaded_entry_points
    for module in _BUILTIN_MODULES:
        import_module(module)
    if not _loaded_entry_points:
        _loaded_entry_points = True
        load_entry_points(
            _ENTRY_POINT_GROUP,
            "encoder",
            _REGISTRY.get,
            lambda name, cls: register_encoder(name)(cls),
        )


def available_encoders() -> list[str]:
    """The registered encoder type names: built in, plugins and decorated classes."""
    _load_builtin_and_plugins()
    return sorted(_REGISTRY)


def encoder_class(name: str) -> type[SessionEncoder]:
    """The class registered as ``name``; :class:`UnknownEncoderError` lists the known ones."""
    _load_builtin_and_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownEncoderError(
            f"unknown encoder type {name!r}; {did_you_mean(name, _REGISTRY)}available: "
            f"{', '.join(sorted(_REGISTRY))}" + load_failure_note(_ENTRY_POINT_GROUP, name)
        ) from None


def build_encoder(name: str, num_items: int, **options: Any) -> SessionEncoder:
    """Build encoder ``name`` for a catalog of ``num_items``; ``options`` go to
    :class:`EncoderConfig` (other keys land in ``extra``, if the encoder reads them)."""
    return encoder_class(name)(encoder_config(name, num_items, **options))


def encoder_config(name: str, num_items: int, **options: Any) -> EncoderConfig:
    """The checked :class:`EncoderConfig` of encoder ``name`` (without building the model):
    ``ValueError`` naming an option it does not take or a value out of range."""
    cls = encoder_class(name)
    known = set(EncoderConfig.__dataclass_fields__) - {"num_items", "extra"}
    extra = dict(options.pop("extra", {}) or {})
    extra.update({k: options.pop(k) for k in list(options) if k not in known})
    allowed = cls.extra_options
    unknown = sorted(set(extra) - allowed) if allowed is not None else []
    if unknown:  # a typo would otherwise train the default silently
        own = f"; its own: {', '.join(sorted(allowed))}" if allowed else ""
        raise ValueError(
            f"encoder {name!r} has no option {', '.join(map(repr, unknown))} (options: "
            f"{', '.join(sorted(known))}{own})"
        )
    return EncoderConfig(num_items=num_items, extra=extra, **options)
