"""gRPC TLS credentials for the master (server) and the children (clients).

The low-level builders take PEM bytes; :func:`load_master_tls` / :func:`load_child_tls` load them
from a certificates directory and check them first, so a mistake (swapped files, a key from another
certificate, an expired certificate, a certificate from another CA) is reported in plain words
before gRPC turns it into an opaque handshake failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from fedenc.security.ca import issued_by, load_ca_certificate
from fedenc.security.errors import PemError
from fedenc.security.identity import IdentityVerifier
from fedenc.security.layout import CertLayout
from fedenc.security.naming import child_name_of
from fedenc.security.pem import key_matches, load_certificate, load_private_key, pem_bytes
from fedenc.security.rpc_errors import explain_rpc_error
from fedenc.security.validity import require_valid


def server_credentials(
    *, ca_cert: bytes, cert: bytes, key: bytes, require_client_auth: bool = True
) -> Any:
    """``grpc.ServerCredentials`` presenting ``cert``/``key``; with ``require_client_auth`` (the
    default) the handshake demands a client certificate signed by ``ca_cert`` (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca_cert, require_client_auth=require_client_auth
    )


def channel_credentials(
    *, ca_cert: bytes, cert: bytes | None = None, key: bytes | None = None
) -> Any:
    """``grpc.ChannelCredentials`` trusting only ``ca_cert`` (not the system roots) and presenting
    ``cert``/``key`` as client certificate when given."""
    if (cert is None) != (key is None):
        raise ValueError("give both the client certificate and its key, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_cert, private_key=key, certificate_chain=cert
    )


def _load_leaf(
    cert_path: Path, key_path: Path, ca_cert: x509.Certificate, what: str, fix: str
) -> tuple[x509.Certificate, bytes, bytes]:
    cert = load_certificate(cert_path, f"{what} certificate", f" ({fix})")
    key = load_private_key(key_path, f"{what} private key", f" ({fix})")
    if not key_matches(key, cert):
        raise PemError(f"{what} private key {key_path} does not match certificate {cert_path}")
    if not issued_by(cert, ca_cert):
        raise PemError(
            f"{what} certificate {cert_path} is not signed by the CA in use "
            f"({ca_cert.subject.rfc4514_string()}); was it issued by another `fedenc certs init`?"
        )
    require_valid(cert, f"{what} certificate {cert_path}", f"; {fix}")
    return cert, pem_bytes(cert), pem_bytes(key)


@dataclass(frozen=True)
class MasterTLS:
    """What the gRPC master needs: server credentials and the identity callback."""

    credentials: Any  # grpc.ServerCredentials
    verifier: IdentityVerifier

    def identify(self, context: grpc.ServicerContext) -> str:
        """The verified child name of a stream's peer (raises ``IdentityError``)."""
        return self.verifier.identify(context)


@dataclass(frozen=True)
class ChildTLS:
    """What a gRPC child needs: channel credentials and channel options."""

    name: str
    credentials: Any  # grpc.ChannelCredentials
    options: tuple[tuple[str, Any], ...] = field(default=())
    cert: x509.Certificate | None = None

    def explain(self, err: Any, target: str | None = None) -> str:
        """:func:`~fedenc.security.rpc_errors.explain_rpc_error` with this child's certificate."""
        return explain_rpc_error(err, client_cert=self.cert, target=target)


def load_master_tls(
    certs_dir: Path,
    *,
    allowlist: Path | Iterable[str] | None = None,
    require_client_auth: bool = True,
) -> MasterTLS:
    """Server credentials and an :class:`IdentityVerifier` from ``certs_dir`` (``ca.pem``,
    ``master.pem``, ``master.key`` and, when present, ``crl.pem``)."""
    layout = CertLayout(Path(certs_dir))
    ca = load_ca_certificate(layout)
    fix = f"create it with `fedenc certs init --dir {layout.root}`"
    _, cert_pem, key_pem = _load_leaf(layout.master_cert, layout.master_key, ca, "master", fix)
    credentials = server_credentials(
        ca_cert=pem_bytes(ca), cert=cert_pem, key=key_pem, require_client_auth=require_client_auth
    )
    return MasterTLS(credentials, IdentityVerifier.from_layout(layout, allowlist=allowlist))


def load_child_tls(
    certs_dir: Path, name: str, *, server_name: str | None = None, check_expiry: bool = True
) -> ChildTLS:
    """Channel credentials of child ``name`` from ``certs_dir`` (``ca.pem`` plus ``NAME.pem`` /
    ``NAME.key``, in ``children/`` or directly in the directory).

    ``server_name`` overrides the host name checked against the master's certificate, for when
    children dial an address that is not among its SANs (a load balancer, a tunnel).
    ``check_expiry=False`` skips the local validity check and lets the master's TLS handshake
    decide (tests use it to see that path)."""
    layout = CertLayout(Path(certs_dir))
    ca = load_ca_certificate(layout)
    cert_path, key_path = layout.find_child(name)
    force = " --force" if key_path.exists() else ""  # needed only to replace a key
    fix = f"issue one with `fedenc certs issue {name} --dir CA_DIR{force}` where the CA key is kept"
    if check_expiry:
        cert, cert_pem, key_pem = _load_leaf(cert_path, key_path, ca, f"child {name!r}", fix)
    else:
        cert = load_certificate(cert_path, f"child {name!r} certificate", f" ({fix})")
        key = load_private_key(key_path, f"child {name!r} private key", f" ({fix})")
        cert_pem, key_pem = pem_bytes(cert), pem_bytes(key)
    if child_name_of(cert) != name:
        raise PemError(
            f"certificate {cert_path} belongs to {child_name_of(cert)!r}, not to child {name!r}"
        )
    options: tuple[tuple[str, Any], ...] = ()
    if server_name:
        options = (("grpc.ssl_target_name_override", server_name),)
    credentials = channel_credentials(ca_cert=pem_bytes(ca), cert=cert_pem, key=key_pem)
    return ChildTLS(name=name, credentials=credentials, options=options, cert=cert)
