"""The master's view of who is on the other end of a stream.

With mutual TLS, BoringSSL has already checked that the child's certificate chains to our CA and
is within its validity period. :class:`IdentityVerifier` re-checks both from the peer certificate
in ``context.auth_context()`` (defence in depth: a server accidentally started with the wrong
root certificates or without client authentication still refuses strangers), then checks what the
handshake cannot: the revocation list and the allowlist. It returns the child's name, which the
runtime should use instead of any name the child claims in its messages.
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from fedenc.security.allowlist import allowlist_of, load_allowlist
from fedenc.security.ca import issued_by, load_ca_certificate
from fedenc.security.errors import IdentityError, IdentityReason
from fedenc.security.layout import CertLayout
from fedenc.security.naming import child_name_of, common_name
from fedenc.security.revocation import load_revocation_list
from fedenc.security.validity import utcnow
from fedenc.security.watched import WatchedFile

# Who is not known is UNAUTHENTICATED; who is known but not let in is PERMISSION_DENIED.
_STATUS = {
    IdentityReason.NO_CERTIFICATE: grpc.StatusCode.UNAUTHENTICATED,
    IdentityReason.UNKNOWN: grpc.StatusCode.UNAUTHENTICATED,
    IdentityReason.EXPIRED: grpc.StatusCode.UNAUTHENTICATED,
    IdentityReason.REVOKED: grpc.StatusCode.PERMISSION_DENIED,
    IdentityReason.NOT_ALLOWLISTED: grpc.StatusCode.PERMISSION_DENIED,
}


def status_code_for(reason: IdentityReason) -> Any:
    """The ``grpc.StatusCode`` a server should abort with for an identity refusal."""
    return _STATUS[reason]


@dataclass(frozen=True)
class ChildIdentity:
    """A verified child: its name and the certificate it proved."""

    name: str
    serial: int
    not_after: dt.datetime
    cert: x509.Certificate = field(compare=False, repr=False)


class IdentityVerifier:
    """Maps a peer certificate (or a gRPC servicer context) to a verified child name.

    ``crl`` and an allowlist *file* are reloaded when they change on disk, so ``fedenc certs
    revoke`` takes effect on the next stream without restarting the master. ``allowlist=None``
    admits every valid, unrevoked child of the CA."""

    def __init__(
        self,
        ca_cert: x509.Certificate,
        *,
        crl: Path | None = None,
        allowlist: Path | Iterable[str] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.ca_cert = ca_cert
        self._clock = clock
        self._crl = (
            WatchedFile(crl, lambda p: load_revocation_list(p, ca_cert))
            if crl is not None
            else None
        )
        self._allow: WatchedFile[frozenset[str]] | frozenset[str] | None
        if allowlist is None:
            self._allow = None
        elif isinstance(allowlist, Path):
            self._allow = WatchedFile(allowlist, load_allowlist)
        elif isinstance(allowlist, str):
            # A bare string is both a path and an iterable of 1-letter names: make callers say.
            raise TypeError("allowlist: pass a Path for a file or a list of child names, not a str")
        else:
            self._allow = allowlist_of(allowlist)

    @classmethod
    def from_layout(
        cls, layout: CertLayout, *, allowlist: Path | Iterable[str] | None = None
    ) -> IdentityVerifier:
        """A verifier for the CA of ``layout``, using its ``crl.pem`` when the file exists."""
        crl = layout.crl if layout.crl.exists() else None
        return cls(load_ca_certificate(layout), crl=crl, allowlist=allowlist)

    def without_allowlist(self) -> IdentityVerifier:
        """The same checks (CA, revocation, validity) for any certificate of the CA, allowlisted
        or not: the Control API's operators are no children of the allowlist."""
        other = copy.copy(self)
        other._allow = None
        return other

    @property
    def allowlist(self) -> frozenset[str] | None:
        """The names allowed now, or None when every child of the CA is allowed."""
        if self._allow is None or isinstance(self._allow, frozenset):
            return self._allow
        return self._allow.get()

    def verify_certificate(self, cert: x509.Certificate) -> ChildIdentity:
        """The identity proved by ``cert``; raises :class:`IdentityError` with the reason."""
        label = common_name(cert) or cert.subject.rfc4514_string() or "?"
        if not issued_by(cert, self.ca_cert):
            raise IdentityError(
                IdentityReason.UNKNOWN,
                f"certificate {label!r} (issuer {cert.issuer.rfc4514_string()}) is not signed by "
                f"this federation's CA ({self.ca_cert.subject.rfc4514_string()})",
            )
        name = child_name_of(cert)
        if name is None or not _is_client_certificate(cert):
            raise IdentityError(
                IdentityReason.UNKNOWN,
                f"certificate {label!r} is signed by the CA but is not a child certificate "
                "(no fedenc://child/NAME URI, or not for client authentication)",
            )
        serial = cert.serial_number
        revoked = self._crl.get().get(serial) if self._crl is not None else None
        if revoked is not None:
            raise IdentityError(
                IdentityReason.REVOKED,
                f"certificate of child {name!r} (serial {serial:x}) was revoked on "
                f"{revoked:%Y-%m-%d %H:%M} UTC",
                name=name,
            )
        now = self._clock()
        if now > cert.not_valid_after_utc:
            raise IdentityError(
                IdentityReason.EXPIRED,
                f"certificate of child {name!r} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC",
                name=name,
            )
        if now < cert.not_valid_before_utc:
            raise IdentityError(
                IdentityReason.EXPIRED,
                f"certificate of child {name!r} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clocks)",
                name=name,
            )
        allowed = self.allowlist
        if allowed is not None and name not in allowed:
            raise IdentityError(
                IdentityReason.NOT_ALLOWLISTED,
                f"child {name!r} is not in this master's allowlist",
                name=name,
            )
        return ChildIdentity(name, serial, cert.not_valid_after_utc, cert)

    def recheck(self, identity: ChildIdentity) -> None:
        """Verify an already admitted child again (raises :class:`IdentityError`).

        Checks run when a stream opens; a child whose stream outlives its certificate, its
        revocation or its removal from the allowlist is only caught by a re-check, e.g. before
        each round."""
        self.verify_certificate(identity.cert)

    def verify_pem(self, pem: bytes) -> ChildIdentity:
        """:meth:`verify_certificate` on a PEM-encoded certificate."""
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as err:
            raise IdentityError(
                IdentityReason.UNKNOWN, f"unreadable peer certificate: {err}"
            ) from None
        return self.verify_certificate(cert)

    def verify_context(self, context: grpc.ServicerContext) -> ChildIdentity:
        """The identity of the peer of a gRPC call (from ``context.auth_context()``)."""
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            kind = b"".join(auth.get("transport_security_type") or []).decode() or "plaintext"
            raise IdentityError(
                IdentityReason.NO_CERTIFICATE,
                f"the peer presented no client certificate (transport: {kind}); the master needs "
                "mutual TLS to identify children",
            )
        return self.verify_pem(pems[0])

    def identify(self, context: grpc.ServicerContext) -> str:
        """The verified child name of a call's peer; raises :class:`IdentityError`. This is the
        identity callback the gRPC master takes."""
        return self.verify_context(context).name

    __call__ = identify

    def identify_or_abort(self, context: grpc.ServicerContext) -> str:
        """:meth:`identify`, aborting the call with UNAUTHENTICATED / PERMISSION_DENIED and the
        reason when it fails (``context.abort`` raises, so this returns only on success)."""
        try:
            return self.identify(context)
        except IdentityError as err:
            context.abort(status_code_for(err.reason), str(err))
            raise  # unreachable: abort raises; keeps type checkers and readers honest


def _is_client_certificate(cert: x509.Certificate) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usages
