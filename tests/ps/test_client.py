"""The sharded gRPC client against real shard servers: same answers as the in-process PS for
1, 2 and 4 shards, requests split under 4 MiB, refusals explained, retries applied once."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedenc.proto.fedenc.v1 import parameter_server_pb2 as pspb
from fedenc.ps.client import ShardedClient, ShardUnavailableError
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.optimizers import RowOptimizerConfig
from fedenc.ps.server import serve
from fedenc.ps.table import PSError, ShardTable, TableSpec
from fedenc.ps.wire import keys_to_proto, rows_to_proto

StartShards = Callable[[TableSpec], tuple[ShardedClient, list[ShardTable]]]


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_matches_in_process_ps(grpc_shards: StartShards, shards: int) -> None:
    spec = TableSpec(3000, 16, num_shards=shards, optimizer=RowOptimizerConfig("adagrad"))
    client, _ = grpc_shards(spec)
    client.rows_per_request = 100  # several requests per shard
    reference = InProcessPS(spec)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        keys = torch.randperm(3000, generator=gen)[:700].numpy()
        delta = torch.randn(700, 16, generator=gen)
        assert client.push(keys, delta) == 700
        reference.push(keys, delta)
    every = np.arange(3000)
    assert torch.equal(client.pull(every), reference.pull(every))
    dup = np.array([7, 7, 2999])
    assert torch.equal(client.pull(dup), reference.pull(dup))
    stats = client.stats()
    assert [s["shard_index"] for s in stats] == list(range(shards))
    assert sum(s["rows"] for s in stats) == 3000
    assert all(s["optimizer"] == "adagrad" for s in stats)
    assert sum(s["rows_pushed"] for s in stats) == 2100


def test_refusals_name_the_problem_and_apply_nowhere(grpc_shards: StartShards) -> None:
    client, tables = grpc_shards(TableSpec(100, 8, num_shards=2))
    before = client.pull(np.arange(100))
    with pytest.raises(PSError, match="unknown key 100"):
        client.push(np.array([1, 2, 3, 100]), torch.zeros(4, 8))
    with pytest.raises(PSError, match="8 wide"):
        client.push(np.array([1]), torch.zeros(1, 9))
    with pytest.raises(PSError, match="NaN/Inf"):
        client.push(np.array([1, 2]), torch.tensor([[0.0] * 8, [float("inf")] * 8]))
    assert torch.equal(client.pull(np.arange(100)), before)
    assert [t.version for t in tables] == [0, 0]


def test_a_shard_checks_requests_itself(grpc_shards: StartShards) -> None:
    # A foreign client that skips the client-side checks gets INVALID_ARGUMENT with the reason.
    client, tables = grpc_shards(TableSpec(100, 8, num_shards=1))
    stub = client.stubs[0]
    bad = pspb.PushRequest(
        keys=keys_to_proto(np.array([5])),
        rows=rows_to_proto(torch.full((1, 8), float("nan"))),
        mode=pspb.PUSH_MODE_DELTA,
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Push(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "NaN/Inf" in err.value.details()
    no_mode = pspb.PushRequest(keys=bad.keys, rows=rows_to_proto(torch.zeros(1, 8)))
    with pytest.raises(grpc.RpcError, match="push mode not set"):
        stub.Push(no_mode)
    # Only the NaN push reached the table; the missing mode is refused before it.
    assert tables[0].stats()["refused"] == 1
    assert tables[0].version == 0


def test_a_retried_push_is_applied_once(grpc_shards: StartShards) -> None:
    client, tables = grpc_shards(TableSpec(10, 2, num_shards=1))
    request = pspb.PushRequest(
        keys=keys_to_proto(np.array([3])),
        rows=rows_to_proto(torch.ones(1, 2)),
        mode=pspb.PUSH_MODE_DELTA,
        client_id="trainer-a",
        sequence=7,
    )
    first = client.stubs[0].Push(request)
    again = client.stubs[0].Push(request)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert tables[0].version == 1


def test_shards_listed_out_of_order_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = TableSpec(10, 2, num_shards=2)
    servers = [serve(ShardTable(spec, i), "127.0.0.1:0") for i in range(2)]
    closed: list[ShardedClient] = []
    close = ShardedClient.close

    def recording_close(self: ShardedClient) -> None:
        closed.append(self)
        close(self)

    monkeypatch.setattr(ShardedClient, "close", recording_close)
    try:
        with pytest.raises(PSError, match="serves shard 1/2, expected shard 0/2"):
            ShardedClient([f"127.0.0.1:{p}" for _, p in reversed(servers)])
        # The refused client's channels and pool are closed: nothing else holds it to close.
        assert len(closed) == 1
        assert not [t for t in threading.enumerate() if t.name.startswith("ps-shard")]
    finally:
        for server, _ in servers:
            server.stop(0).wait()


def test_a_second_shard_server_on_a_taken_port_is_refused() -> None:
    spec = TableSpec(10, 2)
    server, port = serve(ShardTable(spec, 0), "127.0.0.1:0")
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}: the port is in use"):
            serve(ShardTable(spec, 0), f"127.0.0.1:{port}")
    finally:
        server.stop(0).wait()


def test_mutual_tls(tmp_path: Path) -> None:
    from fedenc.ps.tls import client_credentials, shard_credentials
    from fedenc.security.layout import CertLayout
    from fedenc.security.store import init_certs, issue_child

    layout = CertLayout(tmp_path)
    init_certs(layout)  # default master hosts include localhost
    issue_child(layout, "trainer-1")
    table = ShardTable(TableSpec(10, 2))
    server, port = serve(table, "127.0.0.1:0", credentials=shard_credentials(tmp_path, False))
    try:
        creds, options = client_credentials(tmp_path, "trainer-1")
        with ShardedClient(
            [f"localhost:{port}"], credentials=creds, options=options, retry_seconds=1
        ) as client:
            client.push(np.array([1]), torch.ones(1, 2))
            assert table.version == 1
        with pytest.raises(ShardUnavailableError, match="unreachable"):  # plaintext is refused
            ShardedClient([f"localhost:{port}"], retry_seconds=0.5)
    finally:
        server.stop(0).wait()


class _RecordOps(TorchDispatchMode):
    """The aten ops run in this thread while active (dispatch modes are thread-local)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_pool_threads_run_no_torch_compute(grpc_shards: StartShards) -> None:
    """A torch op in a pool thread starts an OpenMP team there; with more OpenMP threads than
    cores libgomp stops spin-waiting in every team, and the trainer's steps ran ~2x slower."""
    client, _ = grpc_shards(TableSpec(4000, 100, num_shards=2))
    client.rows_per_request = 1500  # several requests per shard, each past torch's grain size
    seen: list[str] = []
    submit = client._pool.submit

    def recorded(fn: Callable[..., Any], *args: Any) -> Any:
        def run() -> Any:
            with _RecordOps() as rec:
                try:
                    return fn(*args)
                finally:
                    seen.extend(rec.ops)

        return submit(run)

    client._pool.submit = recorded  # type: ignore[method-assign]
    keys = np.arange(4000)
    client.push(keys, torch.randn(4000, 100))
    client.pull(keys)
    compute = [op for op in seen if not op.startswith(_NO_COMPUTE)]
    assert seen or client._pool._max_workers == 1  # the pool was used
    assert compute == []


