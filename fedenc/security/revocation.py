"""Revocation: a CRL signed by the CA lists the serials of withdrawn certificates.

gRPC's Python API cannot hand a CRL to BoringSSL, so the TLS handshake accepts a revoked (but
otherwise valid) child; the master's :class:`~fedenc.security.identity.IdentityVerifier` checks
the serial against this list right after the handshake and refuses the stream.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from fedenc.security.ca import SIGNATURE_HASH, CertificateAuthority
from fedenc.security.errors import PemError
from fedenc.security.pem import load_crl
from fedenc.security.validity import utcnow


def build_crl(
    ca: CertificateAuthority,
    revoked: dict[int, dt.datetime] | None = None,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca`` listing ``revoked`` (serial -> revocation time).

    ``next_update`` is the CA's expiry: fedenc reads the CRL as "the current list", rewritten on
    every revocation, rather than as a feed that must be refreshed on schedule."""
    now = utcnow()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(max(ca.cert.not_valid_after_utc, now + dt.timedelta(days=1)))
    )
    for serial, when in sorted((revoked or {}).items()):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(ca.key, SIGNATURE_HASH)


def revoked_serials(crl: x509.CertificateRevocationList) -> dict[int, dt.datetime]:
    """Serial -> revocation time of every entry of ``crl``."""
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def revoke(
    ca: CertificateAuthority,
    crl: x509.CertificateRevocationList | None,
    serial: int,
    when: dt.datetime | None = None,
) -> x509.CertificateRevocationList:
    """A new CRL: ``crl``'s entries plus ``serial`` (revoking twice keeps the first date)."""
    entries = revoked_serials(crl) if crl is not None else {}
    entries.setdefault(serial, when or utcnow())
    return build_crl(ca, entries)


def load_revocation_list(path: Path, ca_cert: x509.Certificate) -> dict[int, dt.datetime]:
    """The revoked serials of the CRL at ``path``, after checking that ``ca_cert`` signed it
    (otherwise anyone able to write the file could un-revoke a child)."""
    crl = load_crl(path)
    if crl.issuer != ca_cert.subject or not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise PemError(
            f"revocation list {path} is not signed by the CA {ca_cert.subject.rfc4514_string()}"
        )
    return revoked_serials(crl)
