"""THE protobuf-only client test: stubs generated from ``proto/`` alone (grpc_tools.protoc, into a
temporary folder) drive a whole job on a real `fedenc master --serve` with two child processes,
from a process in which fedenc cannot be imported; the encoder it decodes with numpy from the
raw bytes equals the master's saved encoder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from control_master import ControlMaster

from fedenc.training.checkpoint import STATE_FILE

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).resolve().parent / "control_proto_client.py"

pytestmark = pytest.mark.timeout(400)  # the first test also starts the shared processes


def generate_stubs(dest: Path) -> Path:
    """Python stubs of every .proto, from a copy of proto/ (nothing else of the repository)."""
    protos = dest / "proto"
    shutil.copytree(REPO / "proto", protos)
    stubs = dest / "stubs"
    stubs.mkdir()
    files = sorted(str(p.relative_to(protos)) for p in protos.rglob("*.proto"))
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(protos)]
    cmd += [f"--python_out={stubs}", f"--grpc_python_out={stubs}", *files]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert (stubs / "fedenc" / "v1" / "control_pb2_grpc.py").is_file()
    assert not (stubs / "fedenc" / "__init__.py").exists()  # a bare namespace of stubs
    return stubs


def test_a_client_generated_from_proto_alone_runs_a_whole_job(
    control_master: ControlMaster, tmp_path: Path
) -> None:
    stubs = generate_stubs(tmp_path)
    out = tmp_path / "client-out"
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    # -S: no site module, so no .pth file (fedenc's editable install) runs; -E: no PYTHONPATH
    cmd = [sys.executable, "-S", "-E", str(CLIENT), str(stubs), control_master.address, str(out)]
    done = subprocess.run([*cmd, *site], cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["fedenc_import_error"].startswith("ModuleNotFoundError")
    # no directory on its path holds the fedenc package (site-packages only has the .pth finder)
    assert not any((Path(p) / "fedenc" / "__init__.py").exists() for p in result["sys_path"])
    assert result["states"][-1] == "JOB_STATE_SUCCEEDED"
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(len(r["participants"]) == 2 for r in result["rounds"])
    assert result["encoder_type"] == "srgnn" and result["hidden"] == 8
    assert result["names"] == result["spec_names"]
    saved = torch.load(
        control_master.out_root / result["job_id"] / "encoder" / STATE_FILE, weights_only=True
    )
    with np.load(out / "tensors.npz") as arrays:
        assert list(arrays.keys()) == result["names"]
        for name in result["names"]:
            expected = saved[name].numpy()
            assert arrays[name].dtype == expected.dtype and arrays[name].shape == expected.shape
            assert np.array_equal(arrays[name], expected), name
