"""The gRPC runtime over mutual TLS, with certificates made by fedenc.security in a temporary
directory: a whole job with `fedenc master --certs` / `fedenc child --certs` processes; children
that are refused (another CA, not allowlisted, a certificate that fails the child's own check,
a Hello naming someone else, a certificate revoked while its stream is open), with the reason on
both sides; the transport policy of the CLIs."""

from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from test_grpc_processes import TINY_ARGS, Procs, wait_for
from typer.testing import CliRunner

from fedenc.cli import app as cli
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.grpc.child import EXIT_REFUSED, GrpcChild
from fedenc.runtime.grpc.launcher import child_command
from fedenc.runtime.grpc.master import FederationServer, GrpcGrid
from fedenc.runtime.grpc.security import channel_security, server_security
from fedenc.security.credentials import load_child_tls, load_master_tls
from fedenc.security.layout import CertLayout
from fedenc.security.store import init_certs, issue_child, revoke_child

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


@pytest.fixture
def certs(tmp_path: Path) -> CertLayout:
    layout = CertLayout(tmp_path / "certs")
    init_certs(layout)
    for name in ("site-0", "site-1", "bob"):
        issue_child(layout, name)
    return layout


def master_cmd(address: str, certs: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedenc.cli",
        "master",
        "--listen",
        address,
        "--certs",
        str(certs),
        *extra,
        *TINY_ARGS,
    ]


def child_cmd(address: str, name: str, certs: Path, index: int = 0, *extra: str) -> list[str]:
    return child_command(
        address, name, index=index, children=2, certs=certs, options=["--threads", "1", *extra]
    )


def test_a_job_runs_over_mutual_tls(procs: Procs, certs: CertLayout, free_port: int) -> None:
    address = f"127.0.0.1:{free_port}"
    out = procs.root / "out"
    procs.start(
        "master",
        master_cmd(address, certs.root, "--children", "2", "--rounds", "2", "--out", str(out)),
    )
    for i in range(2):
        procs.start(f"c{i}", child_cmd(address, f"site-{i}", certs.root, i))
    assert procs.wait("master", 150) == 0, procs.log("master")
    for i in range(2):
        assert procs.wait(f"c{i}", 30) == 0, procs.log(f"c{i}")
    results = json.loads((out / "results.json").read_text())
    assert results["runtime"]["tls"] is True
    assert [len(r["participants"]) for r in results["rounds"]] == [2, 2]
    master_log = procs.log("master")
    # The master knows each child by the name in its certificate.
    assert "child site-0 (node" in master_log and "child site-1 (node" in master_log
    for name in ("master", "c0", "c1"):
        assert "PLAINTEXT" not in procs.log(name), name


def test_unknown_and_not_allowlisted_children_are_refused_on_both_sides(
    procs: Procs, certs: CertLayout, tmp_path: Path, free_port: int
) -> None:
    # eve: a certificate of another CA, next to this federation's ca.pem (she trusts the master).
    rogue = CertLayout(tmp_path / "rogue")
    init_certs(rogue)
    issue_child(rogue, "eve")
    eve = tmp_path / "eve"
    eve.mkdir()
    shutil.copy(certs.ca_cert, eve / "ca.pem")
    shutil.copy(rogue.child_cert("eve"), eve / "eve.pem")
    shutil.copy(rogue.child_key("eve"), eve / "eve.key")
    allow = tmp_path / "allowed.txt"
    allow.write_text("# who may join\nsite-0\nsite-1\n")
    address = f"127.0.0.1:{free_port}"
    procs.start(
        "master",
        master_cmd(
            address, certs.root, "--allowlist", str(allow), "--children", "2", "--wait", "120"
        ),
        # As from a shell: not the "error" that importing Flower put in this test's environment.
        {"GRPC_VERBOSITY": None},
    )
    wait_for(lambda: "listening on" in procs.log("master"), 60, "the master to listen")
    procs.start("eve", child_cmd(address, "eve", eve, 0, "--no-local-check"))
    procs.start("bob", child_cmd(address, "bob", certs.root, 1))
    procs.start("eve-local", child_cmd(address, "eve", eve, 0))  # her own check fails first
    assert procs.wait("bob", 60) == EXIT_REFUSED, procs.log("bob")
    assert procs.wait("eve", 60) == EXIT_REFUSED, procs.log("eve")
    assert procs.wait("eve-local", 60) == EXIT_REFUSED, procs.log("eve-local")
    bob, eve_log, eve_local = procs.log("bob"), procs.log("eve"), procs.log("eve-local")
    assert "fedenc identity refused (not-allowlisted): child 'bob'" in bob
    assert "ask the master's operator to add 'bob' to its allowlist" in bob
    assert "closed the connection during the TLS handshake" in eve_log
    assert "issued by another CA" in eve_log
    assert "is not signed by the CA in use" in eve_local
    master_log = procs.log("master")
    assert "refusing the stream of" in master_log
    assert "fedenc identity refused (not-allowlisted): child 'bob'" in master_log
    # eve never reached fedenc's code: BoringSSL refused her certificate during the handshake.
    assert "Handshake failed" in master_log and "CERTIFICATE_VERIFY_FAILED" in master_log
    assert "child eve" not in master_log and "child bob" not in master_log
    procs.procs["master"].send_signal(signal.SIGTERM)
    assert procs.wait("master", 30) == 0, master_log


