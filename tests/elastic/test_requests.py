"""The elastic services over real gRPC with the test as the computing server: stale and
duplicate reports and results are ignored, bad requests are refused with clear errors."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.elastic.common import batch_from_proto
from fedenc.elastic.data_server import DataServer, DataTask
from fedenc.elastic.data_server import serve as serve_data
from fedenc.elastic.journal import Journal
from fedenc.elastic.task_server import TaskInfoServer
from fedenc.elastic.task_server import serve as serve_tis
from fedenc.elastic.worker import build_model
from fedenc.encoders.registry import build_encoder
from fedenc.proto.fedenc.v1 import elastic_pb2 as epb
from fedenc.proto.fedenc.v1 import elastic_pb2_grpc as egrpc
from fedenc.protocol.tensors import parameters_from_proto, parameters_to_proto
from fedenc.runtime.grpc.transport import ChannelSecurity, ServerSecurity
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer

CONFIG = TrainConfig(epochs=1, batch_size=100, device="cpu")


class Site:
    def __init__(self, tmp: Path) -> None:
        splits = generate(SyntheticConfig(num_items=100, num_clusters=5, num_sessions=80, seed=2))
        torch.manual_seed(0)
        self.trainer = Trainer(build_encoder("srgnn", 100, hidden=8), copy.deepcopy(CONFIG))
        self.data = DataServer()
        self.task = DataTask.from_trainer(
            "t1", self.trainer, Examples.from_sessions(splits.train), 1
        )
        self.data.start_task(self.task)
        insecure = ServerSecurity(insecure=True)
        self.ds_server, ds_port = serve_data(self.data, "127.0.0.1:0", insecure)
        self.tis = TaskInfoServer(
            f"127.0.0.1:{ds_port}", tmp, channel=ChannelSecurity(insecure=True),
            heartbeat_interval=0.5, heartbeat_timeout=30,
        )  # fmt: skip
        self.tis_server, tis_port = serve_tis(self.tis, "127.0.0.1:0", insecure)
        self.ds_channel = grpc.insecure_channel(f"127.0.0.1:{ds_port}")
        self.tis_channel = grpc.insecure_channel(f"127.0.0.1:{tis_port}")
        self.ds = egrpc.DataServerStub(self.ds_channel)
        self.ti = egrpc.TaskInformationStub(self.tis_channel)

    def close(self) -> None:
        self.ds_channel.close()
        self.tis_channel.close()
        self.tis.stop()
        self.tis_server.stop(0)
        self.ds_server.stop(0)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.close()


def gradients(site: Site, item: epb.WorkItem) -> tuple[epb.StoreResultRequest, epb.BatchReport]:
    model = build_model(site.ds.Describe(epb.DescribeRequest()))
    model.load_state_dict(parameters_from_proto(item.parameters))
    batch = batch_from_proto(item.items, item.lengths, item.targets)
    loss = model.loss(batch)
    loss.backward()  # type: ignore[no-untyped-call]
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    result = epb.StoreResultRequest(
        task_id=item.task_id, worker_id="me", batch_id=item.batch_id, attempt=item.attempt,
        base_version=item.version, gradients=parameters_to_proto(grads),
        loss=float(loss.detach()), pairs=batch.size,
    )  # fmt: skip
    report = epb.BatchReport(
        task_id=item.task_id, worker_id="me", batch_id=item.batch_id, attempt=item.attempt,
        applied=True, pairs=batch.size, loss=float(loss.detach()), seconds=0.01,
    )  # fmt: skip
    return result, report


def refused(call: object, code: grpc.StatusCode, text: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() == code  # type: ignore[attr-defined]
    assert text in info.value.details()  # type: ignore[attr-defined]


def test_stale_and_duplicate_reports_are_ignored_and_bad_requests_refused(site: Site) -> None:
    site.ti.Register(epb.RegisterWorkerRequest(worker_id="me"))
    stream = site.ds.Work(epb.WorkRequest(worker_id="me"))
    item = next(stream)  # the task server assigned batch 0 to the only computing server
    assert (item.task_id, item.batch_id, item.version) == ("t1", 0, 0)
    result, report = gradients(site, item)

    # Bad requests first: nothing of them is applied.
    bad = copy.deepcopy(result)
    bad.gradients.tensors[0].data = b"\x00\x00\xc0\x7f" * (len(bad.gradients.tensors[0].data) // 4)
    refused(lambda: site.ds.StoreResult(bad), grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf")
    wrong = copy.deepcopy(result)
    wrong.gradients.tensors[0].spec.name = "nope"
    refused(lambda: site.ds.StoreResult(wrong), grpc.StatusCode.INVALID_ARGUMENT, "unknown")
    ahead = copy.deepcopy(result)
    ahead.batch_id = 1
    refused(
        lambda: site.ds.StoreResult(ahead), grpc.StatusCode.FAILED_PRECONDITION, "expected batch 0"
    )
    other = copy.deepcopy(result)
    other.task_id = "t0"
    refused(lambda: site.ds.StoreResult(other), grpc.StatusCode.FAILED_PRECONDITION, "no task")
    far = copy.deepcopy(report)
    far.batch_id = 10**6
    refused(lambda: site.ti.ReportBatch(far), grpc.StatusCode.INVALID_ARGUMENT, "out of range")
    refused(
        lambda: site.ti.Register(epb.RegisterWorkerRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "worker_id",
    )
    refused(
        lambda: site.ds.Assign(epb.AssignRequest(task_id="t1", batch_id=999, worker_id="me")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "out of range",
    )
    assert site.task.version == 0 and site.task.applied == []

    # The real result, then the same again (a stale retry): applied once.
    assert site.ds.StoreResult(result).applied
    again = site.ds.StoreResult(result)
    assert again.duplicate and not again.applied and again.version == 1
    assert site.ti.ReportBatch(report).recorded
    stale = site.ti.ReportBatch(report)
    assert stale.duplicate and not stale.recorded
    progress = site.ti.Progress(epb.ProgressRequest())
    assert progress.batches_done == 1 and progress.duplicates_ignored == 1
    assert site.task.applied == [0]
    # Assigning an applied batch is answered without sending it again.
    reply = site.ds.Assign(epb.AssignRequest(task_id="t1", batch_id=0, worker_id="me"))
    assert reply.already_applied and not reply.accepted
    stream.cancel()


def test_an_abandoned_task_refuses_late_results_and_the_next_task_starts(site: Site) -> None:
    # The site gave up on the task (timeout, no computing server left): a result that arrives
    # later must not step the trainer's model, and the next round's task must be able to start
    # (the site lives as long as the child process).
    site.ti.Register(epb.RegisterWorkerRequest(worker_id="me"))
    stream = site.ds.Work(epb.WorkRequest(worker_id="me"))
    item = next(stream)
    result, _ = gradients(site, item)
    before = {n: p.detach().clone() for n, p in site.trainer.model.named_parameters()}
    site.data.abandon_task("t1")
    assert site.task.done.is_set()
    refused(lambda: site.ds.StoreResult(result), grpc.StatusCode.FAILED_PRECONDITION, "no task")
    for name, p in site.trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert site.task.applied == []
    splits = generate(SyntheticConfig(num_items=100, num_clusters=5, num_sessions=80, seed=2))
    nxt = DataTask.from_trainer("t2", site.trainer, Examples.from_sessions(splits.train), 1)
    site.data.start_task(nxt)  # used to raise "task t1 is still running"
    assert site.data.task is nxt
    stream.cancel()


def test_journal_resumes_and_drops_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    j = Journal(path, "t", 5)
    assert j.record(0, "a") and j.record(3, "b") and not j.record(3, "c")
    j.close()
    with open(path, "ab") as f:
        f.write(b'{"batch": 4, "wor')  # a crash mid-write: never acknowledged
    j = Journal(path, "t", 5)
    assert j.done == {0: "a", 3: "b"} and j.resumed == 2
    assert j.record(4, "c")
    j.close()
    assert Journal(path, "t", 5).done == {0: "a", 3: "b", 4: "c"}
    with pytest.raises(Exception, match="belongs to task 't'"):
        Journal(path, "other", 5)
