"""Reading and writing PEM files: private keys 0600, certificates and CRLs 0644, clear errors.

Files are written atomically (a temporary file in the same directory, then ``os.replace``), and
the temporary file is *created* with its final mode, so a private key is never readable by others,
not even for an instant (``chmod`` after writing would leave that window open).
"""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedenc import atomic
from fedenc.security.errors import KeyExistsError, PemError

log = logging.getLogger(__name__)

KEY_MODE = 0o600
#: A signing request is a few hundred bytes.
MAX_REQUEST_BYTES = 64 * 1024
PUBLIC_MODE = 0o644

PrivateKey = ec.EllipticCurvePrivateKey

_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")


def pem_labels(data: bytes) -> list[str]:
    """The ``-----BEGIN X-----`` labels found in ``data`` (e.g. ``["CERTIFICATE"]``)."""
    return [m.group(1).decode("ascii") for m in _BEGIN.finditer(data)]


def _describe(labels: list[str]) -> str:
    if not labels:
        return "no PEM block at all"
    kinds = []
    for label in labels:
        if "PRIVATE KEY" in label:
            kinds.append("a private key")
        elif label == "CERTIFICATE":
            kinds.append("a certificate")
        elif label == "X509 CRL":
            kinds.append("a revocation list (CRL)")
        else:
            kinds.append(f"a {label!r} block")
    return ", ".join(dict.fromkeys(kinds))


def read_pem(path: Path, what: str, expected_label: str, hint: str = "") -> bytes:
    """The bytes of the PEM file at ``path``; ``what`` names it in errors ("CA certificate")."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PemError(f"{what} not found: {path}{hint}") from None
    except IsADirectoryError:
        raise PemError(f"{what} {path} is a directory, expected a PEM file") from None
    except PermissionError:
        raise PemError(f"{what} {path} is not readable by this user") from None
    labels = pem_labels(data)
    if not any(expected_label in label for label in labels):
        raise PemError(
            f"{what} {path} is not a PEM {expected_label.lower()}: it holds {_describe(labels)}"
        )
    return data


def load_certificate(path: Path, what: str = "certificate", hint: str = "") -> x509.Certificate:
    """Parse the first certificate of the PEM file at ``path``."""
    data = read_pem(path, what, "CERTIFICATE", hint)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise PemError(f"{what} {path} is not a valid PEM certificate: {err}") from None


def load_private_key(path: Path, what: str = "private key", hint: str = "") -> PrivateKey:
    """Parse the unencrypted EC private key at ``path``; warns when others can read the file."""
    data = read_pem(path, what, "PRIVATE KEY", hint)
    if "ENCRYPTED PRIVATE KEY" in pem_labels(data):
        raise PemError(
            f"{what} {path} is encrypted; fedenc expects an unencrypted key file (mode 0600)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise PemError(f"{what} {path} is not a valid PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PemError(f"{what} {path} is a {type(key).__name__}; fedenc uses ECDSA P-256 keys")
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if mode & 0o077:
        # Like ssh, point it out; refusing outright would break read-only mounts of secrets.
        log.warning(
            "%s %s is readable by group/others (mode %04o); run chmod 600", what, path, mode
        )
    return key


def load_crl(path: Path, what: str = "revocation list") -> x509.CertificateRevocationList:
    """Parse the PEM CRL at ``path``."""
    data = read_pem(path, what, "X509 CRL")
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as err:
        raise PemError(f"{what} {path} is not a valid PEM CRL: {err}") from None


def load_request(
    path: Path, what: str = "certificate signing request"
) -> x509.CertificateSigningRequest:
    """Parse the PEM certificate signing request at ``path`` (at most
    :data:`MAX_REQUEST_BYTES`: a larger file is not one, and is not read whole)."""
    try:
        size = Path(path).stat().st_size
    except OSError:
        size = 0  # read_pem names what is wrong with it
    if size > MAX_REQUEST_BYTES:
        raise PemError(f"{path} has {size:,} bytes: not a signing request (at most 64 KiB)")
    data = read_pem(path, what, "CERTIFICATE REQUEST")
    try:
        return x509.load_pem_x509_csr(data)
    except ValueError as err:
        raise PemError(f"{path}: not a readable {what} ({err})") from None


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, raw) == cert.public_key().public_bytes(der, raw)


def write_private_key(path: Path, key: PrivateKey, *, force: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600; refuse to overwrite unless ``force``."""
    path = Path(path)
    if path.exists() and not force:
        raise KeyExistsError(f"refusing to overwrite existing private key {path} (pass --force)")
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    atomic.write_bytes(path, data, KEY_MODE)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Write ``cert`` as PEM with mode 0644 (certificates are public)."""
    atomic.write_bytes(Path(path), cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


def write_request(path: Path, csr: x509.CertificateSigningRequest) -> None:
    """Write ``csr`` as PEM with mode 0644 (a request holds only the public key)."""
    atomic.write_bytes(Path(path), csr.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


def write_crl(path: Path, crl: x509.CertificateRevocationList) -> None:
    """Write ``crl`` as PEM with mode 0644."""
    atomic.write_bytes(Path(path), crl.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


def pem_bytes(obj: x509.Certificate | PrivateKey) -> bytes:
    """PEM encoding of a certificate or (unencrypted) private key, as gRPC wants it."""
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
