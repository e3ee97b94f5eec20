"""A child's identity inside its certificate: the subject CN and a URI SAN ``fedenc://child/NAME``.

The URI SAN is the authoritative name (a URI cannot be confused with a host name, and the master's
own certificate has none); the CN repeats it for humans and for gRPC's ``x509_common_name``.
"""

from __future__ import annotations

import re

from cryptography import x509
from cryptography.x509.oid import NameOID

CHILD_URI_PREFIX = "fedenc://child/"

# Names become file names (children/NAME.pem) and log fields: no separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_child_name(name: str) -> str:
    """``name`` if it is a valid child name (1-64 of ``A-Z a-z 0-9 . _ -``, not starting with a
    dot, dash or underscore); raises ``ValueError`` otherwise."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"invalid child name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def child_uri(name: str) -> str:
    return CHILD_URI_PREFIX + validate_child_name(name)


def common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def child_name_of(cert: x509.Certificate) -> str | None:
    """The child name in ``cert``'s ``fedenc://child/NAME`` URI SAN, or None when it has none
    (or more than one, or a CN that disagrees: such a certificate was not made by fedenc)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    names = [u[len(CHILD_URI_PREFIX) :] for u in uris if u.startswith(CHILD_URI_PREFIX)]
    if len(names) != 1 or not _NAME.fullmatch(names[0]) or common_name(cert) != names[0]:
        return None
    return names[0]
