"""One scenario on the gRPC runtime, all on this machine: the master (this process) serves on a
free port of 127.0.0.1 and K ``fedenc child`` processes dial it (``fedenc simulate --processes``).

Child i is started as ``fedenc child --index i --children K`` with the scenario's data options,
so it holds the same partition as virtual child i of the in-process runtime; with the same seed
and the same torch thread count (``child_threads``, by default this process's), the target
parameters are bit-identical to the in-process runtime's on CPU. Every child process is stopped
at the end, also on failure: the master's Close SHUTDOWN first, then SIGTERM, then SIGKILL.

Mutual TLS by default, as between machines: without ``certs`` a throwaway CA, the master's
certificate and one certificate per child are made in a temporary directory (deleted at the end);
``certs`` uses an existing ``fedenc certs init`` directory, issuing the missing ``child-i``
certificates with its CA key; ``insecure=True`` runs in plaintext.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from fedenc.federation.master import RoundListener, round_listener
from fedenc.runtime.grpc.master import FederationServer, run_server_app
from fedenc.runtime.grpc.transport import ServerSecurity
from fedenc.runtime.simulate import Scenario, SimulationOutcome, outcome_of

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]


def child_env() -> dict[str, str]:
    """This process's environment, with the tree this ``fedenc`` comes from first on the path
    (a child must run the same code) and Flower kept offline."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return env


def child_command(
    address: str,
    name: str,
    *,
    index: int = 0,
    children: int = 1,
    insecure: bool = True,
    certs: Path | None = None,
    options: Sequence[str] = (),
    plan: str = "default",
) -> list[str]:
    """The command line of one ``fedenc child`` process (mutual TLS with ``certs``).

    ``plan`` defaults to the plain loop, not ``fedenc child``'s ``auto``: the children of a
    launched simulation share this machine's cores, so a plan measured by one alone would not
    hold, and the same seed must give the same encoder from run to run."""
    cmd = [sys.executable, "-m", "fedenc.cli", "child", "--master", address, "--name", name]
    cmd += ["--index", str(index), "--children", str(children), "--plan", plan]
    if certs is not None:
        cmd += ["--certs", str(certs)]
    elif insecure:
        cmd.append("--insecure")
    return [*cmd, *options]


def prepare_certs(names: Sequence[str], certs: Path | None, stack: ExitStack) -> Path:
    """A certificates directory holding the master's and ``names``' certificates: ``certs``
    (its missing child certificates issued with its CA key) or, when None, a throwaway CA in a
    temporary directory that ``stack`` deletes."""
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import init_certs, issue_child

    if certs is None:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedenc-certs-")))
        layout = CertLayout(root)
        init_certs(layout)  # hosts localhost and 127.0.0.1: the launcher's address
    else:
        layout = CertLayout(Path(certs))
    for name in names:
        if not layout.child_cert(name).exists():
            issue_child(layout, name)
    return layout.root


def scenario_child_options(scenario: Scenario, threads: int | None) -> list[str]:
    """The data options that give child i the scenario's partition i."""
    opts = ["--partition", scenario.partition, "--alpha", repr(scenario.alpha)]
    opts += ["--synthetic-sessions", str(scenario.synthetic_sessions)]
    opts += ["--synthetic-items", str(scenario.synthetic_items)]
    opts += ["--valid-fraction", repr(scenario.valid_fraction)]
    if scenario.data:
        opts += ["--data", scenario.data]
    if threads:
        opts += ["--threads", str(threads)]
    return opts


class ChildProcesses:
    """Child processes started together and always stopped (:meth:`stop`)."""

    def __init__(self, commands: Sequence[Sequence[str]], log_dir: Path | None = None) -> None:
        self.commands = [list(c) for c in commands]
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def start(self) -> ChildProcesses:
        env = child_env()
        for i, cmd in enumerate(self.commands):
            out: Any = None  # inherit stderr: children only log warnings by default
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                handle = (self.log_dir / f"child-{i}.log").open("wb")
                self._logs.append(handle)
                out = handle
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
            )
        return self

    def stop(self, timeout: float = 10.0) -> list[int]:
        """Waits ``timeout`` s for the children to exit, then SIGTERM, then SIGKILL; returns
        their exit codes."""
        deadline = time.monotonic() + timeout
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                if proc.poll() is None and sig is not None:
                    log.warning("child pid %d still running: %s", proc.pid, sig.name)
                    proc.send_signal(sig)
            for proc in self.procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in self.procs):
                break
            deadline = time.monotonic() + 5.0
        for handle in self._logs:
            handle.close()
        return [p.returncode for p in self.procs]

    def __enter__(self) -> ChildProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        # A child's interpreter shutdown (torch's destructors) takes seconds on a loaded machine:
        # a clean end waits for it before any signal.
        self.stop(timeout=0.0 if exc[0] is not None else 30.0)


def run_scenario_processes(
    scenario: Scenario,
    out_dir: Path | None = None,
    on_round: RoundListener | None = None,
    *,
    child_threads: int | None = None,
    startup_timeout: float = 120.0,
    certs: Path | None = None,
    insecure: bool = False,
    port: int = 0,
) -> SimulationOutcome:
    """Runs ``scenario`` with a master here, on 127.0.0.1:``port`` (0 = any free port), and
    ``scenario.children`` child processes (mutual TLS unless ``insecure``; see the module
    docstring for ``certs``)."""
    import torch

    scenario.check()
    if certs is not None and insecure:
        raise ValueError("give either certs or insecure, not both")
    threads = child_threads if child_threads is not None else torch.get_num_threads()
    names = [f"child-{i}" for i in range(scenario.children)]
    stack = ExitStack()
    with stack:
        if insecure:
            security, certs_dir = ServerSecurity(insecure=True), None
        else:
            from fedenc.runtime.grpc.security import server_security
            from fedenc.security.credentials import load_master_tls

            certs_dir = prepare_certs(names, certs, stack)
            security = server_security(load_master_tls(certs_dir, allowlist=names))
        server = FederationServer(f"127.0.0.1:{port}", security).start()
        options = scenario_child_options(scenario, threads)
        commands = [
            child_command(
                server.address,
                name,
                index=i,
                children=scenario.children,
                insecure=insecure,
                certs=certs_dir,
                options=options,
            )
            for i, name in enumerate(names)
        ]
        return _run(scenario, out_dir, on_round, server, commands, threads, startup_timeout)


def _run(
    scenario: Scenario,
    out_dir: Path | None,
    on_round: RoundListener | None,
    server: FederationServer,
    commands: list[list[str]],
    threads: int,
    startup_timeout: float,
) -> SimulationOutcome:
    from nodes.master import app as master_app

    procs = ChildProcesses(commands, None if out_dir is None else out_dir / "logs")
    codes: list[int] = []
    try:
        procs.start()
        run_config = scenario.run_config(out_dir)
        run_config["wait-timeout"] = startup_timeout
        token = round_listener.set(on_round)
        try:
            run = run_server_app(master_app, server, run_config)
        finally:
            round_listener.reset(token)
    finally:
        server.stop("the scenario is over")
        codes = procs.stop()
    runtime = {
        "kind": "processes",
        "listen": server.address,
        "wire_bytes_sent": run.bytes_sent,
        "wire_bytes_received": run.bytes_received,
        "seconds": run.seconds,
        "child_exit_codes": codes,
        "child_threads": threads,
        "tls": server.security.credentials is not None,
    }
    return outcome_of(scenario, out_dir, run.server_context, runtime)
