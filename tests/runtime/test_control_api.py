"""The Control API (fedenc.v1.Control) end to end: a real `fedenc master --serve` process and two
`fedenc child` processes on 127.0.0.1 (the session's ``control_master``), driven over gRPC by
fedenc's client and by `fedenc train --master`: submit, watch, download (equal to the master's
saved encoder), RequestEncoder starting a job (claim 2), cancel, list children, and errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from control_master import ControlMaster
from google.protobuf.struct_pb2 import Struct
from typer.testing import CliRunner

from fedenc.cli import app as cli
from fedenc.control.client import ControlClient, ControlError
from fedenc.control.service import MAX_WATCHERS
from fedenc.proto.fedenc.v1 import control_pb2 as cpb
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.proto.fedenc.v1.control_pb2_grpc import ControlStub
from fedenc.runtime.grpc.launcher import child_env
from fedenc.runtime.grpc.transport import ChannelSecurity
from fedenc.training.checkpoint import STATE_FILE, load_checkpoint

pytestmark = pytest.mark.timeout(400)  # the first test also starts the shared processes


@pytest.fixture
def client(control_master: ControlMaster) -> Iterator[ControlClient]:
    with ControlClient(control_master.address, ChannelSecurity(insecure=True)) as c:
        yield c


def struct(**values: object) -> Struct:
    s = Struct()
    s.update(values)
    return s


def watch_all(client: ControlClient, job_id: str) -> tuple[list[cpb.Job], list[cpb.RoundReport]]:
    jobs: list[cpb.Job] = []
    rounds: list[cpb.RoundReport] = []
    for event in client.watch(job_id):
        if event.WhichOneof("event") == "job":
            jobs.append(event.job)
        else:
            rounds.append(event.round)
    return jobs, rounds


def saved_state(control_master: ControlMaster, job_id: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(
        control_master.out_root / job_id / "encoder" / STATE_FILE, weights_only=True
    )
    return state


def test_submit_watch_and_download_the_masters_saved_encoder(
    client: ControlClient, control_master: ControlMaster
) -> None:
    spec = cpb.JobSpec(encoder_type="srgnn", encoder_config=struct(hidden=8), rounds=2)
    spec.training.batch_size = 50
    job = client.submit(spec, requester="test")
    assert job.state in (cpb.JOB_STATE_QUEUED, cpb.JOB_STATE_RUNNING)
    assert job.requester == "test" and job.round_budget == 2
    jobs, rounds = watch_all(client, job.job_id)
    # first the job as it was, last the job in its final state; every round once, in order
    assert jobs[-1].state == cpb.JOB_STATE_SUCCEEDED, jobs[-1]
    assert jobs[-1].encoder_available and jobs[-1].rounds_done == 2
    assert [r.round for r in rounds] == [1, 2]
    for report in rounds:
        assert len(report.participants) == 2 and not report.excluded
        assert report.HasField("loss") and report.HasField("recall_at_20")
        assert report.HasField("mrr_at_20") and report.bytes_sent > 0 and report.seconds > 0
        assert abs(sum(report.weights.values()) - 1.0) < 1e-9
    assert rounds[-1].stop_reason and not rounds[0].stop_reason
    assert "test_recall@20" in jobs[-1].final_metrics
    # a second watch of the finished job replays the same rounds
    again_jobs, again = watch_all(client, job.job_id)
    assert [r.SerializeToString() for r in again] == [r.SerializeToString() for r in rounds]
    assert again_jobs[0].state == again_jobs[-1].state == cpb.JOB_STATE_SUCCEEDED
    # the download is the master's saved encoder, bit for bit, in chunks the default client takes
    download = client.download(job.job_id)
    saved = saved_state(control_master, job.job_id)
    info = download.info
    assert info.encoder.type == "srgnn" and info.rounds == 2 and not info.local_tensors
    assert [s.name for s in info.encoder.shared_parameters] == list(download.tensors)
    assert set(download.tensors) <= set(saved)
    for name, tensor in download.tensors.items():
        assert torch.equal(tensor, saved[name]), name
    assert info.metadata["federation"]["job_id"] == job.job_id
    full = client.download(job.job_id, include_local=True)
    assert set(full.tensors) == set(saved)


def test_fedenc_train_master_watches_and_writes_a_checkpoint(
    control_master: ControlMaster, tmp_path: Path
) -> None:
    out = tmp_path / "encoder"
    cmd = [sys.executable, "-m", "fedenc.cli", "train", "--master", control_master.address]
    cmd += ["--insecure", "--rounds", "2", "--epochs", "1", "--hidden", "8", "--out", str(out)]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "round 1: 2/2 children" in done.stderr and "round 2: 2/2 children" in done.stderr
    model, meta = load_checkpoint(out)
    job_id = meta["control"]["job_id"]
    assert f"job {job_id} succeeded" in done.stderr
    assert meta["federation"]["rounds"] == 2 and model.config.hidden == 8
    saved = saved_state(control_master, job_id)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_request_encoder_starts_a_job_once_then_answers_with_it(client: ControlClient) -> None:
    request = fpb.EncoderRequest(
        encoder_type="edge_attn", config=struct(hidden=8), requester="child c0", round_budget=1
    )
    first = client.request_encoder(request)
    assert first.started and first.job.encoder_type == "edge_attn"
    assert first.job.requester == "child c0" and first.job.round_budget == 1
    # while it is queued or running, the same request joins it instead of starting another
    second = client.request_encoder(request)
    assert not second.started and second.job.job_id == first.job.job_id
    jobs, rounds = watch_all(client, first.job.job_id)
    assert jobs[-1].state == cpb.JOB_STATE_SUCCEEDED and len(rounds) == 1
    third = client.request_encoder(request)
    assert not third.started and third.job.job_id == first.job.job_id
    assert third.job.state == cpb.JOB_STATE_SUCCEEDED
    # another config of the type is another encoder: a new job
    other = client.request_encoder(
        fpb.EncoderRequest(encoder_type="edge_attn", config=struct(hidden=4), round_budget=1)
    )
    assert other.started and other.job.job_id != first.job.job_id
    by_type = client.download(encoder_type="edge_attn")
    assert by_type.info.job_id == first.job.job_id  # the latest finished one of the type
    assert watch_all(client, other.job.job_id)[0][-1].state == cpb.JOB_STATE_SUCCEEDED


def test_cancel_stops_a_running_job_after_its_round_and_a_queued_one_at_once(
    client: ControlClient, control_master: ControlMaster
) -> None:
    long = client.submit(cpb.JobSpec(rounds=500, final_test=False), requester="test")
    queued = client.submit(cpb.JobSpec(rounds=1), requester="test")
    assert queued.state == cpb.JOB_STATE_QUEUED and queued.queue_position >= 1
    events = client.watch(long.job_id)
    for event in events:  # until the first round is done: the children are in the job
        if event.WhichOneof("event") == "round":
            break
    children = {c.name: c for c in client.children()}
    assert set(children) == {"c0", "c1"}
    for child in children.values():
        assert child.connected and child.job_id == long.job_id and child.confirmed
        assert child.state in (cpb.CHILD_STATE_CONFIRMED, cpb.CHILD_STATE_IN_ROUND)
        assert child.last_seen_unix_ms > 0 and child.peer.startswith("ipv4:127.0.0.1")
    # Watch streams hold server threads: beyond MAX_WATCHERS they are refused, and the
    # children's slots stay free (ListChildren above and the round below still answer).
    watchers = [client.watch(queued.job_id) for _ in range(MAX_WATCHERS - 1)]
    for w in watchers:
        assert next(w).job.state == cpb.JOB_STATE_QUEUED  # open: the job as it is now
    with pytest.raises(ControlError) as err:
        next(client.watch(queued.job_id))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{MAX_WATCHERS} WatchJob/DownloadEncoder streams are open already" in str(err.value)
    cancelled = client.cancel(queued.job_id, reason="not needed")
    for w in watchers:
        assert [e.job.state for e in w] == [cpb.JOB_STATE_CANCELLED]
    assert cancelled.state == cpb.JOB_STATE_CANCELLED
    assert "before it started (not needed)" in cancelled.error
    assert client.cancel(long.job_id).cancel_requested
    last = [e.job for e in events if e.WhichOneof("event") == "job"][-1]
    assert last.state == cpb.JOB_STATE_CANCELLED and "cancelled after round" in last.error
    assert 1 <= last.rounds_done < 500 and not last.encoder_available
    for job_id in (long.job_id, queued.job_id):
        with pytest.raises(ControlError) as err:
            client.download(job_id)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "cancelled" in str(err.value) and "no encoder" in str(err.value)
    # A cancelled job leaves its rounds for an audit (they lived in the master's memory only),
    # and a served master logs its rounds (its watchers show them, so the master logged none).
    record = json.loads((control_master.out_root / long.job_id / "results.json").read_text())
    assert record["state"] == "cancelled" and "cancelled after round" in record["error"]
    assert len(record["rounds"]) == last.rounds_done and record["requester"] == "test"
    assert (control_master.out_root / long.job_id / "rounds.csv").is_file()
    assert f"job {long.job_id}: round 1:" in control_master.log("master")
    # the children are free again for the next job
    idle = client.children()
    assert all(c.state == cpb.CHILD_STATE_IDLE and not c.job_id for c in idle), idle


def test_a_waiting_job_says_what_it_waits_for(client: ControlClient) -> None:
    # Three children wanted, two connected: the job's activity says so while it waits (it was
    # an empty "running" for the whole wait), then the job fails naming the shortfall.
    spec = cpb.JobSpec(rounds=1)
    spec.participation.min_children = 3
    spec.participation.wait_timeout_s = 4
    job = client.submit(spec, requester="test")
    jobs, rounds = watch_all(client, job.job_id)
    doing = [j.activity for j in jobs if j.state == cpb.JOB_STATE_RUNNING]
    assert "waiting for children: 2 connected, 3 needed" in doing, doing
    assert jobs[-1].state == cpb.JOB_STATE_FAILED and not rounds
    assert jobs[-1].activity == "" and "3" in jobs[-1].error


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (cpb.JobSpec(encoder_type="transformer"), "unknown encoder type 'transformer'"),
        (cpb.JobSpec(encoder_config=struct(hiden=8)), "unknown field 'hiden'"),
        (cpb.JobSpec(encoder_config=struct(hidden="wide")), "'hidden' must be an integer"),
        (cpb.JobSpec(rule="avg"), "avg"),
        (cpb.JobSpec(stop="patience=3"), "unknown stop rule key"),
        (cpb.JobSpec(rounds=0), "needs a stop rule"),
        (cpb.JobSpec(participation=cpb.Participation(fraction=2.0)), "fraction must lie in"),
        (cpb.JobSpec(training=fpb.TrainingConfig(patience=3)), "training.patience"),
        (cpb.JobSpec(run_config=struct(**{"out-dir": "/tmp/x"})), "set by the master"),
        (cpb.JobSpec(run_config=struct(**{"state-dir": "/tmp/x"})), "set by the master"),
        (
            cpb.JobSpec(run_config=struct(**{"evaluate-evry": 1})),
            "unknown run-config key 'evaluate-evry'; did you mean evaluate-every?",
        ),
        (cpb.JobSpec(encoder_config=struct(hidden=10**12)), "hidden must be <= 8192"),
        (cpb.JobSpec(run_config=struct(child_state=True)), "unknown run-config key"),
        # The data source is the master's: a client neither picks a path nor a data set size.
        (cpb.JobSpec(run_config=struct(data="/etc/passwd")), "set by the master"),
        (cpb.JobSpec(run_config=struct(**{"synthetic-items": 10**9})), "set by the master"),
        (cpb.JobSpec(encoder_config=struct(max_position=10**12)), "max_position must be <="),
        (cpb.JobSpec(rounds=2**32 - 1), "rounds must lie in 0..1000000"),
        (cpb.JobSpec(training=fpb.TrainingConfig(local_epochs=10**9)), "epochs must lie in"),
        (
            cpb.JobSpec(participation=cpb.Participation(wait_timeout_s=float("nan"))),
            "wait_timeout must lie in",
        ),
    ],
)
def test_a_bad_spec_is_refused_with_its_reason(
    client: ControlClient, spec: cpb.JobSpec, message: str
) -> None:
    before = len(client.jobs())
    with pytest.raises(ControlError) as err:
        client.submit(spec)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in str(err.value)
    assert len(client.jobs()) == before  # nothing was queued


def test_a_refusal_quoting_a_huge_value_still_reaches_the_client(client: ControlClient) -> None:
    # The echoed value used to push the status past gRPC's metadata limit ("Stream removed").
    with pytest.raises(ControlError) as err:
        client.submit(cpb.JobSpec(rule="r" * 1_000_000))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "more characters" in str(err.value)
    with pytest.raises(ControlError) as err:
        client.job("j" * 120_000)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_a_requester_name_of_megabytes_is_refused(client: ControlClient) -> None:
    # Kept with the job and listed to every client: 5 MB names broke ListJobs for good.
    with pytest.raises(ControlError) as err:
        client.submit(cpb.JobSpec(rounds=1), requester="r" * 300)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "requester is 300 characters long; at most 256" in str(err.value)


def test_unknown_jobs_and_types_are_not_found(client: ControlClient) -> None:
    calls = [
        lambda: client.job("nope"),
        lambda: client.cancel("nope"),
        lambda: list(client.watch("nope")),
        lambda: client.download("nope"),
        lambda: client.download(encoder_type="skip_rnn"),
    ]
    for call in calls:
        with pytest.raises(ControlError) as err:
            call()
        assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value
    stub = ControlStub(grpc.insecure_channel(client.address))
    with pytest.raises(grpc.RpcError) as rpc:
        stub.ListJobs(cpb.ListJobsRequest(states=[99]))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "states [99] are no job states" in str(rpc.value.details())
    jobs = client.jobs()
    any_job = jobs[0].job_id if jobs else client.submit(cpb.JobSpec(rounds=1)).job_id
    with pytest.raises(grpc.RpcError) as rpc:
        list(stub.DownloadEncoder(cpb.DownloadEncoderRequest(job_id=any_job, max_chunk_bytes=1)))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_chunk_bytes 1 is outside [65536" in str(rpc.value.details())
    with pytest.raises(ControlError) as err:
        client.request_encoder(fpb.EncoderRequest(encoder_type="transformer"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown encoder type" in str(err.value)


def test_fedenc_train_master_errors_are_clear(control_master: ControlMaster) -> None:
    runner = CliRunner()
    base = ["train", "--master", control_master.address, "--insecure"]
    bad = runner.invoke(cli, [*base, "--encoder", "transformer"])
    assert bad.exit_code == 2 and "unknown encoder type 'transformer'" in bad.output
    local = runner.invoke(cli, [*base, "--plan", "default"])
    assert local.exit_code == 2 and "--plan: local training only" in local.output
    missing = runner.invoke(cli, [*base, "--job", "nope"])
    assert missing.exit_code == 2 and "unknown job id 'nope'" in missing.output
    no_master = runner.invoke(cli, ["train", "--rounds", "3"])
    assert no_master.exit_code == 2 and "--rounds need --master" in no_master.output


def test_fedenc_control_lists_jobs_and_children_and_refuses_unknown_jobs(
    control_master: ControlMaster, client: ControlClient
) -> None:
    runner = CliRunner()
    base = ["--master", control_master.address, "--insecure"]
    wide = {"COLUMNS": "250"}  # rich wraps table cells to the terminal width
    children = runner.invoke(cli, ["control", "children", *base], env=wide)
    assert children.exit_code == 0, children.output
    assert "c0" in children.output and "c1" in children.output
    jobs = runner.invoke(cli, ["control", "jobs", *base], env=wide)
    assert jobs.exit_code == 0, jobs.output
    for job in client.jobs():
        assert job.job_id in jobs.output
    narrow = runner.invoke(cli, ["control", "jobs", *base], env={"COLUMNS": "60"})
    for job in client.jobs():  # ids stay whole, to be copied into `fedenc control cancel`
        assert job.job_id in narrow.output
    listed = runner.invoke(cli, ["control", "jobs", "--json", *base])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["job_id"] for r in rows] == [j.job_id for j in client.jobs()]
    assert all(r["state"].startswith("JOB_STATE_") for r in rows)
    kids = json.loads(runner.invoke(cli, ["control", "children", "--json", *base]).output)
    assert {k["name"] for k in kids} >= {"c0", "c1"}
    missing = runner.invoke(cli, ["control", "cancel", "nope", *base])
    assert missing.exit_code != 0 and "nope" in missing.output


def test_every_fedenc_train_option_has_a_meaning_with_master() -> None:
    """A new `fedenc train` option must be sent in the JobSpec, refused as local-only, or be
    one of the remote ones: else `--master` would silently ignore it."""
    import inspect

    from fedenc.cli import train_cmd
    from fedenc.control.cli import ENCODER_OPTIONS, LOCAL_ONLY, TRAINING_OPTIONS

    remote = {"master", "insecure", "certs", "cert_name", "request", "job", "num_items"}
    job = {"encoder", "rounds", "rule", "stop", "min_children", "round_timeout"}
    either = {"ctx", "out", "quiet"}
    known = set(ENCODER_OPTIONS) | set(TRAINING_OPTIONS) | set(LOCAL_ONLY)
    options = set(inspect.signature(train_cmd).parameters)
    assert options - known - remote - job - either == set()
    assert "synthetic_items" in LOCAL_ONLY  # was missing: --master took it and ignored it
