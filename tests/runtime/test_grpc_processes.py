"""The gRPC runtime with real processes on 127.0.0.1 (free ports, bounded waits, every process
stopped at the end even on failure): a job run by ``fedenc master`` and ``fedenc child``
processes; clean SIGTERM shutdown; a child killed mid-round and rejoining; a slow child dropped
at the deadline; the same target as the in-process runtime; a 1 GiB parameter set."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo  # the first optimizer step imports it: pay that at collection
from flwr.app import Array, ArrayRecord, Message, RecordDict
from typer.testing import CliRunner

from fedenc.cli import app as cli
from fedenc.federation.master import RoundResult, round_listener
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.grpc.launcher import child_command, child_env
from fedenc.runtime.grpc.master import FederationServer, GrpcGrid, ServerRun, run_server_app
from fedenc.runtime.grpc.transport import ServerSecurity
from fedenc.runtime.simulate import Scenario, run_scenario
from fedenc.training.checkpoint import load_checkpoint

HERE = Path(__file__).resolve().parent
TINY = {
    "synthetic-sessions": 400,
    "synthetic-items": 60,
    "hidden": 8,
    "batch-size": 50,
    "final-test": False,
    "wait-timeout": 90.0,
}
TINY_ARGS = ["--synthetic-sessions", "400", "--synthetic-items", "60", "--hidden", "8"]

pytestmark = pytest.mark.timeout(240)


def env() -> dict[str, str]:
    e = child_env()
    e["PYTHONPATH"] = os.pathsep.join([str(HERE), e["PYTHONPATH"]])  # grpc_apps
    return e


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Procs:
    """Processes started by a test; all are killed at the end whatever happens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, cmd: list[str], extra_env: dict[str, str | None] | None = None
    ) -> None:
        """Starts ``cmd``; ``extra_env`` adds variables to the environment (None removes one)."""
        log = (self.root / f"{name}.log").open("wb")
        merged: dict[str, str | None] = {**env(), **(extra_env or {})}
        self.procs[name] = subprocess.Popen(
            cmd,
            env={k: v for k, v in merged.items() if v is not None},
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait(self, name: str, timeout: float = 60) -> int:
        try:
            return self.procs[name].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{name} still running after {timeout} s:\n{self.log(name)}"
            ) from None

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def child(address: str, name: str, index: int, k: int, app: str = "nodes.child:app") -> list[str]:
    return child_command(
        address, name, index=index, children=k, options=["--app", app, "--threads", "1"]
    )


# -- master and children as CLI processes -------------------------------------------------------


def test_master_and_child_processes_run_a_job_and_exit_cleanly(
    procs: Procs, tmp_path: Path, free_port: int
) -> None:
    address = f"127.0.0.1:{free_port}"
    out = tmp_path / "out"
    procs.start(
        "master",
        [
            sys.executable,
            "-m",
            "fedenc.cli",
            "master",
            "--listen",
            address,
            "--insecure",
            "--children",
            "2",
            "--rounds",
            "2",
            "--out",
            str(out),
            *TINY_ARGS,
        ],
    )
    for i in range(2):
        procs.start(f"c{i}", child(address, f"site-{i}", i, 2))
    assert procs.wait("master", 150) == 0, procs.log("master")
    for i in range(2):  # the master's Close SHUTDOWN ends the children
        assert procs.wait(f"c{i}", 30) == 0, procs.log(f"c{i}")
        assert "the master closed the federation" in procs.log(f"c{i}")
    results = json.loads((out / "results.json").read_text())
    assert results["runtime"]["kind"] == "grpc" and results["runtime"]["wire_bytes_sent"] > 0
    assert [len(r["participants"]) for r in results["rounds"]] == [2, 2]
    assert "PLAINTEXT" in procs.log("master") and "PLAINTEXT" in procs.log("c0")
    model, meta = load_checkpoint(out / "encoder")
    assert meta["federation"]["rounds"] == 2 and model.config.hidden == 8


