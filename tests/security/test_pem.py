"""PEM files: modes, refusing to overwrite keys, and clear errors on bad input."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedenc.security.ca import CertificateAuthority, new_private_key
from fedenc.security.errors import KeyExistsError, PemError
from fedenc.security.pem import (
    key_matches,
    load_certificate,
    load_crl,
    load_private_key,
    write_certificate,
    write_private_key,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keys_are_0600_and_certificates_0644_whatever_the_umask(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    import os

    old = os.umask(0o000)  # a permissive umask must not widen the key's mode
    try:
        write_private_key(tmp_path / "a.key", ca.key)
        write_certificate(tmp_path / "a.pem", ca.cert)
    finally:
        os.umask(old)
    old = os.umask(0o077)  # a strict one must not hide the (public) certificate
    try:
        write_certificate(tmp_path / "b.pem", ca.cert)
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.key") == 0o600
    assert mode(tmp_path / "a.pem") == 0o644
    assert mode(tmp_path / "b.pem") == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_key_is_created_0600_not_chmodded_afterwards(
    tmp_path: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    modes: list[int] = []
    real_open = os.open

    def spy(path: str, flags: int, mode: int = 0o777, *args: object) -> int:
        if flags & os.O_CREAT:  # (the directory is opened too, to fsync the rename)
            modes.append(mode)
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", spy)
    monkeypatch.setattr(os, "chmod", lambda *a, **k: pytest.fail("chmod after writing"))
    write_private_key(tmp_path / "k.key", ca.key)
    assert modes == [0o600]


def test_refuses_to_overwrite_a_key_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    first, second = new_private_key(), new_private_key()
    write_private_key(path, first)
    with pytest.raises(KeyExistsError, match="--force"):
        write_private_key(path, second)
    assert load_private_key(path).private_numbers() == first.private_numbers()
    write_private_key(path, second, force=True)
    assert mode(path) == 0o600
    assert load_private_key(path).private_numbers() == second.private_numbers()


def test_missing_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(PemError, match=r"CA certificate not found: .*nope.pem \(run init\)"):
        load_certificate(tmp_path / "nope.pem", "CA certificate", " (run init)")


def test_wrong_kind_of_pem_is_named(tmp_path: Path, ca: CertificateAuthority) -> None:
    write_private_key(tmp_path / "k.key", ca.key)
    write_certificate(tmp_path / "c.pem", ca.cert)
    with pytest.raises(PemError, match="not a PEM certificate: it holds a private key"):
        load_certificate(tmp_path / "k.key")
    with pytest.raises(PemError, match="not a PEM private key: it holds a certificate"):
        load_private_key(tmp_path / "c.pem")
    with pytest.raises(PemError, match="not a PEM x509 crl: it holds a certificate"):
        load_crl(tmp_path / "c.pem")
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(PemError, match="no PEM block at all"):
        load_certificate(tmp_path / "junk")
    with pytest.raises(PemError, match="is a directory"):
        load_certificate(tmp_path)


def test_corrupt_encrypted_and_non_ec_keys_are_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(PemError, match="not a valid PEM certificate"):
        load_certificate(tmp_path / "bad.pem")
    encrypted = new_private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (tmp_path / "enc.key").write_bytes(encrypted)
    with pytest.raises(PemError, match="encrypted"):
        load_private_key(tmp_path / "enc.key")
    ed = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ed.key").write_bytes(ed)
    with pytest.raises(PemError, match="P-256"):
        load_private_key(tmp_path / "ed.key")


def test_world_readable_key_loads_with_a_warning(
    tmp_path: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k.key"
    write_private_key(path, ca.key)
    path.chmod(0o644)
    load_private_key(path)
    assert "chmod 600" in caplog.text


def test_key_matches(ca: CertificateAuthority, other_ca: CertificateAuthority) -> None:
    assert key_matches(ca.key, ca.cert)
    assert not key_matches(other_ca.key, ca.cert)
