"""The operations behind ``fedenc certs``, on one certificates directory (:class:`CertLayout`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedenc.security.ca import CertificateAuthority, create_ca, load_ca
from fedenc.security.defaults import CA_DAYS, CHILD_DAYS, DEFAULT_MASTER_HOSTS, MASTER_DAYS
from fedenc.security.errors import KeyExistsError, PemError
from fedenc.security.issue import (
    IssuedCertificate,
    child_request,
    issue_child_certificate,
    issue_master_certificate,
    sign_child_request,
)
from fedenc.security.layout import CertLayout
from fedenc.security.pem import (
    load_certificate,
    load_crl,
    load_request,
    write_certificate,
    write_crl,
    write_private_key,
    write_request,
)
from fedenc.security.revocation import build_crl, revoke, revoked_serials
from fedenc.security.validity import utcnow


def _save(cert_path: Path, key_path: Path, issued: IssuedCertificate, force: bool) -> None:
    # Key first: if it must not be overwritten, nothing is written at all.
    write_private_key(key_path, issued.key, force=force)
    write_certificate(cert_path, issued.cert)


def init_certs(
    layout: CertLayout,
    *,
    master_hosts: Sequence[str] = DEFAULT_MASTER_HOSTS,
    days: int = MASTER_DAYS,
    ca_days: int = CA_DAYS,
    force: bool = False,
) -> CertificateAuthority:
    """A new CA, its (empty) revocation list and the master's certificate under ``layout``."""
    for key in (layout.ca_key, layout.master_key):
        if key.exists() and not force:
            raise KeyExistsError(
                f"{key} already exists: {layout.root} holds a CA. Use `fedenc certs master` to "
                "reissue the master certificate, or --force to replace the CA (every certificate "
                "it issued stops working)"
            )
    ca = create_ca(days=ca_days)
    master = issue_master_certificate(ca, master_hosts, days=days)  # bad hosts fail before writing
    write_private_key(layout.ca_key, ca.key, force=force)
    write_certificate(layout.ca_cert, ca.cert)
    write_crl(layout.crl, build_crl(ca))
    _save(layout.master_cert, layout.master_key, master, force)
    return ca


