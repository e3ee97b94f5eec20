"""Fixtures of the runtime tests."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from control_master import ControlMaster, serve_control_master


@pytest.fixture
def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (for a server in another process)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def control_master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlMaster]:
    """A real `fedenc master --serve` and two `fedenc child` processes for the session."""
    with serve_control_master(tmp_path_factory.mktemp("control")) as served:
        yield served
