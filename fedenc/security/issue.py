"""Leaf certificates signed by the CA: the master's server certificate and each child's client
certificate. Each gets a fresh P-256 key and a random serial (what revocation refers to)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedenc.security.ca import SIGNATURE_HASH, CertificateAuthority, new_private_key
from fedenc.security.defaults import CHILD_DAYS, DEFAULT_MASTER_HOSTS, MASTER_DAYS
from fedenc.security.naming import child_uri, validate_child_name
from fedenc.security.pem import PrivateKey
from fedenc.security.validity import validity_window


@dataclass(frozen=True)
class IssuedCertificate:
    """A leaf certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey


def parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for ``hosts``: IP addresses as IP SANs, anything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            if any(c in host for c in "/: ") or host.startswith("."):
                raise ValueError(
                    f"invalid master host {host!r}: give a DNS name or an IP address"
                ) from None
            names.append(x509.DNSName(host.lower()))
    if not names:
        raise ValueError("the master certificate needs at least one DNS name or IP address")
    return names


def _key_usage() -> x509.KeyUsage:
    # ECDSA leaves only sign the (EC)DHE handshake: digitalSignature is all they need.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_for(
    ca: CertificateAuthority,
    public_key: CertificatePublicKeyTypes,
    common_name: str,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> x509.Certificate:
    """A leaf for ``public_key`` (the CA's choice of every field: nothing of a request)."""
    start, end = validity_window(days, not_before, not_after)
    # A leaf must not outlive its CA: peers would refuse it after the CA expires anyway.
    end = min(end, ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedenc"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, SIGNATURE_HASH)
    )
    return cert


def issue_master_certificate(
    ca: CertificateAuthority,
    hosts: Sequence[str] = DEFAULT_MASTER_HOSTS,
    *,
    days: int = MASTER_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """The master's TLS server certificate, valid for the DNS names and IP addresses in ``hosts``
    (children must dial one of them, or override the target name)."""
    san = parse_hosts(hosts)
    first = san[0].value
    key = new_private_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH
    cert = _leaf_for(ca, key.public_key(), str(first), san, usage, days, not_before, not_after)
    return IssuedCertificate(cert, key)


def issue_child_certificate(
    ca: CertificateAuthority,
    name: str,
    *,
    days: int = CHILD_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """Child ``name``'s TLS client certificate: CN=NAME and URI SAN ``fedenc://child/NAME``."""
    validate_child_name(name)
    san: list[x509.GeneralName] = [x509.UniformResourceIdentifier(child_uri(name))]
    key = new_private_key()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH
    cert = _leaf_for(ca, key.public_key(), name, san, usage, days, not_before, not_after)
    return IssuedCertificate(cert, key)


_TLS_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def child_request(name: str) -> tuple[x509.CertificateSigningRequest, PrivateKey]:
    """A certificate signing request for child ``name`` and its new private key: the child's
    site makes both and sends only the request, so its key never leaves the site."""
    validate_child_name(name)
    key = new_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(child_uri(name))]),
            critical=False,
        )
        .sign(key, SIGNATURE_HASH)
    )
    return csr, key


def sign_child_request(
    ca: CertificateAuthority,
    csr: x509.CertificateSigningRequest,
    *,
    days: int = CHILD_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[str, x509.Certificate]:
    """The child certificate for a request made by :func:`child_request` (or any tool): its
    name (the request's common name) and a certificate the CA builds itself around the request's
    public key. The request must be self-signed by that key and name one valid child; whatever
    else it asks for (other names, CA rights, usages) is not copied."""
    if not csr.is_signature_valid:
        raise ValueError("the request's signature does not verify: damaged, or not made by its key")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError(f"the request must name one child (common name), it names {len(names)}")
    name = validate_child_name(str(names[0].value))
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        others = [g for g in san if not isinstance(g, x509.UniformResourceIdentifier)]
        if others or uris not in ([], [child_uri(name)]):
            raise ValueError(
                f"the request for child {name!r} asks for other names too ({san}); a child "
                f"certificate names only {child_uri(name)}"
            )
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _TLS_CURVES):
        raise ValueError(
            "the request's key must be an elliptic-curve key on P-256, P-384 or P-521 (what TLS "
            "peers accept)"
        )
    uri: list[x509.GeneralName] = [x509.UniformResourceIdentifier(child_uri(name))]
    usage = ExtendedKeyUsageOID.CLIENT_AUTH
    return name, _leaf_for(ca, key, name, uri, usage, days, not_before, not_after)
