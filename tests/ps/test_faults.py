"""Faults with real processes on 127.0.0.1: a shard SIGKILLed and restarted from its snapshot,
a trainer SIGKILLed between exchanges. Every process is stopped at the end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from fedenc.data.sessions import Examples
from fedenc.data.synthetic import SyntheticConfig, generate
from fedenc.encoders.registry import build_encoder
from fedenc.ps.client import ShardedClient
from fedenc.ps.inprocess import InProcessPS
from fedenc.ps.server import serve
from fedenc.ps.table import ShardTable, TableSpec
from fedenc.ps.trainer import PSConfig, PSTrainer
from fedenc.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
ITEMS, WIDTH = 150, 8
CONFIG = TrainConfig(epochs=1, batch_size=100, device="cpu")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


class Shards:
    """``fedenc ps`` processes; stops them all at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.ports: dict[int, int] = {}

    def start(self, shard: int, num_shards: int) -> str:
        port = self.ports.get(shard, 0)
        cmd = [
            sys.executable, "-m", "fedenc.cli", "ps", "--shard", f"{shard}/{num_shards}",
            "--listen", f"127.0.0.1:{port}", "--num-keys", str(ITEMS + 1), "--width", str(WIDTH),
            "--snapshot", str(self.tmp / f"shard-{shard}.pt"), "--snapshot-every", "1",
            "--insecure",
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV, cwd=REPO
        )
        self.procs[shard] = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                self.ports[shard] = int(found.group(1))
                return f"127.0.0.1:{self.ports[shard]}"
            assert time.monotonic() < deadline, "shard did not start in 60 s"
        raise AssertionError(f"shard {shard} exited with {proc.wait()}")

    def kill(self, shard: int) -> None:
        self.procs[shard].send_signal(signal.SIGKILL)
        self.procs[shard].wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[Shards]:
    started = Shards(tmp_path)
    yield started
    started.stop_all()


def _data() -> Examples:
    return Examples.from_sessions(
        generate(SyntheticConfig(num_sessions=800, num_items=ITEMS, seed=2)).train
    )


def _trainer(remote: ShardedClient | InProcessPS) -> PSTrainer:
    torch.manual_seed(0)
    model = build_encoder("srgnn", ITEMS, hidden=WIDTH)
    return PSTrainer(model, CONFIG, remote, PSConfig(exchange_every=300))


def test_a_killed_shard_restarts_from_its_snapshot_and_training_continues(
    shards: Shards,
) -> None:
    data = _data()
    addresses = [shards.start(i, 2) for i in range(2)]
    client = ShardedClient(addresses, retry_seconds=60)
    reference = InProcessPS(TableSpec(ITEMS + 1, WIDTH, num_shards=2))
    every = np.arange(ITEMS + 1)
    try:
        trainer, twin = _trainer(client), _trainer(reference)
        trainer.train_epoch(data)
        twin.train_epoch(data)
        before = client.stats()[1]["version"]
        acknowledged = client.pull(every)
        shards.kill(1)
        # Restart while the trainer is already at its next exchange, retrying.
        restarter = threading.Thread(target=lambda: (time.sleep(1.0), shards.start(1, 2)))
        restarter.start()
        trainer.train_epoch(data)
        restarter.join()
        twin.train_epoch(data)
        trainer.builtin.flush()
        twin.builtin.flush()
        assert trainer.builtin.stats.exchanges == twin.builtin.stats.exchanges
        # With a snapshot after every push, the restart lost no acknowledged push at all (the
        # bound is one exchange window): the run ends exactly where the run without a fault did.
        torch.testing.assert_close(client.pull(every), reference.pull(every), rtol=0, atol=1e-6)
        assert client.stats()[1]["version"] > before
        assert not torch.equal(client.pull(every), acknowledged)
    finally:
        client.close()


def test_a_trainer_killed_between_exchanges_leaves_the_ps_consistent() -> None:
    spec = TableSpec(ITEMS + 1, WIDTH, num_shards=2)
    tables = [ShardTable(spec, i) for i in range(2)]
    servers: list[grpc.Server] = []
    addresses = []
    for table in tables:
        server, port = serve(table, "127.0.0.1:0")
        servers.append(server)
        addresses.append(f"127.0.0.1:{port}")
    script = Path(__file__).with_name("trainer_process.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), *addresses],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    try:
        assert proc.stdout is not None
        state = json.loads(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "MID"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # The PS is exactly as the 2nd exchange left it: no partial window, nothing refused.
        assert [t.version for t in tables] == state["versions"]
        assert all(t.stats()["refused"] == 0 for t in tables)
        with ShardedClient(addresses) as client:
            every = np.arange(ITEMS + 1)
            assert float(client.pull(every).double().sum()) == state["sum"]
            trainer = _trainer(client)  # a new trainer carries on from there
            trainer.train_epoch(_data())
            trainer.builtin.flush()
            assert [t.version for t in tables] > state["versions"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for server in servers:
            server.stop(0).wait()
