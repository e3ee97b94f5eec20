"""Transport policy shared by ``fedenc master`` and ``fedenc child``: TLS unless the operator asks
for plaintext with an explicit ``--insecure``, and never by silently falling back to it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fedenc.security.errors import TransportPolicyError

Role = Literal["master", "child"]


def insecure_warning(role: Role = "master") -> str:
    """The warning to print when a node runs in plaintext."""
    peers = "children" if role == "master" else "the master"
    return (
        f"WARNING: --insecure: this {role} talks to {peers} in PLAINTEXT. Anyone on the network "
        "can read and alter the model parameters and impersonate any node. Use it only on a "
        "trusted host or for local tests; create certificates with `fedenc certs init`."
    )


def choose_transport(
    *,
    certs: Path | None,
    insecure: bool,
    role: Role = "master",
    warn: Callable[[str], None] | None = None,
) -> Path | None:
    """The certificates directory to use, or None for plaintext.

    * ``certs`` given: TLS (mutual TLS for children) from that directory;
    * ``insecure``: plaintext; the :func:`insecure_warning` is passed to ``warn`` (default: stderr);
    * neither or both: :class:`TransportPolicyError` saying what to pass.
    """
    if certs is not None and insecure:
        raise TransportPolicyError("give either --certs DIR or --insecure, not both")
    if certs is not None:
        return Path(certs)
    if not insecure:
        raise TransportPolicyError(
            f"refusing to start the {role} without TLS: pass --certs DIR (create one with "
            "`fedenc certs init --dir DIR`) or --insecure to run in plaintext on a trusted network"
        )
    (warn or _stderr)(insecure_warning(role))
    return None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
