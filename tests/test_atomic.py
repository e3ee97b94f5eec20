"""fedenc.atomic: a failed write leaves the old file and no temporary; modes hold from the start."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from damage import flip_a_data_byte

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


def test_a_changed_byte_in_a_tensor_file_is_refused_not_loaded(tmp_path: Path) -> None:
    import io

    path = tmp_path / "t.pt"
    atomic.torch_save({"w": torch.arange(4096, dtype=torch.float32)}, path)
    assert torch.equal(atomic.torch_load(path, weights_only=True)["w"], torch.arange(4096.0))
    flip_a_data_byte(path)
    assert not torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(4096.0))
    with pytest.raises(atomic.DamagedFileError, match=r"t\.pt is damaged: .* fails its checksum"):
        atomic.torch_load(path, weights_only=True)
    buffer = io.BytesIO(path.read_bytes())
    with pytest.raises(atomic.DamagedFileError, match="the buffer is damaged"):
        atomic.torch_load(buffer, weights_only=True)


def test_a_damaged_encoder_checkpoint_is_refused(tmp_path: Path) -> None:
    from fedenc.encoders.registry import build_encoder
    from fedenc.training.checkpoint import STATE_FILE, load_checkpoint, save_checkpoint

    save_checkpoint(tmp_path, build_encoder("srgnn", 500, hidden=16))
    load_checkpoint(tmp_path)
    flip_a_data_byte(tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="is damaged"):
        load_checkpoint(tmp_path)
