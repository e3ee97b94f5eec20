"""A served master restarted on the same ``--out`` lists its earlier jobs again and serves their
encoders (their records lived in memory only): a real job with two in-process gRPC children,
then a new service on the same folder."""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import pytest
import torch
from tiny_job import TINY_JOB

from fedenc.control.client import ControlClient
from fedenc.control.service import JOB_FILE, ControlService
from fedenc.proto.fedenc.v1 import control_pb2 as cpb
from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.runtime.grpc.child import GrpcChild
from fedenc.runtime.grpc.master import FederationServer
from fedenc.runtime.grpc.transport import ChannelSecurity, ServerSecurity

pytestmark = pytest.mark.timeout(180)

INSECURE = ChannelSecurity(insecure=True)
TINY = {**TINY_JOB, "expect-children": 2, "wait-timeout": 30.0}


def serve(out: Path, listen: str = "127.0.0.1:0") -> ControlService:
    server = FederationServer(listen, ServerSecurity(insecure=True))
    control = ControlService(server, TINY, out).attach()
    server.start()
    return control


def start_children(
    address: str, connect_timeout: float
) -> tuple[list[GrpcChild], list[threading.Thread]]:
    """Two in-process children c0, c1 of the real child app, each on a thread."""
    from nodes.child import app as child_app

    kids = [
        GrpcChild(
            address,
            f"c{i}",
            child_app,
            {"partition-id": i, "num-partitions": 2},
            INSECURE,
            connect_timeout=connect_timeout,
        )
        for i in range(2)
    ]
    threads = [threading.Thread(target=k.run, daemon=True) for k in kids]
    for t in threads:
        t.start()
    return kids, threads


def test_a_restarted_master_lists_its_earlier_jobs_and_serves_their_encoders(
    tmp_path: Path,
) -> None:
    out = tmp_path / "jobs"
    first = serve(out)
    address = first._server.address
    kids, threads = start_children(address, connect_timeout=10)
    try:
        with ControlClient(address, INSECURE) as client:
            job = client.submit(cpb.JobSpec(rounds=2), requester="before")
            done = [e.job for e in client.watch(job.job_id) if e.WhichOneof("event") == "job"][-1]
            assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
            before = client.download(job.job_id)
            cancelled = client.submit(cpb.JobSpec(rounds=500), requester="before")
            client.cancel(cancelled.job_id, "not needed")
    finally:
        first.stop(timeout=10)
        first._server.stop("restart")
        for k in kids:
            k.stop()
        for t in threads:
            t.join(10)
    assert (out / job.job_id / JOB_FILE).is_file()

    again = serve(out)  # a new process would do the same: no child needed to list or download
    try:
        with ControlClient(again._server.address, INSECURE) as client:
            jobs = {j.job_id: j for j in client.jobs()}
            assert jobs[job.job_id].state == cpb.JOB_STATE_SUCCEEDED
            assert jobs[job.job_id].requester == "before" and jobs[job.job_id].rounds_done == 2
            assert jobs[cancelled.job_id].state == cpb.JOB_STATE_CANCELLED
            after = client.download(job.job_id)
            assert after.tensors.keys() == before.tensors.keys()
            for name, tensor in after.tensors.items():
                assert torch.equal(tensor, before.tensors[name]), name
            rounds = [
                e.round.round for e in client.watch(job.job_id) if e.WhichOneof("event") == "round"
            ]
            assert rounds == [1, 2]
    finally:
        again.stop(timeout=5)
        again._server.stop("test over")


