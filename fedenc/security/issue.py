"""Leaf certificates signed by the CA: the master's server certificate and each child's client
certificate. Each gets a fresh P-256 key and a random serial (what revocation refers to)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
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


def _leaf(
    ca: CertificateAuthority,
    common_name: str,
    san: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> IssuedCertificate:
    key = new_private_key()
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
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca.key, SIGNATURE_HASH)
    )
    return IssuedCertificate(cert, key)


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
    return _leaf(ca, str(first), san, ExtendedKeyUsageOID.SERVER_AUTH, days, not_before, not_after)


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
    return _leaf(ca, name, san, ExtendedKeyUsageOID.CLIENT_AUTH, days, not_before, not_after)
