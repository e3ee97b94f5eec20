"""Where :mod:`fedenc.security` keeps its files (the ``--dir`` of ``fedenc certs``).

::

    certs/
      ca.pem            CA certificate: every node needs it (public)
      ca.key            CA private key: only for issue / revoke; keep it off the nodes if you can
      crl.pem           revocation list signed by the CA; the master reloads it when it changes
      master.pem        master's server certificate (SANs: its DNS names and IP addresses)
      master.key
      children/
        NAME.pem        a child's client certificate (CN=NAME, URI SAN fedenc://child/NAME)
        NAME.key

A child's machine needs only ``ca.pem``, ``NAME.pem`` and ``NAME.key``; they may sit either in
``children/`` as above or directly in the directory (see :meth:`CertLayout.find_child`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedenc.security.naming import validate_child_name


@dataclass(frozen=True)
class CertLayout:
    """The file names under one certificates directory."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def master_cert(self) -> Path:
        return self.root / "master.pem"

    @property
    def master_key(self) -> Path:
        return self.root / "master.key"

    @property
    def children_dir(self) -> Path:
        return self.root / "children"

    def child_cert(self, name: str) -> Path:
        return self.children_dir / f"{validate_child_name(name)}.pem"

    def child_key(self, name: str) -> Path:
        return self.children_dir / f"{validate_child_name(name)}.key"

    def find_child(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of child ``name``: ``children/NAME.*`` if present, else ``NAME.*``
        directly under the root (the flat bundle a child's machine receives)."""
        cert, key = self.child_cert(name), self.child_key(name)
        if cert.exists() or key.exists():
            return cert, key
        flat_cert, flat_key = self.root / cert.name, self.root / key.name
        if flat_cert.exists() or flat_key.exists():
            return flat_cert, flat_key
        return cert, key

    def child_names(self) -> list[str]:
        """Names of the children with a certificate under ``children/``, sorted."""
        if not self.children_dir.is_dir():
            return []
        return sorted(p.stem for p in self.children_dir.glob("*.pem"))
