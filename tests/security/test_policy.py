"""The --insecure policy shared by ``fedenc master`` and ``fedenc child``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedenc.security.errors import TransportPolicyError
from fedenc.security.policy import choose_transport, insecure_warning


def test_certificates_mean_tls(tmp_path: Path) -> None:
    assert choose_transport(certs=tmp_path, insecure=False) == tmp_path


def test_plaintext_needs_insecure_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    warnings: list[str] = []
    assert choose_transport(certs=None, insecure=True, role="child", warn=warnings.append) is None
    assert warnings == [insecure_warning("child")]
    assert "PLAINTEXT" in warnings[0] and "the master" in warnings[0]
    assert choose_transport(certs=None, insecure=True) is None  # default: stderr
    assert "WARNING: --insecure: this master" in capsys.readouterr().err


def test_neither_or_both_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TransportPolicyError, match=r"--certs DIR .*fedenc certs init.* --insecure"):
        choose_transport(certs=None, insecure=False, role="child")
    with pytest.raises(TransportPolicyError, match="not both"):
        choose_transport(certs=tmp_path, insecure=True)
