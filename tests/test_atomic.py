"""fedenc.atomic: a failed write leaves the old file and no temporary; modes hold from the start."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fedenc import atomic


def test_a_write_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "x.json"
    atomic.write_text(target, "one")
    atomic.write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "state.pt"
    atomic.torch_save({"v": torch.ones(2)}, target)
    with pytest.raises(RuntimeError, match="mid-write"), atomic.atomic_file(target) as handle:
        handle.write(b"half a file")
        raise RuntimeError("mid-write")
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_the_mode_is_the_files_from_its_first_byte(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    seen: list[int] = []
    with atomic.atomic_file(target, mode=0o600) as handle:
        seen.append(stat.S_IMODE(os.fstat(handle.fileno()).st_mode))  # the temporary, mid-write
        handle.write(b"secret")
    assert seen == [0o600] and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_without_a_mode_the_umask_decides(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        atomic.write_text(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o600