def test_a_job_running_when_its_master_stops_resumes_under_the_next_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The master is stopped mid-job: the job is interrupted after its round (not cancelled),
    the children wait (RESTART), and a master started again on the same folder and port
    resumes it from its checkpoint, to the encoder an uninterrupted job gives, bit for bit."""
    out = tmp_path / "jobs"
    first = serve(out)
    address = first._server.address
    kids, threads = start_children(address, connect_timeout=60)
    again = None
    try:
        with ControlClient(address, INSECURE) as client:
            job = client.submit(cpb.JobSpec(rounds=3), requester="ops")
            for event in client.watch(job.job_id):
                if event.WhichOneof("event") == "round":
                    break  # round 1 is checkpointed
        assert first.stop(timeout=60, keep=True)  # interrupted with a checkpoint: children wait
        first._server.stop("restart", reason=spb.CLOSE_REASON_RESTART)
        record = json.loads((out / job.job_id / JOB_FILE).read_text())
        # Queued for the next master, which counts no crash: the master did not die.
        assert record["state"] == "JOB_STATE_QUEUED" and int(record["started_unix_ms"]) > 0
        assert "crashes" not in record

        port = int(address.rsplit(":", 1)[1])
        with caplog.at_level(logging.INFO, logger="fedenc.federation.master"):
            again = serve(out, f"127.0.0.1:{port}")
            done = again.wait(job.job_id, timeout=150)
        assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
        assert re.search(rf"job {job.job_id}: resumed after round [12]\b", caplog.text)
        assert [r.round for r in done.rounds] == [1, 2, 3]
        assert done.crashes == 0
        with ControlClient(again._server.address, INSECURE) as client:
            resumed = client.download(job.job_id)
            reference = client.submit(cpb.JobSpec(rounds=3), requester="ops")
        fresh = again.wait(reference.job_id, timeout=150)
        assert fresh.state == cpb.JOB_STATE_SUCCEEDED, fresh.error
        with ControlClient(again._server.address, INSECURE) as client:
            uninterrupted = client.download(reference.job_id)
        for name, tensor in resumed.tensors.items():
            assert torch.equal(tensor, uninterrupted.tensors[name]), name
    finally:
        for control in (first, again):
            if control is not None:
                control.stop(timeout=5, keep=False)
                control._server.stop("test over")
        for k in kids:
            k.stop()
        for t in threads:
            t.join(10)


def _record(out: Path, job_id: str, **changes: object) -> None:
    """Edit a job's job.json as a master that stopped at some moment would have left it."""
    path = out / job_id / JOB_FILE
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def test_unfinished_records_are_queued_again_ended_or_refused_as_they_say(tmp_path: Path) -> None:
    """Without children or rounds: what a new master makes of each kind of record."""
    out = tmp_path / "jobs"
    first = ControlService(
        FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY, out
    )  # not attached: its jobs stay queued
    queued, running, cancelled, damaged = (
        first.submit(cpb.JobSpec(rounds=2), requester="ops") for _ in range(4)
    )
    with pytest.raises(ValueError, match="another master serves"):  # one master per folder
        ControlService(FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY, out)
    first.stop(timeout=1, keep=True)
    assert json.loads((out / queued.job_id / JOB_FILE).read_text())["state"] == "JOB_STATE_QUEUED"
    _record(out, running.job_id, state="JOB_STATE_RUNNING")
    _record(out, cancelled.job_id, state="JOB_STATE_RUNNING", cancel_requested=True)
    _record(out, damaged.job_id, state="JOB_STATE_RUNNING")
    (out / damaged.job_id / "state").mkdir(parents=True)
    (out / damaged.job_id / "state" / "master.pt").write_bytes(b"not a checkpoint")
    moved = tmp_path / "moved"
    out.rename(moved)  # and the folder moved: the jobs run where their records are now

    again = ControlService(
        FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY, moved
    )
    try:
        assert [j.job_id for j in again._queue] == [running.job_id, queued.job_id]
        assert all(j.run_config["out-dir"] == str(moved / j.job_id) for j in again._queue)
        assert again.job(cancelled.job_id).state == cpb.JOB_STATE_CANCELLED  # a user's cancel
        failed = again.job(damaged.job_id)
        assert failed.state == cpb.JOB_STATE_FAILED
        assert "cannot resume after the master's restart" in failed.error
        # Recorded: a third master agrees.
        saved = json.loads((moved / damaged.job_id / JOB_FILE).read_text())
        assert saved["state"] == "JOB_STATE_FAILED"
    finally:
        again.stop(timeout=1)


