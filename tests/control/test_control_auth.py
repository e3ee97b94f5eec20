"""Who may call the Control API under mutual TLS: operators (``--operators``) submit, cancel and
list; any other certificate of the federation's CA (a child's) may only request, watch and
download encoders; the proven name is kept with the job and its cancel; an operator's
certificate cannot join the federation as a child."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from fedenc.control.cli import security_of
from fedenc.control.client import ControlClient, ControlError
from fedenc.control.service import ControlService
from fedenc.proto.fedenc.v1 import control_pb2 as cpb
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.runtime.grpc.child import EXIT_REFUSED, GrpcChild
from fedenc.runtime.grpc.master import FederationServer
from fedenc.runtime.grpc.security import channel_security, server_security
from fedenc.security.credentials import load_child_tls, load_master_tls
from fedenc.security.layout import CertLayout
from fedenc.security.store import init_certs, issue_child

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = CertLayout(tmp_path_factory.mktemp("auth") / "certs")
    init_certs(layout)
    for name in ("operator", "site-a", "site-z"):
        issue_child(layout, name)
    return layout.root


def serve(certs: Path, out: Path, allowlist: list[str] | None) -> ControlService:
    server = FederationServer(
        "127.0.0.1:0", server_security(load_master_tls(certs, allowlist=allowlist))
    )
    control = ControlService(server, {"num-server-rounds": 1}, out).attach()
    server.start()
    return control


@pytest.fixture
def service(certs: Path, tmp_path: Path) -> Iterator[ControlService]:
    # Children must be allowlisted; the operator is not, and still reaches the Control API.
    control = serve(certs, tmp_path / "jobs", allowlist=["site-a"])
    try:
        yield control
    finally:
        control.stop(timeout=5)
        control._server.stop("test over")


def client(service: ControlService, certs: Path, name: str) -> ControlClient:
    return ControlClient(service._server.address, security_of(False, certs, name))


def test_only_operators_submit_cancel_and_list(service: ControlService, certs: Path) -> None:
    with client(service, certs, "site-a") as child:
        for call in (
            lambda: child.submit(cpb.JobSpec(rounds=1), requester="me"),
            child.jobs,
            child.children,
            lambda: child.cancel("x", "why"),
        ):
            with pytest.raises(ControlError) as err:
                call()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "certificate 'site-a' is not an operator of this master" in str(err.value)
        # a child may ask for an encoder (claim 2), and follow and fetch it, but not choose
        # what a new job costs
        expensive = fpb.EncoderRequest(encoder_type="srgnn", round_budget=10**6)
        with pytest.raises(ControlError) as err:
            child.request_encoder(expensive)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "only operators start jobs with their own" in str(err.value)
        answer = child.request_encoder(fpb.EncoderRequest(encoder_type="srgnn", requester="app"))
        assert answer.job.requester == "site-a: app"  # the proven name, then the claim
        assert child.job(answer.job.job_id).job_id == answer.job.job_id
    with client(service, certs, "operator") as op:
        job = op.submit(cpb.JobSpec(rounds=1), requester="fedenc train (me@host)")
        assert job.requester == "operator: fedenc train (me@host)"
        assert {j.job_id for j in op.jobs()} >= {job.job_id, answer.job.job_id}
        cancelled = op.cancel(job.job_id, "not needed")
    assert service.job(job.job_id) is not None
    assert "by operator: not needed" in str(service.job(job.job_id).cancel_reason)  # type: ignore[union-attr]
    assert cancelled.cancel_requested


def test_children_hold_few_streams_see_no_other_ids_and_need_the_allowlist(
    service: ControlService, certs: Path
) -> None:
    with client(service, certs, "operator") as op:
        job = op.submit(cpb.JobSpec(rounds=1), requester="op")
    with client(service, certs, "site-a") as child:
        # GetJob's NOT_FOUND listed the latest job ids: ListJobs by another door.
        with pytest.raises(ControlError) as err:
            child.job("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and job.job_id not in str(err.value)
        # Two long streams per child at most: one child could take every server thread.
        open_streams = [child.watch(job.job_id) for _ in range(2)]
        for stream in open_streams:
            next(stream)
        with pytest.raises(ControlError) as err:
            next(child.watch(job.job_id))
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "'site-a' has 2 streams open already" in str(err.value)
    # A certificate of the CA that the allowlist does not admit is no child of this federation.
    with client(service, certs, "site-z") as stranger:
        with pytest.raises(ControlError) as err:
            stranger.job(job.job_id)
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "not in this master's allowlist" in str(err.value)


def test_an_operators_certificate_cannot_join_as_a_child(certs: Path, tmp_path: Path) -> None:
    # Without an allowlist every certificate of the CA may join: not an operator's.
    control = serve(certs, tmp_path / "jobs", allowlist=None)
    try:
        address = control._server.address
        security = channel_security(load_child_tls(certs, "operator"), address)
        child = GrpcChild(address, "operator", lambda m, c: m, {}, security, connect_timeout=5)
        assert child.run() == EXIT_REFUSED
        assert "certificate 'operator' is an operator's" in str(child.refusal)
    finally:
        control.stop(timeout=5)
        control._server.stop("test over")
