"""Readable explanations of the gRPC errors a child meets when the master refuses it.

What a refused child actually sees (grpcio 1.85, TLS 1.3):

* revoked / not allowlisted / unknown identity: the handshake succeeds, the master aborts the call
  with PERMISSION_DENIED or UNAUTHENTICATED and details starting ``fedenc identity refused (...)``;
* certificate expired, not yet valid, from another CA, or no certificate: the master's TLS stack
  rejects it *after* the client finished its side of the TLS 1.3 handshake, so the client only sees
  ``UNAVAILABLE ... Socket closed``; the reason is in the master's log (``Handshake failed ...``).
  Passing the child's own certificate lets :func:`explain_rpc_error` name the likely cause;
* the master's certificate is not from our CA: ``CERTIFICATE_VERIFY_FAILED`` on the child;
* the dialled host is not in the master's certificate: ``Hostname Verification Check failed``.
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509

from fedenc.security.errors import IDENTITY_ERROR_PREFIX, IdentityReason
from fedenc.security.naming import child_name_of
from fedenc.security.validity import utcnow, validity_problem

_REASON = re.compile(re.escape(IDENTITY_ERROR_PREFIX) + r" \(([a-z-]+)\)")
_CHILD = re.compile(r"child '([A-Za-z0-9._-]+)'")

_REMEDY = {
    IdentityReason.REVOKED: "ask the CA operator for a new certificate "
    "(`fedenc certs issue {name} --dir CA_DIR --force`) if the revocation was a mistake",
    IdentityReason.EXPIRED: "ask the CA operator for a new certificate "
    "(`fedenc certs issue {name} --dir CA_DIR --force`)",
    IdentityReason.NOT_ALLOWLISTED: "ask the master's operator to add {name!r} to its allowlist",
    IdentityReason.UNKNOWN: "use a certificate issued by the master's CA "
    "(`fedenc certs issue {name} --dir CA_DIR`)",
    IdentityReason.NO_CERTIFICATE: "start the child with its certificates (--certs DIR)",
}


def refusal_reason(err: Any) -> IdentityReason | None:
    """The :class:`IdentityReason` of a master's identity refusal, or None for any other error."""
    match = _REASON.search(_details(err))
    if match is None:
        return None
    try:
        return IdentityReason(match.group(1))
    except ValueError:
        return None


def _details(err: Any) -> str:
    details = getattr(err, "details", None)
    text = details() if callable(details) else None
    return str(text or err)


def _code_name(err: Any) -> str:
    code = getattr(err, "code", None)
    value = code() if callable(code) else None
    return str(getattr(value, "name", value or "UNKNOWN"))


def explain_rpc_error(
    err: Any, *, client_cert: x509.Certificate | None = None, target: str | None = None
) -> str:
    """A one-paragraph explanation of ``err`` (a ``grpc.RpcError``) for a child's operator.

    ``client_cert`` (the child's own certificate) lets it name the cause of a handshake the master
    cut short; ``target`` (the dialled address) makes connection errors concrete."""
    details = _details(err)
    code = _code_name(err)
    name = (child_name_of(client_cert) if client_cert is not None else None) or "NAME"
    where = target or "the master"
    reason = refusal_reason(err)
    if reason is not None:
        message = details[details.find(IDENTITY_ERROR_PREFIX) :]
        if client_cert is None and (named := _CHILD.search(message)):
            name = named.group(1)
        remedy = _REMEDY[reason].format(name=name)
        return f"the master refused this child ({code}): {message}; {remedy}"
    if "Hostname Verification" in details or "Peer name" in details:
        return (
            f"the master's certificate does not name the host dialled ({where}): reissue it with "
            "`fedenc certs master --dir CA_DIR --master-host HOST --force` listing every name "
            "and IP children use, or give the child the server name to expect"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return f"{where} does not speak TLS (was the master started with --insecure?)"
    if "CERTIFICATE_VERIFY_FAILED" in details:
        cause = details.rsplit("CERTIFICATE_VERIFY_FAILED:", 1)[-1].split(":")[0].strip()
        return (
            f"this child does not trust the master's certificate ({cause}): the master's "
            "certificate is not signed by the CA in the child's ca.pem, or it expired; copy the "
            "federation's ca.pem to the child or reissue the master certificate"
        )
    if "Connection refused" in details:
        return f"no master is listening at {where} (connection refused)"
    if code == "UNAVAILABLE" and ("Socket closed" in details or "reset" in details.lower()):
        local = validity_problem(client_cert, utcnow()) if client_cert is not None else None
        if local is not None:
            return (
                f"the master rejected this child's TLS certificate: it {local}; ask the CA "
                f"operator for a new one (`fedenc certs issue {name} --dir CA_DIR --force`)"
            )
        return (
            f"{where} closed the connection during the TLS handshake: it most likely rejected "
            "this child's certificate (issued by another CA, expired, not yet valid, or none "
            "sent); the master's log names the reason"
        )
    return f"{code}: {details}"
