"""A computing server: stateless. It registers with the task-information server, beats, and
takes batches from its data server's Work stream; for each it loads the parameters sent with
the batch, computes the gradients of the batch's mean loss, returns them to the data server and
reports the batch id to the task-information server. Nothing is kept between batches but the
model's structure (rebuilt from the data server's description when the task changes), so losing
a computing server loses at most the batch it holds.

Run one per core: ``python -m fedenc.elastic.worker --task-server HOST:PORT --insecure``
(or ``fedenc elastic worker``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence

import grpc
import torch

from fedenc import __version__
from fedenc.elastic.common import OPTIONS, ElasticError, batch_from_proto, retry_unavailable
from fedenc.encoders.base import EncoderConfig, SessionEncoder
from fedenc.encoders.registry import encoder_class
from fedenc.proto.fedenc.v1 import elastic_pb2 as epb
from fedenc.proto.fedenc.v1 import elastic_pb2_grpc as egrpc
from fedenc.protocol.tensors import parameters_from_proto, parameters_to_proto
from fedenc.runtime.grpc.transport import ChannelSecurity

log = logging.getLogger(__name__)


def build_model(desc: epb.DescribeResponse) -> SessionEncoder:
    """The model a data server describes (structure only: parameters come with each batch)."""
    cls = encoder_class(desc.encoder_type)
    config = EncoderConfig(**json.loads(desc.encoder_config_json))
    return cls(config)


class ComputeWorker:
    def __init__(
        self,
        task_server: str,
        worker_id: str,
        security: ChannelSecurity,
        *,
        delay: float = 0.0,
        give_up_s: float = 60.0,
    ) -> None:
        security.check()
        self.worker_id = worker_id
        self.security = security
        self.delay = delay  # simulated extra compute per batch (tests, benchmarks)
        self.give_up_s = give_up_s
        self._tis_channel = security.channel(task_server, OPTIONS)
        self.tis = egrpc.TaskInformationStub(self._tis_channel)
        self._stop = threading.Event()
        self._model: tuple[str, SessionEncoder] | None = None
        self.interval = 1.0
        self.data_server = ""
        self.batches = 0

    # -- registration and heartbeats ---------------------------------------------------------
    def _register(self) -> None:
        agent = f"fedenc {__version__} on {platform.node()} pid {os.getpid()}"
        reply = retry_unavailable(
            lambda: self.tis.Register(
                epb.RegisterWorkerRequest(worker_id=self.worker_id, agent=agent), timeout=10
            ),
            self.give_up_s,
            "register with the task-information server",
        )
        self.interval = reply.heartbeat_interval_s
        self.data_server = reply.data_server

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if not self.tis.Heartbeat(
                    epb.HeartbeatRequest(worker_id=self.worker_id), timeout=self.interval * 2
                ).known:
                    self._register()  # the server restarted, or declared us gone
            except (grpc.RpcError, ElasticError) as err:
                log.debug("heartbeat failed: %s", err)  # the server may be restarting

    def stop(self) -> None:
        self._stop.set()

    # -- work ----------------------------------------------------------------------------------
    def run(self) -> int:
        self._register()
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()
        down_since: float | None = None
        while not self._stop.is_set():
            channel = self.security.channel(self.data_server, OPTIONS)
            ds = egrpc.DataServerStub(channel)
            try:
                for item in ds.Work(epb.WorkRequest(worker_id=self.worker_id)):
                    down_since = None
                    self._train(ds, item)
                    if self._stop.is_set():
                        break
            except grpc.RpcError as err:
                log.info(
                    "data server stream ended: %s",
                    err.code() if isinstance(err, grpc.Call) else err,
                )
            finally:
                channel.close()
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.give_up_s:
                log.error("no data server for %.0f s: giving up", self.give_up_s)
                return 1
            self._stop.wait(0.2)
        try:
            self.tis.Leave(epb.LeaveRequest(worker_id=self.worker_id), timeout=2)
        except grpc.RpcError:
            pass
        return 0

    def _model_for(self, ds: egrpc.DataServerStub, task_id: str) -> SessionEncoder:
        if self._model is None or self._model[0] != task_id:
            desc = ds.Describe(epb.DescribeRequest(), timeout=10)
            if desc.task_id != task_id:
                raise ElasticError(f"data server moved on from task {task_id!r}")
            self._model = (task_id, build_model(desc))
        return self._model[1]

    def _train(self, ds: egrpc.DataServerStub, item: epb.WorkItem) -> None:
        t0 = time.perf_counter()
        model = self._model_for(ds, item.task_id)
        params = parameters_from_proto(item.parameters)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(params[name])
        batch = batch_from_proto(item.items, item.lengths, item.targets)
        model.train()
        for p in named.values():
            p.grad = None
        loss = model.loss(batch)
        loss.backward()  # type: ignore[no-untyped-call]
        if self.delay:
            time.sleep(self.delay)
        grads = {n: p.grad for n, p in named.items() if p.grad is not None}
        reply = ds.StoreResult(
            epb.StoreResultRequest(
                task_id=item.task_id,
                worker_id=self.worker_id,
                batch_id=item.batch_id,
                attempt=item.attempt,
                base_version=item.version,
                gradients=parameters_to_proto(grads),
                loss=float(loss.detach()),
                pairs=batch.size,
            ),
            timeout=60,
        )
        report = epb.BatchReport(
            task_id=item.task_id,
            worker_id=self.worker_id,
            batch_id=item.batch_id,
            attempt=item.attempt,
            applied=reply.applied or reply.duplicate,
            pairs=batch.size,
            loss=float(loss.detach()),
            seconds=time.perf_counter() - t0,
        )
        # The task-information server may be restarting: the report waits for it.
        retry_unavailable(
            lambda: self.tis.ReportBatch(report, timeout=10), self.give_up_s, "report a batch"
        )
        self.batches += 1


def _orphan_watch() -> None:
    """Exit when the parent process dies (a child node's computing servers die with it)."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedenc.elastic.worker", description=__doc__)
    parser.add_argument("--task-server", required=True, help="HOST:PORT")
    parser.add_argument("--id", default=f"{platform.node()}-{os.getpid()}", help="worker id")
    parser.add_argument("--insecure", action="store_true", help="plaintext gRPC")
    parser.add_argument("--certs", default=None, help="fedenc certs directory (mutual TLS)")
    parser.add_argument("--name", default="child", help="certificate name under --certs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--delay", type=float, default=0.0, help="extra seconds per batch")
    parser.add_argument("--exit-with-parent", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.exit_with_parent:
        _orphan_watch()
    torch.set_num_threads(max(1, args.threads))
    security = channel_security(args.certs, args.name, args.insecure)
    worker = ComputeWorker(args.task_server, args.id, security, delay=args.delay)
    print(f"computing server {args.id} serving {args.task_server}", flush=True)
    try:
        return worker.run()
    except KeyboardInterrupt:
        return 0


def channel_security(certs: str | None, name: str, insecure: bool) -> ChannelSecurity:
    """TLS with a child certificate from ``certs`` (fedenc.security), or explicit plaintext."""
    if certs:
        from pathlib import Path

        from fedenc.ps.tls import client_credentials

        credentials, _ = client_credentials(Path(certs), name)
        return ChannelSecurity(credentials=credentials)
    return ChannelSecurity(insecure=insecure)


if __name__ == "__main__":
    sys.exit(main())
