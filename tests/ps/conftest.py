"""Shared fixtures: real gRPC shard servers on 127.0.0.1 with free ports, stopped at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from fedenc.ps.client import ShardedClient
from fedenc.ps.server import serve
from fedenc.ps.table import ShardTable, TableSpec

StartShards = Callable[[TableSpec], tuple[ShardedClient, list[ShardTable]]]  # as in the tests


@pytest.fixture
def grpc_shards() -> Iterator[StartShards]:
    servers: list[grpc.Server] = []
    clients: list[ShardedClient] = []

    def start(spec: TableSpec) -> tuple[ShardedClient, list[ShardTable]]:
        tables = [ShardTable(spec, i) for i in range(spec.num_shards)]
        addresses = []
        for table in tables:
            server, port = serve(table, "127.0.0.1:0")
            servers.append(server)
            addresses.append(f"127.0.0.1:{port}")
        client = ShardedClient(addresses, retry_seconds=2.0)
        clients.append(client)
        return client, tables

    yield start
    for client in clients:
        client.close()
    for server in servers:
        server.stop(0).wait()
