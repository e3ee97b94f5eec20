"""``fedenc certs`` through typer's CliRunner."""

from __future__ import annotations

import stat
from pathlib import Path

from typer.testing import CliRunner

from fedenc.cli import app
from fedenc.security.ca import issued_by
from fedenc.security.credentials import load_child_tls, load_master_tls
from fedenc.security.layout import CertLayout
from fedenc.security.naming import child_name_of
from fedenc.security.pem import load_certificate
from fedenc.security.revocation import load_revocation_list

runner = CliRunner()


def flat(text: str) -> str:
    """Output without whitespace (rich wraps at the console width)."""
    return "".join(text.split())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certs(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["certs", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_init_issue_revoke_list(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    code, out = certs(
        "init", "--dir", str(d), "--master-host", "master.lan", "--master-host", "10.1.2.3"
    )
    assert code == 0, out
    layout = CertLayout(d)
    for key in (layout.ca_key, layout.master_key):
        assert mode(key) == 0o600
    for public in (layout.ca_cert, layout.master_cert, layout.crl):
        assert mode(public) == 0o644
    master = load_certificate(layout.master_cert)
    assert issued_by(master, load_certificate(layout.ca_cert))
    assert "master.lan" in master.subject.rfc4514_string()

    code, out = certs("issue", "alice", "--dir", str(d), "--days", "7")
    assert code == 0, out
    assert mode(layout.child_key("alice")) == 0o600 and mode(layout.child_cert("alice")) == 0o644
    alice = load_certificate(layout.child_cert("alice"))
    assert child_name_of(alice) == "alice"
    lifetime = alice.not_valid_after_utc - alice.not_valid_before_utc
    assert 7 * 86400 <= lifetime.total_seconds() <= 7 * 86400 + 700
    assert certs("issue", "bob", "--dir", str(d))[0] == 0
    load_master_tls(d)
    load_child_tls(d, "alice")

    code, out = certs("revoke", "alice", "--dir", str(d))
    assert code == 0, out
    assert f"{alice.serial_number:x}" in flat(out)
    assert alice.serial_number in load_revocation_list(layout.crl, load_certificate(layout.ca_cert))

    code, out = certs("list", "--dir", str(d))
    assert code == 0, out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 5}
    assert set(rows) >= {"ca", "master", "alice", "bob"}
    assert "revoked" in rows["alice"] and "valid" in rows["bob"]
    assert f"{alice.serial_number:x}"[:8] in flat(out)


def test_existing_keys_are_not_overwritten_without_force(tmp_path: Path) -> None:
    d = str(tmp_path / "certs")
    assert certs("init", "--dir", d)[0] == 0
    ca_before = (tmp_path / "certs" / "ca.key").read_bytes()
    code, out = certs("init", "--dir", d)
    assert code == 2 and "already exists" in out and "--force" in out
    assert (tmp_path / "certs" / "ca.key").read_bytes() == ca_before
    assert certs("issue", "alice", "--dir", d)[0] == 0
    code, out = certs("issue", "alice", "--dir", d)
    assert code == 2 and "--force" in out
    assert certs("issue", "alice", "--dir", d, "--force")[0] == 0
    assert certs("init", "--dir", d, "--force")[0] == 0
    assert (tmp_path / "certs" / "ca.key").read_bytes() != ca_before
    assert mode(tmp_path / "certs" / "ca.key") == 0o600


def test_master_reissue_and_revoke_by_serial(tmp_path: Path) -> None:
    d = tmp_path / "certs"
    assert certs("init", "--dir", str(d))[0] == 0
    code, out = certs("master", "--dir", str(d), "--master-host", "new.example", "--force")
    assert code == 0, out
    assert "new.example" in load_certificate(d / "master.pem").subject.rfc4514_string()
    code, out = certs("revoke", "--serial", "1f", "--dir", str(d))
    assert code == 0, out
    assert 0x1F in load_revocation_list(d / "crl.pem", load_certificate(d / "ca.pem"))


def test_clear_errors(tmp_path: Path) -> None:
    d = str(tmp_path / "none")
    code, out = certs("issue", "alice", "--dir", d)
    assert code == 2 and "CA certificate not found" in out and "`fedenc certs init --dir" in out
    assert certs("init", "--dir", d)[0] == 0
    code, out = certs("issue", "../x", "--dir", d)
    assert code == 2 and "invalid child name" in out
    code, out = certs("revoke", "carol", "--dir", d)
    assert code == 2 and "not found" in out
    code, out = certs("revoke", "--dir", d)
    assert code == 2 and "either" in out
    code, out = certs("init", "--dir", str(tmp_path / "x"), "--master-host", "a:1")
    assert code == 2 and "invalid master host" in out
    assert not (tmp_path / "x" / "ca.key").exists()  # nothing written on bad input
    code, out = certs("list", "--dir", str(tmp_path / "empty"))
    assert code == 2 and "`fedenc certs init --dir" in out


def test_a_child_keeps_its_key_the_operator_signs_its_request(tmp_path: Path) -> None:
    # The operator used to make every child's private key and ship it; with a request, the key
    # is made at the site and never travels.
    import shutil

    ca_dir, site = tmp_path / "ca", tmp_path / "site-a"
    assert certs("init", "--dir", str(ca_dir))[0] == 0
    code, out = certs("request", "site-a", "--dir", str(site))
    assert code == 0, out
    key, csr = site / "children" / "site-a.key", site / "children" / "site-a.csr"
    assert mode(key) == 0o600 and csr.is_file()
    assert "fedenccertssignsite-a.csr--namesite-a" in flat(out)
    code, out = certs("sign", str(csr), "--name", "site-a", "--dir", str(ca_dir))
    assert code == 0, out
    issued = site / "children" / "site-a.pem"  # next to the request, for the child
    cert = load_certificate(issued)
    assert child_name_of(cert) == "site-a" and (ca_dir / "children" / "site-a.pem").is_file()
    assert not (ca_dir / "children" / "site-a.key").exists()  # the operator never saw it
    shutil.copy(ca_dir / "ca.pem", site / "ca.pem")
    load_child_tls(site, "site-a")  # a working credential: the site's key with the CA's cert
    # A request is signed for the name the operator gives, not the one a file suggests.
    code, out = certs("sign", str(csr), "--name", "operator", "--dir", str(ca_dir))
    assert code != 0 and "asksforacertificateofchild'site-a',not'operator'" in flat(out)
    # Signing the same child again needs --force, which revokes the certificate it replaces.
    code, out = certs("sign", str(csr), "--name", "site-a", "--dir", str(ca_dir))
    assert code != 0 and "alreadyhasacertificate" in flat(out)
    code, out = certs("sign", str(csr), "--name", "site-a", "--dir", str(ca_dir), "--force")
    assert code == 0 and f"serial{cert.serial_number:x})isrevoked" in flat(out)
    revoked = load_revocation_list(ca_dir / "crl.pem", load_certificate(ca_dir / "ca.pem"))
    assert cert.serial_number in revoked
    # The certificate never lands on the CA's own files, whatever --out or the file's name says.
    code, out = certs(
        "sign",
        str(csr),
        "--name",
        "site-a",
        "--dir",
        str(ca_dir),
        "--force",
        "--out",
        str(ca_dir / "ca.pem"),
    )
    assert code != 0 and "refusingtowritethechild'scertificateover" in flat(out)
    assert child_name_of(load_certificate(ca_dir / "ca.pem")) is None  # still the CA
    # A damaged request is refused by name.
    csr.write_text(csr.read_text().replace("A", "B", 5))
    code, out = certs("sign", str(csr), "--name", "site-a", "--dir", str(ca_dir), "--force")
    assert code != 0 and "site-a.csr" in flat(out)


def test_a_request_for_more_than_a_child_certificate_is_refused(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_dir = tmp_path / "ca"
    assert certs("init", "--dir", str(ca_dir))[0] == 0
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mallory")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("fedenc://child/mallory"), x509.DNSName("bank.com")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "mallory.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    code, out = certs("sign", str(path), "--name", "mallory", "--dir", str(ca_dir))
    assert code != 0 and "asksforothernamestoo" in flat(out)
    assert not (ca_dir / "children" / "mallory.pem").exists()