def issue_master(
    layout: CertLayout,
    *,
    master_hosts: Sequence[str] = DEFAULT_MASTER_HOSTS,
    days: int = MASTER_DAYS,
    force: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """(Re)issue the master's certificate with the CA of ``layout``."""
    ca = load_ca(layout)
    issued = issue_master_certificate(
        ca, master_hosts, days=days, not_before=not_before, not_after=not_after
    )
    _save(layout.master_cert, layout.master_key, issued, force)
    return issued


def issue_child(
    layout: CertLayout,
    name: str,
    *,
    days: int = CHILD_DAYS,
    force: bool = False,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """Issue child ``name``'s certificate into ``children/NAME.pem`` and ``NAME.key``."""
    ca = load_ca(layout)
    cert_path, key_path = layout.child_cert(name), layout.child_key(name)
    if key_path.exists() and not force:
        raise KeyExistsError(
            f"child {name!r} already has a key ({key_path}); pass --force to issue a new one "
            f"(revoke the old certificate with `fedenc certs revoke {name}` if it may be misused)"
        )
    issued = issue_child_certificate(
        ca, name, days=days, not_before=not_before, not_after=not_after
    )
    _save(cert_path, key_path, issued, force)
    return issued


def _load_crl_entries(
    layout: CertLayout, ca: CertificateAuthority
) -> x509.CertificateRevocationList | None:
    if not layout.crl.exists():
        return None
    crl = load_crl(layout.crl)
    if not crl.is_signature_valid(ca.cert.public_key()):  # type: ignore[arg-type]
        raise PemError(f"revocation list {layout.crl} is not signed by the CA in {layout.ca_cert}")
    return crl


def revoke_child(layout: CertLayout, name: str | None = None, *, serial: int | None = None) -> int:
    """Add child ``name``'s current certificate (or the certificate with ``serial``) to the
    revocation list; returns the revoked serial. Revoking twice is harmless."""
    ca = load_ca(layout)
    if serial is None:
        if name is None:
            raise ValueError("give a child name or a serial to revoke")
        cert = load_certificate(
            layout.child_cert(name),
            f"certificate of child {name!r}",
            " (revoke a certificate that is not on disk with --serial)",
        )
        serial = cert.serial_number
    write_crl(layout.crl, revoke(ca, _load_crl_entries(layout, ca), serial))
    return serial


@dataclass(frozen=True)
class CertInfo:
    """One row of ``fedenc certs list``."""

    name: str
    role: str  # "ca", "master" or "child"
    serial: int
    not_after: dt.datetime
    revoked: dt.datetime | None

    @property
    def expired(self) -> bool:
        return utcnow() > self.not_after


def list_certificates(layout: CertLayout) -> list[CertInfo]:
    """The master's and every child's certificate under ``layout`` with revocation status."""
    ca_cert = load_certificate(
        layout.ca_cert,
        "CA certificate",
        f" (create one with `fedenc certs init --dir {layout.root}`)",
    )
    revoked: dict[int, dt.datetime] = {}
    if layout.crl.exists():
        crl = load_crl(layout.crl)
        if crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
            revoked = revoked_serials(crl)
        else:
            raise PemError(
                f"revocation list {layout.crl} is not signed by the CA in {layout.ca_cert}"
            )
    rows = [CertInfo("ca", "ca", ca_cert.serial_number, ca_cert.not_valid_after_utc, None)]
    paths: list[tuple[str, str, Path]] = []
    if layout.master_cert.exists():
        paths.append(("master", "master", layout.master_cert))
    paths += [(name, "child", layout.child_cert(name)) for name in layout.child_names()]
    for name, role, path in paths:
        cert = load_certificate(path, f"{role} certificate")
        serial = cert.serial_number
        rows.append(CertInfo(name, role, serial, cert.not_valid_after_utc, revoked.get(serial)))
    return rows


def request_child(layout: CertLayout, name: str, *, force: bool = False) -> Path:
    """On the child's site: a new key in ``children/NAME.key`` and the signing request to send
    to the federation's operator in ``children/NAME.csr`` (returned). The key never leaves."""
    key_path = layout.child_key(name)
    if key_path.exists() and not force:
        raise KeyExistsError(
            f"child {name!r} already has a key ({key_path}); pass --force to make a new one"
        )
    csr, key = child_request(name)
    csr_path = layout.children_dir / f"{name}.csr"
    write_private_key(key_path, key, force=force)
    write_request(csr_path, csr)
    return csr_path


def sign_request(
    layout: CertLayout,
    request: Path,
    name: str,
    *,
    days: int = CHILD_DAYS,
    out: Path | None = None,
    force: bool = False,
) -> tuple[x509.Certificate, Path, int | None]:
    """On the operator's machine: child ``name``'s certificate for the request in ``request``
    (which must name ``name``: the file's name proves nothing), kept in ``children/NAME.pem``
    (what ``fedenc certs revoke NAME`` reads) and at ``out``. With ``force`` it replaces the
    child's current certificate and revokes it (a site that re-keys: the old key may be lost).
    Returns the certificate, where it was written for the child, and the revoked serial."""
    ca = load_ca(layout)
    csr = load_request(request)
    try:
        asked, cert = sign_child_request(ca, csr, days=days)
    except ValueError as err:
        raise PemError(f"{request}: {err}") from None
    if asked != name:
        raise PemError(
            f"{request} asks for a certificate of child {asked!r}, not {name!r}: refusing to sign"
        )
    kept = layout.child_cert(name)
    revoked = None
    if kept.exists():
        if not force:
            raise KeyExistsError(
                f"child {name!r} already has a certificate ({kept}); pass --force to replace "
                "it (the current one is revoked then)"
            )
        revoked = revoke_child(layout, name)  # before kept is replaced: revoke reads it
    target = out if out is not None else request.parent / f"{name}.pem"
    ca_files = {layout.ca_cert, layout.ca_key, layout.crl, layout.master_cert, layout.master_key}
    if target.resolve() in {p.resolve() for p in ca_files}:
        raise PemError(f"refusing to write the child's certificate over {target}")
    if target.resolve() != kept.resolve() and target.exists() and not force:
        raise KeyExistsError(f"{target} exists; pass --force to replace it, or --out elsewhere")
    kept.parent.mkdir(parents=True, exist_ok=True)
    write_certificate(kept, cert)
    if target.resolve() != kept.resolve():
        write_certificate(target, cert)
    return cert, target, revoked
