"""``fedenc ps``: run one shard of the distributed parameter server.

    fedenc ps --shard 0/2 --listen 127.0.0.1:7100 --num-keys 43098 --width 100 \\
        --snapshot ps/shard-0.pt --snapshot-every 1 --insecure

Every shard of a table must get the same ``--num-keys``, ``--width``, ``--seed`` and optimizer
settings. With ``--snapshot`` the shard resumes from that file when it exists (``--fresh``
ignores it), writes it every ``--snapshot-every`` pushes and on SIGTERM / Ctrl-C. Heavy imports
happen inside the command, so ``fedenc --help`` stays fast.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

ps_app = typer.Typer(
    help="Run one shard of the distributed parameter server (fedenc.v1.ParameterServer).",
    invoke_without_command=True,
)


@ps_app.callback()
def ps_cmd(
    shard: Annotated[str, typer.Option(help="This shard as I/S (shard I of S, 0-based).")] = "0/1",
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve on (port 0 = any).")] = (
        "127.0.0.1:7100"
    ),
    num_keys: Annotated[int, typer.Option(min=1, help="Size of the whole key space.")] = 1,
    width: Annotated[int, typer.Option(min=1, help="Values per row (the embedding width).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the rows' initial values.")] = 0,
    optimizer: Annotated[str, typer.Option(help="Row optimizer: sgd | adagrad | adam.")] = "sgd",
    lr: Annotated[float, typer.Option(help="Row optimizer LR (0 = its default).")] = 0.0,
    snapshot: Annotated[Path | None, typer.Option(help="Snapshot file of this shard.")] = None,
    snapshot_every: Annotated[
        int, typer.Option(min=0, help="Snapshot every N applied pushes (0 = on request/exit).")
    ] = 1,
    fresh: Annotated[bool, typer.Option(help="Ignore an existing snapshot.")] = False,
    certs: Annotated[
        Path | None, typer.Option(help="TLS: certificates directory (`fedenc certs init`).")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext gRPC (trusted hosts only).")] = False,
    threads: Annotated[
        int, typer.Option(min=1, help="torch intra-op threads of each request handler.")
    ] = 1,
) -> None:
    """Serve one shard until SIGTERM / Ctrl-C."""
    import torch

    # Requests are small gathers and scatters served by several handler threads at once. With
    # more than one intra-op thread each handler would start its own OpenMP team, and a process
    # with more OpenMP threads than cores makes every parallel op wait on futexes (docs/ps.md).
    torch.set_num_threads(threads)
    from fedenc.ps.optimizers import RowOptimizerConfig
    from fedenc.ps.routing import parse_shard
    from fedenc.ps.server import serve
    from fedenc.ps.table import PSError, ShardTable, TableSpec
    from fedenc.ps.tls import shard_credentials
    from fedenc.runtime.grpc.transport import parse_address
    from fedenc.security.errors import SecurityError

    try:
        parse_address(listen)  # gRPC would read "HOST" alone as port 443
        index, num_shards = parse_shard(shard)
        spec = TableSpec(
            num_keys=num_keys,
            width=width,
            num_shards=num_shards,
            seed=seed,
            optimizer=RowOptimizerConfig(name=optimizer, lr=lr),
        )
        table = ShardTable(spec, index, snapshot)
        if snapshot is not None and snapshot.exists() and not fresh:
            _, version = table.restore()
            print(f"shard {index}/{num_shards}: resumed from {snapshot} at version {version}")
        credentials = shard_credentials(certs, insecure)
        server, port = serve(
            table,
            listen,
            credentials=credentials,
            snapshot_every=snapshot_every if snapshot is not None else 0,
        )
    except (ValueError, PSError, OSError, SecurityError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(2) from err
    host = listen.rsplit(":", 1)[0]
    print(
        f"shard {index}/{num_shards} of {num_keys} keys x {width} ({optimizer}) "
        f"listening on {host}:{port}",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()
    if snapshot is not None:
        path, version = table.snapshot()
        print(f"shard {index}/{num_shards}: snapshot at version {version} in {path}", flush=True)