_NO_COMPUTE = ("aten.lift_fresh", "aten.detach", "aten.alias", "aten.view", "aten._to_copy")


def test_a_malformed_address_is_refused_at_once_and_an_outage_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    with pytest.raises(ValueError, match=r"address must be HOST:PORT .* got 'bogus'"):
        ShardedClient(["bogus"])
    spec = TableSpec(10, 2)
    server, port = serve(ShardTable(spec, 0), "127.0.0.1:0")
    client = ShardedClient([f"127.0.0.1:{port}"], retry_seconds=1.0)
    server.stop(0).wait()
    with caplog.at_level(logging.WARNING, logger="fedenc.ps.client"):
        for _ in range(2):
            with pytest.raises(ShardUnavailableError, match="unreachable for 1 s"):
                client.pull(np.arange(3))
    assert caplog.text.count(f"PS shard 0 at 127.0.0.1:{port} unreachable (UNAVAILABLE)") == 1


def test_fedenc_ps_refuses_a_listen_address_without_a_port() -> None:
    from typer.testing import CliRunner

    from fedenc.cli import app

    result = CliRunner().invoke(app, ["ps", "--shard", "0/1", "--listen", "127.0.0.1"])
    assert result.exit_code == 2
    assert "address must be HOST:PORT" in result.output