def test_sigterm_child_says_goodbye_and_sigterm_master_closes_every_stream(
    procs: Procs, free_port: int
) -> None:
    address = f"127.0.0.1:{free_port}"
    procs.start(
        "master",
        [
            sys.executable,
            "-m",
            "fedenc.cli",
            "master",
            "--listen",
            address,
            "--insecure",
            "--children",
            "5",
            "--rounds",
            "1",
            "--log-level",
            "info",
            *TINY_ARGS,
        ],
    )
    procs.start("c0", child(address, "c0", 0, 2))
    procs.start("c1", child(address, "c1", 1, 2))
    wait_for(lambda: procs.log("master").count("connected (fedenc") == 2, 90, "two children")
    procs.procs["c0"].send_signal(signal.SIGTERM)
    assert procs.wait("c0", 30) == 0, procs.log("c0")
    assert "goodbye" in procs.log("c0")
    wait_for(
        lambda: "c0 (node" in procs.log("master") and "says goodbye" in procs.log("master"),
        30,
        "the master to hear c0's goodbye",
    )
    procs.procs["master"].send_signal(signal.SIGTERM)
    assert procs.wait("master", 30) == 0, procs.log("master")
    assert "SIGTERM: closing every child's stream" in procs.log("master")
    assert procs.wait("c1", 30) == 0, procs.log("c1")
    assert "the master was stopped (SIGTERM)" in procs.log("c1")


def test_sigterm_during_a_clientapp_call_exits_0_without_aborting(
    procs: Procs, free_port: int, tmp_path: Path
) -> None:
    """The child's work runs in threads (the planner profiling its candidates, torch's pools):
    tearing the interpreter down under them aborted the process with exit 134."""
    address = f"127.0.0.1:{free_port}"
    master = [sys.executable, "-m", "fedenc.cli", "master", "--listen", address, "--insecure"]
    master += ["--children", "1", "--rounds", "1", *TINY_ARGS]
    procs.start("master", master)
    # --plan auto with an empty planner cache: the first round starts by profiling for seconds.
    command = child_command(address, "c0", plan="auto", options=["--threads", "1"])
    procs.start("c0", command, {"FEDENC_PLANNER_CACHE": str(tmp_path / "planner")})
    wait_for(lambda: "profiling" in procs.log("c0"), 120, "the child's planner to profile")
    procs.procs["c0"].send_signal(signal.SIGTERM)
    assert procs.wait("c0", 30) == 0, procs.log("c0")
    assert "goodbye (SIGTERM received)" in procs.log("c0")
    assert "terminate called" not in procs.log("c0")


# -- failures, with the master in this process -------------------------------------------------


class Master:
    """fedenc's ServerApp on a FederationServer in a thread of the test."""

    def __init__(self, run_config: dict[str, Any], on_round: Callable[[RoundResult], None]) -> None:
        from nodes.master import app as master_app

        self.server = FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)).start()
        self.result: list[ServerRun | BaseException] = []

        def run() -> None:
            token = round_listener.set(on_round)
            try:
                self.result.append(run_server_app(master_app, self.server, run_config))
            except BaseException as err:
                self.result.append(err)
            finally:
                round_listener.reset(token)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> dict[str, Any]:
        self.thread.join(timeout)
        assert self.result, f"the master did not finish within {timeout} s"
        outcome = self.result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        from nodes.master import RESULT_KEY

        summary: dict[str, Any] = json.loads(str(outcome.server_context.state[RESULT_KEY]["json"]))
        return summary


@pytest.fixture
def masters() -> Iterator[list[Master]]:
    made: list[Master] = []
    yield made
    for m in made:
        m.server.stop(grace=0.5)


