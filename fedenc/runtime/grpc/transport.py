"""What both ends of a Federation stream agree on: protocol version, capabilities, gRPC channel
options (message limits, keepalive), addresses, and the security seam.

Security seam. The runtime does not make certificates: :class:`ServerSecurity` and
:class:`ChannelSecurity` take ready ``grpc`` credentials (``fedenc.security`` builds them from
its CA, certificates and keys) and, on the master, an ``identify`` callback that maps a stream's
``context.auth_context()`` (for mutual TLS: the peer certificate's names) to the child name it
may use; it refuses a child by raising :class:`Refused` (the stream is aborted with its status
code and message, which the child can explain) or by returning ``None``. The master calls it when
a stream opens and again before each round (a revoked certificate ends a long-lived stream).
Plaintext needs an explicit ``insecure=True`` (the CLIs' ``--insecure``), and is logged as a
warning. :mod:`fedenc.runtime.grpc.security` builds both from :mod:`fedenc.security`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc

from fedenc import __version__
from fedenc.protocol.chunking import DEFAULT_MAX_CHUNK_BYTES

log = logging.getLogger(__name__)

#: Wire protocol version of fedenc.v1.Federation as this code speaks it.
PROTOCOL_VERSION: Final = 1
#: Flower Messages in FlowerMessage frames, ArrayRecords as chunk streams.
CAP_FLOWER: Final = "flower-message/1"
#: Application heartbeats.
CAP_HEARTBEAT: Final = "heartbeat/1"
CAPABILITIES: Final = (CAP_FLOWER, CAP_HEARTBEAT)
#: Capabilities a child must have to be welcome.
REQUIRED_CAPABILITIES: Final = frozenset({CAP_FLOWER})
AGENT: Final = f"fedenc {__version__}"
SERVICE_METHOD: Final = "/fedenc.v1.Federation/Connect"

#: Largest frame either side accepts: a chunk (at most 4 MiB - 64 KiB of data) plus framing,
#: or a FlowerMessage whose non-array records fit. gRPC refuses bigger frames itself.
MAX_FRAME_BYTES: Final = 8 * 1024 * 1024
DEFAULT_HEARTBEAT_INTERVAL: Final = 5.0
DEFAULT_HEARTBEAT_TIMEOUT: Final = 30.0

AuthContext = Mapping[str, Sequence[bytes]]
#: Maps a stream's auth context to the child name it may use; ``None`` (or :class:`Refused`)
#: refuses the child.
Identify = Callable[[AuthContext], str | None]


class Refused(Exception):
    """An identity refusal: the master aborts the stream with ``code`` and this message (or, on
    an open stream, closes it with ``CLOSE_REASON_UNAUTHORIZED`` and this message)."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED):
        super().__init__(message)
        self.code = code


class InsecureTransportError(ValueError):
    """Plaintext was asked for implicitly (no credentials and no ``insecure=True``)."""


