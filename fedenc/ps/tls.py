"""TLS for the PS, with fedenc's certificates and transport policy (:mod:`fedenc.security`).

A shard presents the master's certificate (the PS is deployed next to the master, or by the
same operator) and, like the master, requires a client certificate from the same CA: trainers
connect with their child certificate. Plaintext needs an explicit ``--insecure``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedenc.security.policy import choose_transport


def _warner(what: str) -> Callable[[str], None]:
    def warn(_: str) -> None:
        print(
            f"WARNING: --insecure: this {what} in PLAINTEXT; anyone on the network can read and "
            "change them. Use it only on a trusted host or for local tests.",
            file=sys.stderr,
        )

    return warn


def shard_credentials(
    certs: Path | None, insecure: bool, what: str = "PS shard serves embedding rows"
) -> Any:
    """``grpc.ServerCredentials`` for a shard (or another service: ``what`` it serves, for the
    warning), or None for plaintext (with a warning)."""
    chosen = choose_transport(certs=certs, insecure=insecure, role="master", warn=_warner(what))
    if chosen is None:
        return None
    from fedenc.security.credentials import load_master_tls

    return load_master_tls(chosen).credentials


def client_credentials(certs: Path, name: str) -> tuple[Any, tuple[tuple[str, Any], ...]]:
    """Channel credentials and options of trainer ``name`` (a child certificate)."""
    from fedenc.security.credentials import load_child_tls

    tls = load_child_tls(certs, name)
    return tls.credentials, tls.options
