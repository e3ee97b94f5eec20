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