def test_a_job_whose_master_keeps_dying_is_failed_past_max_crashes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record still RUNNING was left by a master that died: each new master counts it, and
    the one that finds more than ``max_crashes`` fails the job instead of running it again."""
    out = tmp_path / "jobs"

    def service() -> ControlService:
        return ControlService(
            FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY, out,
            max_crashes=1,
        )  # fmt: skip

    first = service()  # not attached: the job stays queued
    job = first.submit(cpb.JobSpec(rounds=2), requester="ops")
    first.stop(timeout=1, keep=True)
    for crash in (1, 2):
        _record(out, job.job_id, state="JOB_STATE_RUNNING", started_unix_ms="1000")  # it died
        with caplog.at_level(logging.INFO, logger="fedenc.control.service"):
            again = service()
        again.stop(timeout=1, keep=True)
        restored = again.job(job.job_id)
        assert restored is not None and restored.crashes == crash
        saved = json.loads((out / job.job_id / JOB_FILE).read_text())
        assert saved["crashes"] == crash  # recorded, so the next master counts on from it
        if crash == 1:
            assert restored.state == cpb.JOB_STATE_QUEUED
            assert f"job {job.job_id}: its master died while running it (1 of at most 1" in (
                caplog.text
            )
    assert restored.state == cpb.JOB_STATE_FAILED
    assert "its master died 2 times while running it" in restored.error
    assert "--max-crashes 1" in restored.error
    assert saved["state"] == "JOB_STATE_FAILED"
    # A record the signal left (QUEUED, started) counts nothing and goes first.
    other = service()
    try:
        assert other.job(job.job_id).state == cpb.JOB_STATE_FAILED
    finally:
        other.stop(timeout=1)
    with pytest.raises(ValueError, match="max_crashes must be >= 0"):
        ControlService(
            FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY,
            tmp_path / "other", max_crashes=-1,
        )  # fmt: skip


def test_a_stop_whose_round_outlasts_the_wait_is_no_crash(tmp_path: Path) -> None:
    # SIGTERM mid-round: stop() waits a while for the round; one that outlasts it must still be
    # recorded as interrupted (QUEUED), or every ordinary restart would count as a crash.
    import time

    from flwr.serverapp import ServerApp

    release = threading.Event()
    slow = ServerApp()

    @slow.main()
    def main(grid: object, context: object) -> None:
        release.wait(30)  # a round that outlasts the stop's wait
        raise RuntimeError("the round ended after its master stopped")

    out = tmp_path / "jobs"
    server = FederationServer("127.0.0.1:0", ServerSecurity(insecure=True))
    first = ControlService(server, TINY, out, server_app=slow).attach()
    server.start()
    try:
        job = first.submit(cpb.JobSpec(rounds=2), requester="ops")
        deadline = time.monotonic() + 30
        while first.job(job.job_id).state != cpb.JOB_STATE_RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first.stop(timeout=0.2, keep=True)
        record = json.loads((out / job.job_id / JOB_FILE).read_text())
        assert record["state"] == "JOB_STATE_QUEUED"
        release.set()  # the worker ends its round after the stop: it records nothing more
        first._worker.join(10)
        assert json.loads((out / job.job_id / JOB_FILE).read_text())["state"] == (
            "JOB_STATE_QUEUED"
        )
        assert not (out / job.job_id / "results.json").exists()
    finally:
        release.set()
        server.stop("test over")
    again = ControlService(
        FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY, out
    )
    try:
        restored = again.job(job.job_id)
        assert restored.crashes == 0 and restored.state == cpb.JOB_STATE_QUEUED
        assert restored.interrupted  # it ran: it goes first
    finally:
        again.stop(timeout=1)


def test_an_interrupted_job_goes_before_the_queue_and_counts_no_crash(tmp_path: Path) -> None:
    out = tmp_path / "jobs"
    first = ControlService(
        FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY, out
    )  # not attached: its jobs stay queued
    queued, interrupted = (first.submit(cpb.JobSpec(rounds=2), requester="ops") for _ in range(2))
    first.stop(timeout=1, keep=True)
    _record(out, interrupted.job_id, started_unix_ms="1000")  # QUEUED, but it ran: a signal
    again = ControlService(
        FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)), TINY, out
    )
    try:
        assert [j.job_id for j in again._queue] == [interrupted.job_id, queued.job_id]
        assert again.job(interrupted.job_id).crashes == 0
    finally:
        again.stop(timeout=1)
