"""The CA, the master's and the children's certificates: chain, SANs, usages, validity."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from security_helpers import NOW, PAST

from fedenc.security.ca import CertificateAuthority, create_ca, issued_by
from fedenc.security.issue import (
    issue_child_certificate,
    issue_master_certificate,
    parse_hosts,
)
from fedenc.security.naming import child_name_of, common_name, validate_child_name


def ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def test_ca_is_a_self_signed_p256_root_limited_to_leaves(ca: CertificateAuthority) -> None:
    assert isinstance(ca.key.curve, ec.SECP256R1)
    assert issued_by(ca.cert, ca.cert)
    constraints = ext(ca.cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(ca.cert, x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert ca.cert.not_valid_after_utc - NOW > dt.timedelta(days=3000)


def test_master_certificate_chains_to_the_ca_with_dns_and_ip_sans(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    master = issue_master_certificate(ca, ["fedenc.example.org", "10.0.0.7", "::1"], days=30)
    assert issued_by(master.cert, ca.cert)
    assert not issued_by(master.cert, other_ca.cert)
    san = ext(master.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fedenc.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    assert list(ext(master.cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not ext(master.cert, x509.BasicConstraints).value.ca
    assert child_name_of(master.cert) is None  # a master certificate is no child identity
    lifetime = master.cert.not_valid_after_utc - master.cert.not_valid_before_utc
    assert dt.timedelta(days=30) <= lifetime <= dt.timedelta(days=30, minutes=11)


def test_master_defaults_to_localhost_and_loopback(ca: CertificateAuthority) -> None:
    san = ext(issue_master_certificate(ca).cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_child_certificate_carries_its_name_in_cn_and_uri(ca: CertificateAuthority) -> None:
    child = issue_child_certificate(ca, "hospital-3")
    assert issued_by(child.cert, ca.cert)
    assert common_name(child.cert) == "hospital-3"
    san = ext(child.cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["fedenc://child/hospital-3"]
    assert child_name_of(child.cert) == "hospital-3"
    assert list(ext(child.cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert child.cert.serial_number != issue_child_certificate(ca, "hospital-3").cert.serial_number


def test_explicit_validity_window_for_tests(ca: CertificateAuthority) -> None:
    child = issue_child_certificate(ca, "old", **PAST)
    assert child.cert.not_valid_after_utc == PAST["not_after"].replace(microsecond=0)
    with pytest.raises(ValueError, match="must be after"):
        issue_child_certificate(ca, "x", not_before=NOW, not_after=NOW - dt.timedelta(days=1))
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_child_certificate(ca, "x", not_before=dt.datetime(2020, 1, 1))


def test_leaf_never_outlives_its_ca() -> None:
    short = create_ca(days=10)
    child = issue_child_certificate(short, "c", days=365)
    assert child.cert.not_valid_after_utc == short.cert.not_valid_after_utc


@pytest.mark.parametrize("bad", ["", "../evil", ".hidden", "a/b", "a b", "-x", "é", "x" * 65])
def test_bad_child_names_are_refused(bad: str, ca: CertificateAuthority) -> None:
    with pytest.raises(ValueError, match="invalid child name"):
        validate_child_name(bad)
    with pytest.raises(ValueError, match="invalid child name"):
        issue_child_certificate(ca, bad)


def test_parse_hosts() -> None:
    names = parse_hosts(["Master.Local", "192.168.1.2", "[::1]", " "])
    assert [n.value for n in names] == [
        "master.local",
        ipaddress.ip_address("192.168.1.2"),
        ipaddress.ip_address("::1"),
    ]
    with pytest.raises(ValueError, match="invalid master host"):
        parse_hosts(["host:8080"])
    with pytest.raises(ValueError, match="at least one"):
        parse_hosts([])