def test_a_child_killed_mid_round_is_left_out_and_rejoins_after_a_restart(
    procs: Procs, masters: list[Master], tmp_path: Path
) -> None:
    marker = tmp_path / "training"
    restarted = threading.Event()
    address: list[str] = []

    def on_round(result: RoundResult) -> None:
        if result.round == 2:  # hold round 3 until the restarted child is back
            procs.start("c1-again", child(address[0], "c1", 1, 2))
            assert masters[0].server.wait_for_children(2, 90), procs.log("c1-again")
            restarted.set()

    run_config = {**TINY, "num-server-rounds": 3, "expect-children": 2, "round-timeout": 60.0}
    masters.append(Master(run_config, on_round))
    address.append(masters[0].server.address)
    procs.start("c0", child(address[0], "c0", 0, 2))
    procs.start(
        "c1",
        child(address[0], "c1", 1, 2, app="grpc_apps:flaky"),
        {"FEDENC_TEST_ROUND": "2", "FEDENC_TEST_MARKER": str(marker), "FEDENC_TEST_SLEEP": "120"},
    )
    wait_for(marker.exists, 120, "child-1 to start training round 2")
    procs.procs["c1"].kill()  # SIGKILL mid-round: no goodbye
    summary = masters[0].join(150)
    assert restarted.is_set()
    r1, r2, r3 = summary["rounds"]
    # The master reports the children by the names they connected with (--name).
    assert sorted(r1["participants"]) == ["c0", "c1"]
    assert r2["participants"] == ["c0"]
    assert "gone" in r2["excluded"]["c1"]
    assert r2["seconds"] < 60  # an error reply at once, not the 120 s sleep nor the timeout
    # Back under its own name (it was "c1#5": another participant in every report), and it
    # keeps the round it first joined.
    (rejoined,) = [c for c in summary["children"] if c["name"].startswith("c1")]
    assert rejoined["name"] == "c1" and rejoined["accepted"] and rejoined["joined_round"] == 1
    assert sorted(r3["participants"]) == ["c0", "c1"]


def test_a_slow_child_is_dropped_at_the_round_deadline(
    procs: Procs, masters: list[Master], tmp_path: Path
) -> None:
    marker = tmp_path / "training"
    run_config = {**TINY, "num-server-rounds": 1, "expect-children": 2, "round-timeout": 4.0}
    masters.append(Master(run_config, lambda r: None))
    address = masters[0].server.address
    procs.start("c0", child(address, "c0", 0, 2))
    procs.start(
        "c1",
        child(address, "c1", 1, 2, app="grpc_apps:flaky"),
        # Late by a few seconds: its train reply comes after the deadline and is dropped.
        {"FEDENC_TEST_ROUND": "1", "FEDENC_TEST_MARKER": str(marker), "FEDENC_TEST_SLEEP": "7"},
    )
    summary = masters[0].join(150)
    (r1,) = summary["rounds"]
    assert marker.exists()
    assert r1["participants"] == ["c0"]
    assert r1["excluded"]["c1"] == "no train reply within 4 s"
    # Still a member of the job (being late costs the round, not the membership).
    members = {c["name"]: c["accepted"] for c in summary["children"]}
    assert members == {"c0": True, "c1": True}
    masters[0].server.stop("test over")
    assert procs.wait("c1", 30) == 0


# -- parity and size -----------------------------------------------------------------------------


def test_processes_give_the_in_process_target_bit_for_bit(tmp_path: Path) -> None:
    scenario = Scenario(
        children=2,
        rounds=2,
        hidden=8,
        synthetic_sessions=400,
        synthetic_items=60,
        seed=3,
        partition="dirichlet",
        alpha=1.0,
    )
    inproc = run_scenario(scenario, tmp_path / "inproc")
    runner = CliRunner()
    args = [
        "simulate",
        "--processes",
        "--children",
        "2",
        "--rounds",
        "2",
        "--hidden",
        "8",
        "--synthetic-sessions",
        "400",
        "--synthetic-items",
        "60",
        "--seed",
        "3",
        "--partition",
        "dirichlet",
        "--alpha",
        "1.0",
        "--out",
        str(tmp_path / "grpc"),
        "--port",
        str(port := _free_port()),
    ]
    done = runner.invoke(cli, args)
    assert done.exit_code == 0, done.output
    results = json.loads((tmp_path / "grpc" / "results.json").read_text())
    assert results["runtime"]["kind"] == "processes"
    assert results["runtime"]["listen"] == f"127.0.0.1:{port}"  # --port: a firewall's hole
    assert results["runtime"]["child_exit_codes"] == [0, 0]
    a, _ = load_checkpoint(Path(inproc.result["checkpoint"]))
    b, _ = load_checkpoint(tmp_path / "grpc" / "encoder")
    shared = a.shared_parameter_names()
    assert shared and shared == b.shared_parameter_names()
    sa, sb = a.state_dict(), b.state_dict()
    for name in shared:
        assert torch.equal(sa[name], sb[name]), name
    assert results["rounds"][-1]["loss"] == inproc.result["rounds"][-1]["loss"]


