"""Default places and lifetimes, free of heavy imports so that `fedenc --help` stays fast."""

from __future__ import annotations

from pathlib import Path

DEFAULT_CERTS_DIR = Path("certs")
DEFAULT_MASTER_HOSTS = ("localhost", "127.0.0.1")

CA_DAYS = 3650
MASTER_DAYS = 825
CHILD_DAYS = 365
