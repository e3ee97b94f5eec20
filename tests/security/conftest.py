"""Shared certificates for the security tests (P-256 keys are cheap: about a millisecond each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedenc.security.ca import CertificateAuthority, create_ca
from fedenc.security.layout import CertLayout
from fedenc.security.store import init_certs


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return create_ca()


@pytest.fixture(scope="session")
def other_ca() -> CertificateAuthority:
    return create_ca("some other CA")


@pytest.fixture
def layout(tmp_path: Path) -> CertLayout:
    """A certificates directory after ``fedenc certs init``."""
    layout = CertLayout(tmp_path / "certs")
    init_certs(layout)
    return layout