def test_the_transport_policy_of_master_and_child(certs: CertLayout, tmp_path: Path) -> None:
    runner = CliRunner()
    neither = runner.invoke(cli, ["child", "--name", "site-0"])
    assert neither.exit_code == 2
    assert "refusing to start the child without TLS: pass --certs DIR" in neither.output
    both = runner.invoke(cli, ["master", "--certs", str(certs.root), "--insecure"])
    assert both.exit_code == 2 and "either --certs DIR or --insecure" in both.output
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = runner.invoke(cli, ["master", "--certs", str(empty), "--listen", "127.0.0.1:0"])
    assert missing.exit_code == 2 and "fedenc certs init" in missing.output
    plain_allow = runner.invoke(cli, ["master", "--insecure", "--allowlist", str(empty / "x")])
    assert plain_allow.exit_code == 2 and "--allowlist needs --certs" in plain_allow.output
    not_mine = runner.invoke(cli, ["child", "--certs", str(certs.root), "--name", "nobody"])
    assert not_mine.exit_code == EXIT_REFUSED


# -- in this process: a Hello naming someone else, a revocation while the stream is open ---------


def echo_app(msg: Message, ctx: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"n": 1})}), reply_to=msg)


@pytest.fixture
def tls_server(certs: CertLayout) -> Iterator[FederationServer]:
    server = FederationServer("127.0.0.1:0", server_security(load_master_tls(certs.root))).start()
    try:
        yield server
    finally:
        server.stop(grace=0.5)


def run_child(child: GrpcChild) -> tuple[threading.Thread, list[int]]:
    code: list[int] = []
    thread = threading.Thread(target=lambda: code.append(child.run()), daemon=True)
    thread.start()
    return thread, code


def test_a_hello_naming_someone_else_is_refused(
    tls_server: FederationServer, certs: CertLayout
) -> None:
    # site-0's certificate, but the Hello claims bob.
    security = channel_security(load_child_tls(certs.root, "site-0"), tls_server.address)
    child = GrpcChild(tls_server.address, "bob", echo_app, {}, security, connect_timeout=10)
    thread, code = run_child(child)
    thread.join(30)
    assert code == [EXIT_REFUSED]
    assert "certificate of" in child.refusal and "names child 'site-0'" in child.refusal
    assert "the Hello claims 'bob'" in child.refusal
    assert tls_server.children() == {}


def test_a_plaintext_child_of_a_tls_master_is_told_why_it_gets_no_connection(
    tls_server: FederationServer, caplog: pytest.LogCaptureFixture
) -> None:
    from fedenc.runtime.grpc.transport import ChannelSecurity

    plaintext = ChannelSecurity(insecure=True)
    child = GrpcChild(tls_server.address, "site-0", echo_app, {}, plaintext, connect_timeout=1)
    assert child.run() == 1
    assert "the master closes plaintext connections: it runs with --certs?" in caplog.text


def test_a_certificate_revoked_while_its_stream_is_open_ends_it_before_the_next_round(
    tls_server: FederationServer, certs: CertLayout
) -> None:
    tls = load_child_tls(certs.root, "site-0")
    child = GrpcChild(
        tls_server.address,
        "site-0",
        echo_app,
        {},
        channel_security(tls, tls_server.address),
        connect_timeout=10,
    )
    thread, code = run_child(child)
    try:
        assert tls_server.wait_for_children(1, 30)
        grid = GrpcGrid(tls_server, 7)
        (nid,) = grid.get_node_ids()
        with fc.task_identity(7):
            first = Message(RecordDict(), nid, "query", group_id="1")
        (reply,) = grid.send_and_receive([first], timeout=10)
        assert not reply.has_error()
        time.sleep(1.1)  # a new crl.pem mtime: the verifier reloads it
        revoke_child(certs, "site-0")
        with fc.task_identity(7):
            second = Message(RecordDict(), nid, "query", group_id="2")
        (refused,) = grid.send_and_receive([second], timeout=10)
        assert refused.has_error() and "fedenc identity refused (revoked)" in refused.error.reason
        thread.join(30)
        assert code == [EXIT_REFUSED]
        assert child.refusal.startswith("the master refused this child (UNAUTHORIZED)")
        assert "fedenc certs issue site-0 --dir CA_DIR --force" in child.refusal
        wait_for(lambda: tls_server.children() == {}, 10, "the stream to be gone")
    finally:
        child.stop()
        thread.join(10)
