"""The gRPC runtime's security seam filled from :mod:`fedenc.security`: mutual TLS credentials
and the child identity (the name in the child's certificate, checked against the CA, the
revocation list, the validity period and the allowlist).

:func:`server_security` turns a :class:`~fedenc.security.credentials.MasterTLS` into the
master's :class:`ServerSecurity`, :func:`channel_security` a
:class:`~fedenc.security.credentials.ChildTLS` into a child's :class:`ChannelSecurity`;
:func:`master_security` / :func:`child_security` apply the transport policy of the CLIs
(``--certs DIR`` for TLS, an explicit ``--insecure`` for plaintext, neither is an error).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedenc.runtime.grpc.transport import AuthContext, ChannelSecurity, Refused, ServerSecurity
from fedenc.security.credentials import ChildTLS, MasterTLS, load_child_tls, load_master_tls
from fedenc.security.errors import IdentityError, IdentityReason
from fedenc.security.identity import IdentityVerifier, status_code_for
from fedenc.security.policy import choose_transport


def identify_with(verifier: IdentityVerifier) -> Callable[[AuthContext], str]:
    """The master's identity callback: the verified child name of a stream's peer certificate;
    raises :class:`Refused` with the status and the ``fedenc identity refused (REASON)`` message
    that ``fedenc.security.rpc_errors`` explains on the child."""

    def identify(auth: AuthContext) -> str:
        try:
            pems = auth.get("x509_pem_cert") or []
            if not pems:
                kind = b"".join(auth.get("transport_security_type") or []).decode() or "plaintext"
                raise IdentityError(
                    IdentityReason.NO_CERTIFICATE,
                    f"the peer presented no client certificate (transport: {kind}); the master "
                    "needs mutual TLS to identify children",
                )
            return verifier.verify_pem(pems[0]).name
        except IdentityError as err:
            raise Refused(str(err), status_code_for(err.reason)) from None

    return identify


def server_security(tls: MasterTLS) -> ServerSecurity:
    """Mutual TLS on the master: its credentials, and children identified by certificate."""
    return ServerSecurity(
        credentials=tls.credentials,
        identify=identify_with(tls.verifier),
        identify_any=identify_with(tls.verifier.without_allowlist()),
    )


def channel_security(
    tls: ChildTLS, address: str, server_name: str | None = None
) -> ChannelSecurity:
    """Mutual TLS on a child: its credentials, and refusals explained with its certificate."""

    # With --server-name the certificate is checked against that name, not the address.
    target = address if server_name is None else f"{server_name}, --server-name for {address}"

    def explain(err: Any) -> str:
        return tls.explain(err, target=target)

    return ChannelSecurity(credentials=tls.credentials, target_name=server_name, explain=explain)


def master_security(
    certs: Path | None,
    insecure: bool,
    *,
    allowlist: Path | Iterable[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> ServerSecurity:
    """``--certs`` / ``--insecure`` / ``--allowlist`` of ``fedenc master``; raises
    :class:`~fedenc.security.errors.TransportPolicyError` (neither or both) or
    :class:`~fedenc.security.errors.PemError` (missing or inconsistent files), each saying
    what to do."""
    chosen = choose_transport(certs=certs, insecure=insecure, role="master", warn=warn)
    if chosen is None:
        if allowlist is not None:
            from fedenc.security.errors import TransportPolicyError

            raise TransportPolicyError("--allowlist needs --certs: plaintext identifies nobody")
        return ServerSecurity(insecure=True)
    return server_security(load_master_tls(chosen, allowlist=allowlist))


def child_security(
    certs: Path | None,
    insecure: bool,
    name: str,
    address: str,
    *,
    server_name: str | None = None,
    local_check: bool = True,
    warn: Callable[[str], None] | None = None,
) -> ChannelSecurity:
    """``--certs`` / ``--insecure`` of ``fedenc child``. With ``local_check`` (the default) the
    child's own certificate is checked first (signed by ``ca.pem``, valid now, its key), so a
    mistake fails at once with a plain message instead of a refused handshake."""
    chosen = choose_transport(certs=certs, insecure=insecure, role="child", warn=warn)
    if chosen is None:
        return ChannelSecurity(insecure=True)
    tls = load_child_tls(chosen, name, server_name=server_name, check_expiry=local_check)
    return channel_security(tls, address, server_name)
