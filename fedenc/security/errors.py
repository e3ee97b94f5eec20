"""The exceptions of :mod:`fedenc.security`; each message says what is wrong and how to fix it."""

from __future__ import annotations

import enum


class SecurityError(Exception):
    """Base class of every error raised by :mod:`fedenc.security`."""


class PemError(SecurityError):
    """A PEM file is missing, of the wrong kind, unreadable or inconsistent (key/cert mismatch,
    expired, not signed by the CA)."""


class KeyExistsError(SecurityError):
    """Refused to overwrite an existing private key (pass ``force=True`` / ``--force``)."""


class TransportPolicyError(SecurityError):
    """Neither certificates nor an explicit ``--insecure`` were given (or both were)."""


class IdentityReason(str, enum.Enum):
    """Why the master refused a child's identity."""

    NO_CERTIFICATE = "no-certificate"  # plaintext or server-only TLS: nothing to identify
    UNKNOWN = "unknown"  # not signed by our CA, or not a fedenc child certificate
    EXPIRED = "expired"  # outside its validity window (expired or not yet valid)
    REVOKED = "revoked"  # its serial is in the CA's revocation list
    NOT_ALLOWLISTED = "not-allowlisted"  # a valid child of our CA, but not allowed on this master


# Prefix of every refusal the master sends, so a child can tell an identity refusal from any
# other PERMISSION_DENIED / UNAUTHENTICATED status (see fedenc.security.rpc_errors).
IDENTITY_ERROR_PREFIX = "fedenc identity refused"


class IdentityError(SecurityError):
    """The master refused a peer's identity; :attr:`reason` says why."""

    def __init__(self, reason: IdentityReason, detail: str, *, name: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.name = name
        super().__init__(f"{IDENTITY_ERROR_PREFIX} ({reason.value}): {detail}")
