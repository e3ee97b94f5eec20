"""A served master (`fedenc master --serve`) and two `fedenc child` processes on 127.0.0.1 for
the Control API tests (tests/runtime/conftest.py's session fixture ``control_master``)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedenc.control.client import ControlClient, ControlError
from fedenc.runtime.grpc.launcher import child_command, child_env
from fedenc.runtime.grpc.transport import ChannelSecurity


@dataclass
class ControlMaster:
    """A real `fedenc master --serve` on 127.0.0.1 with two child processes, shared by the
    Control API tests of a session (its jobs run one after the other on the same children)."""

    address: str
    out_root: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


#: Tiny synthetic data and encoder: each job takes a second or two.
CONTROL_DATA = ["--synthetic-sessions", "400", "--synthetic-items", "60"]


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    master = procs.get("master")
    if master is not None and master.poll() is None:
        master.send_signal(signal.SIGTERM)  # closes every child's stream: the children exit
        try:
            master.wait(20)
        except subprocess.TimeoutExpired:
            pass
    for proc in procs.values():
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextmanager
def serve_control_master(root: Path) -> Iterator[ControlMaster]:
    """Starts the processes, waits until both children are connected, stops every process at
    the end whatever happens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    master_cmd = [sys.executable, "-m", "fedenc.cli", "master", "--serve", "--listen", address]
    master_cmd += ["--insecure", "--children", "2", "--wait", "60", "--rounds", "2"]
    master_cmd += ["--hidden", "8", *CONTROL_DATA, "--out", str(root / "jobs")]
    commands = {"master": master_cmd}
    for i in range(2):
        options = [*CONTROL_DATA, "--threads", "1"]
        commands[f"c{i}"] = child_command(address, f"c{i}", index=i, children=2, options=options)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    served = ControlMaster(address, root / "jobs", root, procs)
    try:
        for name, cmd in commands.items():
            with (root / f"{name}.log").open("wb") as log:
                procs[name] = subprocess.Popen(
                    cmd, env=child_env(), stdout=log, stderr=log, stdin=subprocess.DEVNULL
                )
        deadline = time.monotonic() + 240  # generous: imports crawl on a loaded 2-core machine
        with ControlClient(address, ChannelSecurity(insecure=True), timeout=5) as client:
            while True:
                if procs["master"].poll() is not None:
                    raise AssertionError(f"the master exited:\n{served.log('master')}")
                try:
                    if sum(c.connected for c in client.children()) == 2:
                        break
                except ControlError:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(
                        "two children did not connect within 240 s:\n" + served.log("master")
                    )
                time.sleep(0.2)
        yield served
    finally:
        _stop(procs)
