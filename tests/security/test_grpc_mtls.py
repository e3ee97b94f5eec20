"""End to end over real gRPC with mutual TLS on 127.0.0.1: a unary echo server identifies its
peer with the IdentityVerifier, as the fedenc master does on its Federation stream."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from security_helpers import PAST

from fedenc.security.ca import CertificateAuthority
from fedenc.security.credentials import (
    ChildTLS,
    MasterTLS,
    channel_credentials,
    load_child_tls,
    load_master_tls,
)
from fedenc.security.errors import IdentityError, IdentityReason, PemError
from fedenc.security.issue import issue_child_certificate
from fedenc.security.layout import CertLayout
from fedenc.security.pem import pem_bytes
from fedenc.security.rpc_errors import explain_rpc_error, refusal_reason
from fedenc.security.store import issue_child, issue_master, revoke_child

METHOD = "/fedenc.test.Echo/Who"


@dataclass
class Master:
    target: str
    seen: list[str] = field(default_factory=list)
    refused: list[IdentityReason] = field(default_factory=list)


def start_master(tls: MasterTLS) -> tuple[Any, Master]:
    def who(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            name = tls.identify(context)
        except IdentityError as err:
            master.refused.append(err.reason)
        name = tls.verifier.identify_or_abort(context)
        master.seen.append(name)
        return name.encode() + b":" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "fedenc.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", tls.credentials)
    server.start()
    master = Master(target=f"127.0.0.1:{port}")
    return server, master


@pytest.fixture
def running(layout: CertLayout) -> Iterator[Master]:
    server, master = start_master(load_master_tls(layout.root))
    yield master
    server.stop(None)


def call(master: Master, credentials: Any, options: tuple[tuple[str, Any], ...] = ()) -> bytes:
    # A local subchannel pool: no connection is shared between channels with other credentials.
    opts = (*options, ("grpc.use_local_subchannel_pool", 1))
    with grpc.secure_channel(master.target, credentials, options=opts) as channel:
        reply: bytes = channel.unary_unary(METHOD)(b"hi", timeout=10)
        return reply


def rpc_error(master: Master, credentials: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(master, credentials, **kwargs)
    return info.value


def child(layout: CertLayout, name: str, **kwargs: Any) -> ChildTLS:
    return load_child_tls(layout.root, name, **kwargs)


def test_known_child_connects_and_the_master_sees_its_name(
    layout: CertLayout, running: Master
) -> None:
    issue_child(layout, "alice")
    assert call(running, child(layout, "alice").credentials) == b"alice:hi"
    assert running.seen == ["alice"]


def test_child_of_another_ca_is_refused_by_the_handshake(
    layout: CertLayout, running: Master, other_ca: CertificateAuthority
) -> None:
    stranger = issue_child_certificate(other_ca, "eve")
    ca_pem = layout.ca_cert.read_bytes()
    creds = channel_credentials(
        ca_cert=ca_pem, cert=pem_bytes(stranger.cert), key=pem_bytes(stranger.key)
    )
    err = rpc_error(running, creds)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert running.seen == [] and running.refused == []  # never reached the application
    text = explain_rpc_error(err, client_cert=stranger.cert, target=running.target)
    assert "closed the connection during the TLS handshake" in text
    assert "issued by another CA" in text


def test_revoked_child_is_refused_with_a_clear_error_on_both_sides(
    layout: CertLayout, running: Master
) -> None:
    issue_child(layout, "alice")
    tls = child(layout, "alice")
    assert call(running, tls.credentials) == b"alice:hi"
    revoke_child(layout, "alice")  # the running master picks up the new crl.pem
    err = rpc_error(running, tls.credentials)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details().startswith(
        "fedenc identity refused (revoked): certificate of child 'alice'"
    )
    assert refusal_reason(err) is IdentityReason.REVOKED
    assert running.refused == [IdentityReason.REVOKED]
    text = tls.explain(err)
    assert text.startswith("the master refused this child (PERMISSION_DENIED)")
    assert "fedenc certs issue alice --dir CA_DIR --force" in text


def test_not_allowlisted_child_is_refused(layout: CertLayout) -> None:
    issue_child(layout, "alice")
    issue_child(layout, "bob")
    server, master = start_master(load_master_tls(layout.root, allowlist=["alice"]))
    try:
        assert call(master, child(layout, "alice").credentials) == b"alice:hi"
        err = rpc_error(master, child(layout, "bob").credentials)
    finally:
        server.stop(None)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusal_reason(err) is IdentityReason.NOT_ALLOWLISTED
    assert "add 'bob' to its allowlist" in explain_rpc_error(err)


def test_expired_child_is_refused_locally_and_by_the_handshake(
    layout: CertLayout, running: Master
) -> None:
    issue_child(layout, "old", **PAST)
    with pytest.raises(PemError, match=r"child 'old' certificate .* expired on .*certs issue old"):
        child(layout, "old")
    tls = child(layout, "old", check_expiry=False)  # dial anyway: what does the master do?
    err = rpc_error(running, tls.credentials)
    # TLS 1.3: the master rejects the certificate after the client's side of the handshake is
    # done, so gRPC only reports a closed socket; explain() names the cause from the certificate.
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert running.seen == []
    text = tls.explain(err, target=running.target)
    assert "rejected this child's TLS certificate: it expired on" in text
    assert "fedenc certs issue old --dir CA_DIR --force" in text


def test_child_without_certificate_and_child_trusting_another_ca(
    layout: CertLayout, running: Master, other_ca: CertificateAuthority
) -> None:
    err = rpc_error(running, channel_credentials(ca_cert=layout.ca_cert.read_bytes()))
    assert "closed the connection during the TLS handshake" in explain_rpc_error(err)
    issue_child(layout, "alice")
    alice = child(layout, "alice")
    assert alice.cert is not None
    wrong_roots = channel_credentials(
        ca_cert=pem_bytes(other_ca.cert),
        cert=pem_bytes(alice.cert),
        key=layout.child_key("alice").read_bytes(),
    )
    text = explain_rpc_error(rpc_error(running, wrong_roots))
    assert "does not trust the master's certificate" in text


def test_host_name_check_and_server_name_override(layout: CertLayout) -> None:
    issue_master(layout, master_hosts=["master.example.org"], force=True)
    issue_child(layout, "alice")
    server, master = start_master(load_master_tls(layout.root))
    try:
        err = rpc_error(master, child(layout, "alice").credentials)
        assert "does not name the host dialled" in explain_rpc_error(err, target=master.target)
        tls = child(layout, "alice", server_name="master.example.org")
        assert call(master, tls.credentials, tls.options) == b"alice:hi"
        # A wrong --server-name is what the refusal names, not the (unchecked) address.
        from fedenc.runtime.grpc.security import channel_security

        wrong = child(layout, "alice", server_name="wrong.example.org")
        err = rpc_error(master, wrong.credentials, options=wrong.options)
        explain = channel_security(wrong, master.target, "wrong.example.org").explain
        assert explain is not None
        assert f"host dialled (wrong.example.org, --server-name for {master.target})" in explain(
            err
        )
    finally:
        server.stop(None)


def test_plaintext_master_is_explained(layout: CertLayout) -> None:
    issue_child(layout, "alice")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        err = rpc_error(Master(f"127.0.0.1:{port}"), child(layout, "alice").credentials)
    finally:
        server.stop(None)
    assert "does not speak TLS" in explain_rpc_error(err)


def test_nobody_listening_is_explained(layout: CertLayout, tmp_path: Path) -> None:
    issue_child(layout, "alice")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")  # reserve a port, then free it
    server.start()
    server.stop(None)
    target = f"127.0.0.1:{port}"
    err = rpc_error(Master(target), child(layout, "alice").credentials)
    assert (
        explain_rpc_error(err, target=target)
        == f"no master is listening at {target} (connection refused)"
    )


def test_bidirectional_stream_is_identified_like_the_federation_stream(
    layout: CertLayout,
) -> None:
    """The master's Federation/Connect is a bidi stream: identify once when it opens."""
    issue_child(layout, "alice")
    issue_child(layout, "bob")
    tls = load_master_tls(layout.root, allowlist=["alice"])

    def connect(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        name = tls.verifier.identify_or_abort(context)
        for request in requests:
            yield name.encode() + b":" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.method_handlers_generic_handler(
        "fedenc.test.Echo", {"Connect": grpc.stream_stream_rpc_method_handler(connect)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", tls.credentials)
    server.start()
    try:
        replies: dict[str, Any] = {}
        for name in ("alice", "bob"):
            options = (("grpc.use_local_subchannel_pool", 1),)
            creds = child(layout, name).credentials
            with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
                stream = channel.stream_stream("/fedenc.test.Echo/Connect")
                try:
                    replies[name] = list(stream(iter([b"a", b"b"]), timeout=10))
                except grpc.RpcError as err:
                    replies[name] = err
    finally:
        server.stop(None)
    assert replies["alice"] == [b"alice:a", b"alice:b"]
    assert isinstance(replies["bob"], grpc.RpcError)
    assert replies["bob"].code() == grpc.StatusCode.PERMISSION_DENIED
    assert refusal_reason(replies["bob"]) is IdentityReason.NOT_ALLOWLISTED
