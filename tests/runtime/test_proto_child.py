"""examples/proto-child: a child written from ``proto/`` and Flower's wire message alone (no fedenc
import) takes part in a real `fedenc master` job over gRPC, and the master fuses its updates by
their confirmed sample counts exactly (FedAvg of known updates)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_control_proto_only import generate_stubs
from test_grpc_processes import TINY_ARGS, Procs, procs  # noqa: F401  (fixture)

from fedenc.training.checkpoint import STATE_FILE

CHILD = Path(__file__).resolve().parents[2] / "examples" / "proto-child" / "child.py"

pytestmark = pytest.mark.timeout(240)


def test_a_child_from_proto_alone_is_fused_by_its_confirmed_samples(
    procs: Procs,  # noqa: F811
    tmp_path: Path,
    free_port: int,
) -> None:
    stubs = generate_stubs(tmp_path)
    # -S: no site module, so no .pth file (fedenc's editable install) runs: fedenc is absent.
    absent = [sys.executable, "-S", "-c", "import fedenc"]
    env = {"PYTHONPATH": _site_packages(), "PATH": "/usr/bin:/bin"}
    probe = subprocess.run(absent, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert "No module named 'fedenc'" in probe.stderr
    address = f"127.0.0.1:{free_port}"
    out = tmp_path / "out"
    master = [sys.executable, "-m", "fedenc.cli", "master", "--listen", address, "--insecure"]
    master += ["--children", "2", "--rounds", "1", "--out", str(out), *TINY_ARGS]
    procs.start("master", master)
    # site-a: 100 samples, update x0.5; site-b: 300 samples, update x2.0 -> weights 1/4, 3/4.
    for name, samples, scale in (("site-a", 100, 0.5), ("site-b", 300, 2.0)):
        cmd = [sys.executable, "-S", str(CHILD), "--stubs", str(stubs)]
        cmd += ["--master", address, "--name", name, "--samples", str(samples)]
        cmd += ["--scale", str(scale), "--save-received", str(tmp_path / f"{name}.npz")]
        procs.start(name, cmd, {"PYTHONPATH": _site_packages()})
    assert procs.wait("master", 150) == 0, procs.log("master")
    for name in ("site-a", "site-b"):
        assert procs.wait(name, 30) == 0, procs.log(name)
        assert "closed by the master: CLOSE_REASON_SHUTDOWN" in procs.log(name)
    results = json.loads((out / "results.json").read_text())
    (round_,) = results["rounds"]
    assert sorted(round_["participants"]) == ["site-a", "site-b"]
    assert round_["weights"] == {"site-a": 0.25, "site-b": 0.75}
    # The children answer evaluations with an error reply: left out of the metrics, not fatal.
    assert "site-a does not evaluate" in procs.log("master")
    fused = torch.load(out / "encoder" / STATE_FILE, weights_only=True)
    with np.load(tmp_path / "site-a.npz") as received:
        assert len(received.files) > 0
        for name in received.files:
            expected = received[name] * (0.25 * 0.5 + 0.75 * 2.0)
            np.testing.assert_allclose(fused[name].numpy(), expected, rtol=1e-6, atol=1e-7)


def _site_packages() -> str:
    """grpc, numpy and flwr's wire message for a child that runs without site (-S) and so
    without fedenc's editable install; fedenc itself is not on this path."""
    import sysconfig

    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return ":".join(sorted(paths))
