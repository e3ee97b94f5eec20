"""The certificate authority: a self-signed ECDSA P-256 root that signs the master's and the
children's certificates and the revocation list.

P-256 (with SHA-256) rather than Ed25519: BoringSSL inside grpcio accepts it on every platform for
TLS 1.2 and 1.3, while Ed25519 certificates are not accepted by all TLS peers.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedenc.security.defaults import CA_DAYS
from fedenc.security.errors import PemError
from fedenc.security.layout import CertLayout
from fedenc.security.pem import PrivateKey, key_matches, load_certificate, load_private_key
from fedenc.security.validity import require_valid, validity_window

SIGNATURE_HASH = hashes.SHA256()


def new_private_key() -> PrivateKey:
    """A fresh ECDSA P-256 private key (the one key type fedenc issues)."""
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def name(self) -> x509.Name:
        return self.cert.subject


def create_ca(
    common_name: str = "fedenc CA",
    *,
    days: int = CA_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertificateAuthority:
    """A new self-signed root CA that may sign leaf certificates only (path length 0)."""
    key = new_private_key()
    start, end = validity_window(days, not_before, not_after)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedenc"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, SIGNATURE_HASH)
    )
    return CertificateAuthority(cert, key)


def load_ca_certificate(layout: CertLayout) -> x509.Certificate:
    """The CA certificate of ``layout`` (no key needed: what masters and children load)."""
    hint = f" (create one with `fedenc certs init --dir {layout.root}`)"
    cert = load_certificate(layout.ca_cert, "CA certificate", hint)
    _require_ca(cert, str(layout.ca_cert))
    return cert


def load_ca(layout: CertLayout) -> CertificateAuthority:
    """CA certificate and key of ``layout``, checked to belong together and to be valid now."""
    cert = load_ca_certificate(layout)
    key = load_private_key(
        layout.ca_key,
        "CA private key",
        " (issue and revoke need the CA key; run them where it is kept)",
    )
    if not key_matches(key, cert):
        raise PemError(
            f"CA private key {layout.ca_key} does not match CA certificate {layout.ca_cert}"
        )
    require_valid(
        cert,
        f"CA certificate {layout.ca_cert}",
        "; create a new CA with `fedenc certs init --force`",
    )
    return CertificateAuthority(cert, key)


def _require_ca(cert: x509.Certificate, where: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PemError(
            f"{where} is not a CA certificate (did you swap it with a leaf certificate?)"
        )


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """Whether ``cert`` names ``ca_cert`` as issuer and carries a valid signature by its key."""
    if cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