@pytest.mark.slow
def test_a_1_gib_parameter_set_crosses_the_stream(procs: Procs) -> None:
    server = FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)).start()
    try:
        procs.start("big", child(server.address, "big", 0, 1, app="grpc_apps:checksum"))
        assert server.wait_for_children(1, 90), procs.log("big")
        grid = GrpcGrid(server, 99)
        n = (1 << 30) // 4
        values = np.empty(n, dtype=np.float32)
        values[:] = 0.5
        values[-1] = 3.0
        record = ArrayRecord({"big": Array(values)})
        del values
        (nid,) = grid.get_node_ids()
        with fc.task_identity(99):
            message = Message(RecordDict({"arrays": record}), nid, "query")
        t0 = time.perf_counter()
        (reply,) = grid.send_and_receive([message], timeout=120)
        seconds = time.perf_counter() - t0
        assert not reply.has_error(), reply.error.reason
        metrics = reply.content["metrics"]
        assert metrics["nbytes"] == 1 << 30 and metrics["arrays"] == 1
        assert metrics["sum"] == 0.5 * (n - 1) + 3.0
        assert grid.bytes_sent > 1 << 30  # every byte went through ~4 MiB frames
        print(f"1 GiB master -> child: {seconds:.1f} s ({(1 << 30) / seconds / 1e6:.0f} MB/s)")
    finally:
        server.stop(grace=0.5)


def test_a_child_with_computing_servers_exits_when_the_job_is_over(
    procs: Procs, tmp_path: Path, free_port: int
) -> None:
    # Its elastic site (task-information and data servers, worker processes) used to be closed
    # only at interpreter exit, by when its gRPC threads could not run: the child never exited.
    address = f"127.0.0.1:{free_port}"
    master = [sys.executable, "-m", "fedenc.cli", "master", "--listen", address, "--insecure"]
    master += ["--children", "1", "--rounds", "1", "--out", str(tmp_path / "out"), *TINY_ARGS]
    procs.start("master", master)
    child_cmd = child_command(address, "site-w", index=0, children=1, options=["--workers", "1"])
    procs.start("child", child_cmd)
    assert procs.wait("master", 150) == 0, procs.log("master")
    assert procs.wait("child", 30) == 0, procs.log("child")
    assert "computing server site-w-w0 registered" in procs.log("child")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("error", "code", "said"),
    [
        (OSError(28, "No space left on device", "/full/state/master.pt"), 2,
         "cannot write /full/state/master.pt: No space left on device"),
        (RuntimeError("[enforce fail at inline_container.cc] unexpected pos"), 1, None),
    ],
)  # fmt: skip
def test_a_master_whose_job_fails_on_anything_closes_its_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException, code: int, said: str
) -> None:
    # A full disk mid-job (or torch failing to write) used to escape the CLI's handlers: the
    # gRPC server was never stopped, and the master and its children waited for ever.
    from fedenc.runtime.grpc import master as grpc_master

    stopped: list[str] = []
    real_stop = grpc_master.FederationServer.stop

    def stop(self: Any, *args: Any, **kwargs: Any) -> None:
        stopped.append(str(args[0] if args else kwargs.get("detail", "")))
        real_stop(self, *args, **kwargs)

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(grpc_master.FederationServer, "stop", stop)
    monkeypatch.setattr(grpc_master, "run_server_app", fail)
    args = ["master", "--children", "1", "--insecure", "--listen", f"127.0.0.1:{_free_port()}"]
    done = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "job")])
    assert done.exit_code == code, done.output
    if said is not None:
        assert said in " ".join(done.output.split())
    else:
        assert isinstance(done.exception, RuntimeError)
    assert stopped and ("the job failed" in stopped[0] or "cannot write" in stopped[0])
