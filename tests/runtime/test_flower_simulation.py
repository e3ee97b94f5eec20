"""Runtime (b): the same apps under Flower's own simulation engine, through `flwr run .` (a local
SuperLink in simulation mode, Ray underneath), give the in-process runtime's metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_job import TINY_JOB

from fedenc.runtime.inprocess import run_inprocess

pytest.importorskip(
    "ray", reason="Flower's simulation engine needs ray: pip install 'flwr[simulation]'"
)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = {**TINY_JOB, "seed": 5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop_superlink(home: Path) -> None:
    """`flwr run` leaves a detached local SuperLink behind; stop the one of this FLWR_HOME."""
    found = subprocess.run(
        ["pgrep", "-f", f"flower-superlink.*{home}"], capture_output=True, text=True, check=False
    )
    for pid in found.stdout.split():
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(1.0)


@pytest.mark.slow
def test_flwr_run_gives_the_inprocess_metrics(tmp_path: Path) -> None:
    flwr = BIN / "flwr"
    if not flwr.exists() or not (BIN / "flower-superlink").exists():
        pytest.skip("the flwr CLI is not installed next to this Python")
    home = tmp_path / "flwr-home"
    home.mkdir()
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    overrides = " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
        for k, v in {**TINY, "out-dir": str(out)}.items()
    )
    # One CPU per ClientApp: two Ray actors on two cores, which hand a node's messages to
    # either; the child must carry its state through Flower's Context.state.
    cmd = [str(flwr), "run", ".", "local", "--stream", "--run-config", overrides,
           "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"]  # fmt: skip
    for _attempt in range(2):
        try:
            proc = subprocess.run(
                cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
            )
        finally:
            _stop_superlink(home)
        # Flower gives its local SuperLink 15 s to start; on a loaded machine that can pass.
        if (
            proc.returncode == 0
            or "Failed to start local SuperLink" not in proc.stdout + proc.stderr
        ):
            break
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert (out / "results.json").is_file(), log
    # The rounds show in the stream (fedenc's info lines used to reach no handler there).
    assert "round 2: 3/3 child(ren)" in proc.stdout + proc.stderr, log
    ray_rounds = json.loads((out / "results.json").read_text())["rounds"]

    from nodes.child import app as child_app
    from nodes.master import RESULT_KEY
    from nodes.master import app as master_app

    run = run_inprocess(master_app, child_app, 3, TINY)
    local_rounds = json.loads(str(run.server_context.state[RESULT_KEY]["json"]))["rounds"]
    assert len(ray_rounds) == len(local_rounds) == 2
    for ray_round, local_round in zip(ray_rounds, local_rounds, strict=True):
        assert ray_round["participants"] == local_round["participants"]
        assert ray_round["num_samples"] == local_round["num_samples"]
        for key, value in local_round["metrics"].items():
            assert ray_round["metrics"][key] == pytest.approx(value, rel=1e-3, abs=1e-3), key