def test_a_shard_that_restarts_without_its_pushes_is_detected_by_the_next_push() -> None:
    spec = TableSpec(10, 2)
    server, port = serve(ShardTable(spec, 0), "127.0.0.1:0")
    client = ShardedClient([f"127.0.0.1:{port}"], retry_seconds=5.0)
    keys = np.arange(3)
    try:
        for _ in range(3):
            client.push(keys, torch.ones(3, 2))
        server.stop(0).wait()
        server, _ = serve(ShardTable(spec, 0), f"127.0.0.1:{port}")  # --fresh: version 0
        with pytest.raises(
            PSError, match=r"is at version 1 after this push, but this client's earlier push"
        ):
            client.push(keys, torch.ones(3, 2))
    finally:
        client.close()
        server.stop(0).wait()


def test_one_lost_push_is_detected_by_the_next_push_and_by_a_pull() -> None:
    # A shard restarted from a snapshot one push old: the next push comes back at the version
    # the lost one had (it used to pass), and a pull below it is refused as well.
    spec = TableSpec(10, 2)
    server, port = serve(ShardTable(spec, 0), "127.0.0.1:0")
    client = ShardedClient([f"127.0.0.1:{port}"], retry_seconds=5.0)
    keys = np.arange(3)
    try:
        client.push(keys, torch.ones(3, 2))
        server.stop(0).wait()
        server, _ = serve(ShardTable(spec, 0), f"127.0.0.1:{port}")  # the push is gone
        with pytest.raises(PSError, match="version 0, but this client's earlier push left it at 1"):
            client.pull(keys)
        with pytest.raises(PSError, match="version 1 after this push, but this client's earlier"):
            client.push(keys, torch.ones(3, 2))
    finally:
        client.close()
        server.stop(0).wait()


def test_a_lost_push_is_detected_even_when_other_clients_pushed_past_it(tmp_path: Path) -> None:
    # Client a's push is lost in a restart from an older snapshot; client b then pushes the
    # shard's version back past a's last one, which the version check cannot tell from no loss.
    # The shard's record of a's own sequence can: a's next push is refused, naming the loss.
    spec = TableSpec(10, 2)
    snap = tmp_path / "shard.pt"
    table = ShardTable(spec, 0, snapshot_path=snap)
    server, port = serve(table, "127.0.0.1:0")
    address = [f"127.0.0.1:{port}"]
    a = ShardedClient(address, retry_seconds=5.0, client_id="a")
    b = ShardedClient(address, retry_seconds=5.0, client_id="b")
    keys = np.arange(3)
    try:
        a.push(keys, torch.ones(3, 2))
        table.snapshot()
        a.push(keys, torch.ones(3, 2))  # acknowledged, then lost
        server.stop(0).wait()
        restarted = ShardTable(spec, 0, snapshot_path=snap)
        restarted.restore()
        server, _ = serve(restarted, f"127.0.0.1:{port}")
        for _ in range(3):
            b.push(keys, torch.ones(3, 2))  # version 1 -> 4, past a's 2
        assert a.pull(keys).shape == (3, 2)  # versions alone: nothing to see
        with pytest.raises(
            PSError, match=r"applied this client's pushes only up to #1, but it acknowledged #2"
        ):
            a.push(keys, torch.ones(3, 2))
        b.push(keys, torch.ones(3, 2))  # b lost nothing
    finally:
        a.close()
        b.close()
        server.stop(0).wait()
