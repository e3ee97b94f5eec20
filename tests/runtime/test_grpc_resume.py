"""A master killed with SIGKILL mid-job and restarted with ``fedenc master --resume``: the job
continues from its last completed round with the same (long-lived, TLS) children and ends with
the encoder of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_grpc_processes import TINY_ARGS, Procs, wait_for

from fedenc.federation.checkpoint import read_master_state
from fedenc.runtime.grpc.launcher import child_command
from fedenc.runtime.simulate import Scenario, run_scenario
from fedenc.security.layout import CertLayout
from fedenc.security.store import init_certs, issue_child
from fedenc.training.checkpoint import load_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


@pytest.mark.parametrize("stop", ["kill", "term"])
def test_a_master_stopped_mid_job_resumes_to_the_uninterrupted_encoder(
    procs: Procs, tmp_path: Path, free_port: int, stop: str
) -> None:
    """``kill``: SIGKILL, the children's streams just break. ``term``: SIGTERM, the master closes
    them with RESTART (it has a checkpoint), and the children, without --stay, wait for the
    resume with their state instead of exiting (they used to exit, and a resume then started
    them afresh: another encoder, silently)."""
    threads = torch.get_num_threads()  # the in-process reference trains with these
    layout = CertLayout(tmp_path / "certs")
    init_certs(layout)
    for i in range(2):
        issue_child(layout, f"child-{i}")
    address = f"127.0.0.1:{free_port}"
    out = tmp_path / "out"
    master = [
        sys.executable,
        "-m",
        "fedenc.cli",
        "master",
        "--listen",
        address,
        "--certs",
        str(layout.root),
        "--children",
        "2",
        "--rounds",
        "4",
        "--seed",
        "5",
        "--rule",
        "fedadam",  # server-optimizer moments must survive the restart too
        "--out",
        str(out),
        *TINY_ARGS,
    ]
    procs.start("master", master)
    markers = [tmp_path / f"trained-3-{i}" for i in range(2)]
    for i in range(2):
        cmd = child_command(
            address,
            f"child-{i}",
            index=i,
            children=2,
            certs=layout.root,
            options=["--app", "grpc_apps:hold_after_train", "--threads", str(threads)],
        )
        env: dict[str, str | None] = {
            "FEDENC_TEST_ROUND": "3",
            "FEDENC_TEST_MARKER": str(markers[i]),
            "FEDENC_TEST_SLEEP": "2",
        }
        procs.start(f"c{i}", cmd, env)
    # Both children have trained round 3, the master has not fused it: kill it now.
    wait_for(lambda: all(m.exists() for m in markers), 150, "both children to train round 3")
    if stop == "kill":
        procs.procs["master"].kill()
        assert procs.wait("master", 10) == -9
    else:
        procs.procs["master"].terminate()
        assert procs.wait("master", 30) == 0, procs.log("master")
        assert "RESTART: they wait for the resume" in procs.log("master")
        for i in range(2):
            wait_for(lambda i=i: "keeping the job's state" in procs.log(f"c{i}"), 30, "the restart")
            assert procs.procs[f"c{i}"].poll() is None, procs.log(f"c{i}")  # still there
    saved = read_master_state(out / "state")
    assert saved.round == 2 and saved.rule["steps"] == 2 and len(saved.rounds) == 2
    first_log = procs.log("master")

    procs.start("master-again", [*master, "--resume"])
    assert procs.wait("master-again", 150) == 0, procs.log("master-again")
    for i in range(2):  # the same processes all along: reconnected, then shut down cleanly
        assert procs.wait(f"c{i}", 30) == 0, procs.log(f"c{i}")
        # Their round-3 state was rewound before training it again.
        assert "round 3 of job" in procs.log(f"c{i}") and "again" in procs.log(f"c{i}")
    assert "resumed after round 2" in procs.log("master-again")
    results = json.loads((out / "results.json").read_text())
    assert results["runtime"]["resumed"] is True and results["job_id"] == saved.job_id
    assert [r["round"] for r in results["rounds"]] == [1, 2, 3, 4]
    assert all(len(r["participants"]) == 2 for r in results["rounds"])
    # confirmed again after the resume, each keeps the round it first joined
    assert [c["joined_round"] for c in results["children"]] == [1, 1]
    assert first_log.count("round 1:") == 1  # rounds 1-2 ran once, before the kill

    # The uninterrupted run: the in-process runtime, same scenario and seed (bit-identical to
    # the process runtime on CPU, tests/runtime/test_grpc_processes.py).
    scenario = Scenario(
        children=2,
        rounds=4,
        hidden=8,
        synthetic_sessions=400,
        synthetic_items=60,
        seed=5,
        rule="fedadam",
    )
    reference = run_scenario(scenario, tmp_path / "reference")
    a, _ = load_checkpoint(Path(reference.result["checkpoint"]))
    b, _ = load_checkpoint(out / "encoder")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:  # the whole target (share = all), item table included
        assert torch.equal(sa[name], sb[name]), name
    assert [r["loss"] for r in results["rounds"]] == [r["loss"] for r in reference.result["rounds"]]
