"""Loading the master's and a child's TLS material: checks before gRPC sees it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from security_helpers import FUTURE

from fedenc.security.ca import CertificateAuthority
from fedenc.security.credentials import channel_credentials, load_child_tls, load_master_tls
from fedenc.security.errors import PemError
from fedenc.security.issue import issue_child_certificate
from fedenc.security.layout import CertLayout
from fedenc.security.pem import write_certificate, write_private_key
from fedenc.security.rpc_errors import explain_rpc_error
from fedenc.security.store import init_certs, issue_child, issue_master


def test_master_tls_loads_and_names_missing_files(layout: CertLayout, tmp_path: Path) -> None:
    tls = load_master_tls(layout.root, allowlist=["alice"])
    assert tls.credentials is not None and tls.verifier.allowlist == frozenset({"alice"})
    layout.master_key.unlink()
    with pytest.raises(PemError, match=r"master private key not found: .*fedenc certs init"):
        load_master_tls(layout.root)
    with pytest.raises(PemError, match=r"CA certificate not found: .*fedenc certs init"):
        load_master_tls(tmp_path / "nowhere")


def test_swapped_mismatched_and_foreign_files_are_named(
    layout: CertLayout, other_ca: CertificateAuthority
) -> None:
    issue_child(layout, "alice")
    cert, key = layout.child_cert("alice"), layout.child_key("alice")
    shutil.copy(layout.master_key, key)
    with pytest.raises(PemError, match=r"private key .* does not match certificate"):
        load_child_tls(layout.root, "alice")
    stranger = issue_child_certificate(other_ca, "alice")
    write_certificate(cert, stranger.cert)
    write_private_key(key, stranger.key, force=True)
    with pytest.raises(PemError, match="not signed by the CA in use"):
        load_child_tls(layout.root, "alice")
    shutil.copy(layout.master_cert, layout.ca_cert)
    with pytest.raises(PemError, match="is not a CA certificate"):
        load_master_tls(layout.root)


def test_child_checks_its_own_validity_and_name(layout: CertLayout) -> None:
    issue_child(layout, "early", **FUTURE)
    with pytest.raises(PemError, match="not valid before"):
        load_child_tls(layout.root, "early")
    issue_child(layout, "alice")
    shutil.copy(layout.child_cert("alice"), layout.child_cert("early"))
    shutil.copy(layout.child_key("alice"), layout.child_key("early"))
    with pytest.raises(PemError, match="belongs to 'alice', not to child 'early'"):
        load_child_tls(layout.root, "early")


def test_flat_child_bundle(layout: CertLayout, tmp_path: Path) -> None:
    """A child's machine holds ca.pem, NAME.pem and NAME.key in one directory."""
    issue_child(layout, "alice")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for src in (layout.ca_cert, layout.child_cert("alice"), layout.child_key("alice")):
        shutil.copy2(src, bundle / src.name)
    tls = load_child_tls(bundle, "alice", server_name="master.lan")
    assert tls.name == "alice"
    assert tls.options == (("grpc.ssl_target_name_override", "master.lan"),)


def test_master_certificate_reissue_needs_the_ca(tmp_path: Path) -> None:
    layout = CertLayout(tmp_path / "c")
    init_certs(layout)
    layout.ca_key.unlink()
    with pytest.raises(PemError, match="CA private key not found"):
        issue_master(layout, force=True)


def test_channel_credentials_need_cert_and_key_together(layout: CertLayout) -> None:
    with pytest.raises(ValueError, match="both"):
        channel_credentials(ca_cert=layout.ca_cert.read_bytes(), cert=b"x")


def test_explain_falls_back_to_code_and_details() -> None:
    class Err(Exception):
        def code(self) -> object:
            class Code:
                name = "DEADLINE_EXCEEDED"

            return Code()

        def details(self) -> str:
            return "Deadline Exceeded"

    assert explain_rpc_error(Err()) == "DEADLINE_EXCEEDED: Deadline Exceeded"
