"""Session encoders: one module per encoder type, registered by name.

The public API: :class:`SessionEncoder` (the base class of every encoder) and
:class:`EncoderConfig`, and the registry: :func:`build_encoder`, :func:`register_encoder`,
:func:`available_encoders`, :func:`encoder_class`. docs/encoders.md has a guide to writing one.
"""

from fedenc.encoders.base import EncoderConfig, SessionEncoder
from fedenc.encoders.registry import (
    UnknownEncoderError,
    available_encoders,
    build_encoder,
    encoder_class,
    encoder_config,
    register_encoder,
)

__all__ = [
    "EncoderConfig",
    "SessionEncoder",
    "UnknownEncoderError",
    "available_encoders",
    "build_encoder",
    "encoder_class",
    "encoder_config",
    "register_encoder",
]
