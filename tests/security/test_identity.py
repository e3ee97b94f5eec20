"""The master's IdentityVerifier: CA, expiry, revocation and allowlist, each with its reason."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from security_helpers import FUTURE, PAST

from fedenc.security.ca import CertificateAuthority, create_ca
from fedenc.security.errors import IdentityError, IdentityReason, PemError
from fedenc.security.identity import IdentityVerifier, status_code_for
from fedenc.security.issue import issue_child_certificate, issue_master_certificate
from fedenc.security.layout import CertLayout
from fedenc.security.pem import load_certificate, pem_bytes, write_crl
from fedenc.security.revocation import build_crl, revoke
from fedenc.security.store import issue_child, revoke_child


class FakeContext:
    """The part of grpc.ServicerContext the verifier uses."""

    def __init__(self, auth: dict[str, list[bytes]]) -> None:
        self.auth = auth
        self.aborted: tuple[Any, str] | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth

    def abort(self, code: Any, details: str) -> None:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


def ctx_for(pem: bytes) -> FakeContext:
    return FakeContext({"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]})


def refused(verifier: IdentityVerifier, pem: bytes) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        verifier.verify_pem(pem)
    return info.value


def test_known_child_is_identified_by_name(ca: CertificateAuthority) -> None:
    child = issue_child_certificate(ca, "alice")
    verifier = IdentityVerifier(ca.cert)
    identity = verifier.verify_pem(pem_bytes(child.cert))
    assert identity.name == "alice" and identity.serial == child.cert.serial_number
    assert verifier.identify(ctx_for(pem_bytes(child.cert))) == "alice"
    assert verifier(ctx_for(pem_bytes(child.cert))) == "alice"  # the identity callback


def test_child_of_another_ca_is_unknown(
    ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    err = refused(
        IdentityVerifier(ca.cert), pem_bytes(issue_child_certificate(other_ca, "eve").cert)
    )
    assert err.reason is IdentityReason.UNKNOWN
    assert "not signed by this federation's CA" in str(err)
    assert str(err).startswith("fedenc identity refused (unknown): ")


def test_master_certificate_is_no_child_identity(ca: CertificateAuthority) -> None:
    err = refused(IdentityVerifier(ca.cert), pem_bytes(issue_master_certificate(ca).cert))
    assert err.reason is IdentityReason.UNKNOWN
    assert "not a child certificate" in str(err)


def test_expired_and_not_yet_valid_children_are_refused(ca: CertificateAuthority) -> None:
    verifier = IdentityVerifier(ca.cert)
    err = refused(verifier, pem_bytes(issue_child_certificate(ca, "old", **PAST).cert))
    assert err.reason is IdentityReason.EXPIRED and err.name == "old"
    assert "expired on" in str(err)
    err = refused(verifier, pem_bytes(issue_child_certificate(ca, "new", **FUTURE).cert))
    assert err.reason is IdentityReason.EXPIRED and "not valid before" in str(err)


def test_revoked_child_is_refused_and_the_crl_reloads(layout: CertLayout) -> None:
    issue_child(layout, "alice")
    issue_child(layout, "bob")
    alice = pem_bytes(load_certificate(layout.child_cert("alice")))
    bob = pem_bytes(load_certificate(layout.child_cert("bob")))
    verifier = IdentityVerifier.from_layout(layout)
    assert verifier.verify_pem(alice).name == "alice"
    serial = revoke_child(layout, "alice")
    _bump_mtime(layout.crl)
    err = refused(verifier, alice)  # same verifier: no restart needed
    assert err.reason is IdentityReason.REVOKED
    assert f"serial {serial:x}" in str(err) and "revoked on" in str(err)
    assert verifier.verify_pem(bob).name == "bob"
    admitted = verifier.verify_pem(bob)
    revoke_child(layout, "bob")
    _bump_mtime(layout.crl)
    with pytest.raises(IdentityError, match=r"\(revoked\)"):
        verifier.recheck(admitted)  # a long-lived stream is caught at its next re-check
    # A new certificate for the same name has a new serial, so it is accepted again.
    issue_child(layout, "alice", force=True)
    assert (
        verifier.verify_pem(pem_bytes(load_certificate(layout.child_cert("alice")))).name == "alice"
    )


def test_crl_not_signed_by_the_ca_is_rejected(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    forged = tmp_path / "crl.pem"
    write_crl(forged, build_crl(other_ca))
    with pytest.raises(PemError, match="not signed by the CA"):
        IdentityVerifier(ca.cert, crl=forged)


def test_a_crl_from_an_impostor_ca_with_the_same_name_is_rejected(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    # The issuer name matches: only the signature tells the impostor apart (an un-revoke).
    from cryptography.x509.oid import NameOID

    name = ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    impostor = create_ca(str(name))
    assert impostor.cert.subject == ca.cert.subject
    forged = tmp_path / "crl.pem"
    write_crl(forged, build_crl(impostor))
    with pytest.raises(PemError, match="not signed by the CA"):
        IdentityVerifier(ca.cert, crl=forged)


def test_bad_crl_update_keeps_the_previous_revocations(
    tmp_path: Path, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    child = issue_child_certificate(ca, "alice")
    path = tmp_path / "crl.pem"
    write_crl(path, revoke(ca, None, child.cert.serial_number))
    verifier = IdentityVerifier(ca.cert, crl=path)
    write_crl(path, build_crl(other_ca))  # someone tries to un-revoke with a forged, empty CRL
    _bump_mtime(path)
    assert refused(verifier, pem_bytes(child.cert)).reason is IdentityReason.REVOKED


def test_allowlist_from_names_and_from_a_reloaded_file(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    alice = pem_bytes(issue_child_certificate(ca, "alice").cert)
    bob = pem_bytes(issue_child_certificate(ca, "bob").cert)
    verifier = IdentityVerifier(ca.cert, allowlist=["alice"])
    assert verifier.verify_pem(alice).name == "alice"
    err = refused(verifier, bob)
    assert err.reason is IdentityReason.NOT_ALLOWLISTED
    assert "'bob' is not in this master's allowlist" in str(err)

    path = tmp_path / "allowlist.txt"
    path.write_text("# site A\nalice\n\n")
    verifier = IdentityVerifier(ca.cert, allowlist=path)
    assert refused(verifier, bob).reason is IdentityReason.NOT_ALLOWLISTED
    path.write_text("alice\nbob  # joined in May\n")
    _bump_mtime(path)
    assert verifier.verify_pem(bob).name == "bob"
    with pytest.raises(TypeError, match="not a str"):
        IdentityVerifier(ca.cert, allowlist="alice")


def test_bad_allowlist_is_reported_with_its_line(tmp_path: Path, ca: CertificateAuthority) -> None:
    path = tmp_path / "allow.txt"
    path.write_text("alice\n../etc\n")
    with pytest.raises(PemError, match=r"allow.txt:2: invalid child name"):
        IdentityVerifier(ca.cert, allowlist=path)
    with pytest.raises(PemError, match="allowlist not found"):
        IdentityVerifier(ca.cert, allowlist=tmp_path / "missing.txt")


def test_context_without_certificate_and_abort_codes(ca: CertificateAuthority) -> None:
    verifier = IdentityVerifier(ca.cert)
    plain = FakeContext({})
    with pytest.raises(IdentityError) as info:
        verifier.identify(plain)
    assert info.value.reason is IdentityReason.NO_CERTIFICATE
    assert "plaintext" in str(info.value)
    with pytest.raises(RuntimeError, match="aborted"):
        verifier.identify_or_abort(plain)
    assert plain.aborted is not None
    assert plain.aborted[0] == grpc.StatusCode.UNAUTHENTICATED
    assert plain.aborted[1].startswith("fedenc identity refused (no-certificate)")
    assert status_code_for(IdentityReason.REVOKED) == grpc.StatusCode.PERMISSION_DENIED
    assert status_code_for(IdentityReason.NOT_ALLOWLISTED) == grpc.StatusCode.PERMISSION_DENIED
    assert status_code_for(IdentityReason.EXPIRED) == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(IdentityError, match="unreadable peer certificate"):
        verifier.verify_pem(b"garbage")


def _bump_mtime(path: Path) -> None:
    # Two writes within the filesystem's timestamp granularity can share an mtime: make it differ.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