def _keepalive(interval_s: float) -> list[tuple[str, Any]]:
    # HTTP/2 pings keep NATs and load balancers from dropping an idle-looking connection during
    # long local training, and detect a dead peer underneath the application heartbeats.
    ms = max(1000, int(interval_s * 1000))
    return [
        ("grpc.keepalive_time_ms", 2 * ms),
        ("grpc.keepalive_timeout_ms", 2 * ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


#: gRPC servers on Linux set SO_REUSEPORT by default: a second server on a port already in use
#: then binds too, and the kernel splits new connections between the two (two masters, each
#: with part of the children). Every fedenc server turns it off, so the second one fails.
EXCLUSIVE_PORT: Final = ("grpc.so_reuseport", 0)


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Add ``address`` (``HOST:PORT``, port 0 = any free one) to ``server``, over TLS when
    ``credentials`` are given; the bound port. ``OSError`` naming the address when it cannot
    be bound (gRPC raises a ``RuntimeError`` that points at its debug log instead)."""
    refused = (
        f"cannot listen on {address}: the port is in use (another fedenc server?) or the host "
        "is not an address of this machine"
    )
    try:
        if credentials is None:
            port = int(server.add_insecure_port(address))
        else:
            port = int(server.add_secure_port(address, credentials))
    except RuntimeError as err:  # newer grpcio
        raise OSError(refused) from err
    if port == 0:  # older grpcio
        raise OSError(refused)
    return port


def server_options(heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL) -> list[tuple[str, Any]]:
    """Options of the master's server: frame limits, keepalive, and tolerance of the children's
    keepalive pings (a server that gets pings more often than it allows sends GOAWAY)."""
    return [
        EXCLUSIVE_PORT,
        # Twice the limit: a frame up to that is read and refused by name (the child is told
        # its size); past it gRPC ends the stream with no reason the master can log.
        ("grpc.max_receive_message_length", 2 * MAX_FRAME_BYTES),
        ("grpc.max_send_message_length", MAX_FRAME_BYTES),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
        *_keepalive(heartbeat_interval),
    ]


def channel_options(
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
) -> list[tuple[str, Any]]:
    """Options of a child's channel: frame limits and keepalive."""
    return [
        ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
        ("grpc.max_send_message_length", MAX_FRAME_BYTES),
        *_keepalive(heartbeat_interval),
    ]


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 hosts in brackets) -> (host, port); ``ValueError`` naming the input."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address must be HOST:PORT (e.g. 127.0.0.1:9092), got {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class ServerSecurity:
    """The master's side of the seam: server credentials and the child-identity callback."""

    credentials: grpc.ServerCredentials | None = None
    identify: Identify | None = None
    insecure: bool = False
    # Any valid certificate of the CA, allowlisted as a child or not (the Control API's callers).
    identify_any: Identify | None = None

    def check(self) -> None:
        if self.credentials is None and not self.insecure:
            raise InsecureTransportError(
                "no TLS credentials given: pass server credentials (fedenc.security) or ask for "
                "plaintext explicitly (insecure=True, --insecure)"
            )
        if self.credentials is None:
            # (Role-neutral: the master, the elastic services and the Control API share it.)
            log.warning("PLAINTEXT gRPC server (--insecure): traffic and peers unauthenticated")


@dataclass(frozen=True)
class ChannelSecurity:
    """A child's side of the seam: channel credentials (TLS or mutual TLS)."""

    credentials: grpc.ChannelCredentials | None = None
    insecure: bool = False
    #: TLS name to verify the master's certificate against, when it differs from the address.
    target_name: str | None = None
    #: Turns a refusal (a ``grpc.RpcError``, or the detail of the master's Close) into a
    #: readable explanation for the child's operator (fedenc.security's ``explain_rpc_error``).
    explain: Callable[[Any], str] | None = None

    def check(self) -> None:
        if self.credentials is None and not self.insecure:
            raise InsecureTransportError(
                "no TLS credentials given: pass channel credentials (fedenc.security) or ask for "
                "plaintext explicitly (insecure=True, --insecure)"
            )
        if self.credentials is None:
            log.warning("PLAINTEXT gRPC connection (--insecure): traffic unauthenticated")

    def channel(self, address: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        """A channel to ``address`` (call :meth:`check` once before)."""
        if self.credentials is None:
            return grpc.insecure_channel(address, options=options)
        if self.target_name:
            options = [*options, ("grpc.ssl_target_name_override", self.target_name)]
        return grpc.secure_channel(address, self.credentials, options=options)


__all__ = [
    "AGENT",
    "CAPABILITIES",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TIMEOUT",
    "DEFAULT_MAX_CHUNK_BYTES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "REQUIRED_CAPABILITIES",
    "SERVICE_METHOD",
    "AuthContext",
    "ChannelSecurity",
    "Identify",
    "InsecureTransportError",
    "Refused",
    "ServerSecurity",
    "channel_options",
    "parse_address",
    "server_options",
]
