"""``fedenc elastic``: run each service of an elastic site on its own (multi-machine sites).

    fedenc elastic data-server --store DIR --listen 0.0.0.0:7300 --out final.pt --insecure
    fedenc elastic task-server --data-server HOST:7300 --listen 0.0.0.0:7200 \\
        --journal journal/ --insecure
    fedenc elastic worker --task-server HOST:7200 --insecure          # one per core, any machine

Heavy imports happen inside the commands, so ``fedenc --help`` stays fast.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

elastic_app = typer.Typer(
    help="Elastic training services: task-information server, data server, computing server."
)


@elastic_app.callback()
def _logging(
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """The services' log lines (a computing server registering, a resumed journal, a refused
    task) go to stderr; at info by default, as fedenc master and child."""
    import logging
    import sys

    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


Insecure = Annotated[bool, typer.Option("--insecure", help="Plaintext gRPC (trusted hosts).")]
Certs = Annotated[Path | None, typer.Option(help="fedenc certs directory (mutual TLS).")]


def _fail(err: object, code: int = 2) -> typer.Exit:
    """A setup error (bad storage, options, certificates, a taken port): one line, exit 2
    (``code`` 1: a server that stopped because its task cannot go on)."""
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(code)


def _wait_for_signal(failed: threading.Event | None = None) -> None:
    """Until SIGINT / SIGTERM, or until ``failed`` is set (a server that cannot go on)."""
    stop = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: stop.set())
    while not stop.wait(0.5):
        if failed is not None and failed.is_set():
            return


@elastic_app.command("data-server")
def data_server_cmd(
    store: Annotated[str, typer.Option(help="Storage directory or file:// URI (model + shard).")],
    listen: Annotated[str, typer.Option(help="HOST:PORT (port 0 = any).")] = "127.0.0.1:7300",
    mode: Annotated[str, typer.Option(help="sync | async")] = "sync",
    max_staleness: Annotated[int, typer.Option(min=0, help="async: largest staleness.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Write the trained state dict here.")] = None,
    task_id: Annotated[str, typer.Option(help="Task id (journals are kept per task).")] = "task",
    certs: Certs = None,
    insecure: Insecure = False,
) -> None:
    """Load the model description and data shard from storage, then serve batches until every
    epoch of the task is applied (the parameters go to --out); keeps serving until SIGTERM."""
    import torch

    from fedenc.elastic.common import ElasticError, server_security_of
    from fedenc.elastic.data_server import DataServer, DataTask, serve
    from fedenc.elastic.store import load_store
    from fedenc.training.trainer import Trainer

    try:
        stored = load_store(store)
        trainer = Trainer(stored.model, stored.train)
        impl = DataServer()
        task = DataTask.from_trainer(
            task_id, trainer, stored.examples, stored.train.epochs, mode, max_staleness
        )
        impl.start_task(task)
        server, port = serve(impl, listen, server_security_of(certs, insecure))
    except (ElasticError, ValueError, OSError) as err:
        raise _fail(err) from err
    host = listen.rpartition(":")[0]
    print(f"data server listening on {host}:{port}: task {task_id}, {task.total_batches} "
          f"batches", flush=True)  # fmt: skip

    def finish() -> None:
        task.done.wait()
        if out is not None:
            torch.save(trainer.model.state_dict(), out)
        print(f"task {task_id} done: {len(task.applied)} batches applied", flush=True)

    threading.Thread(target=finish, daemon=True).start()
    _wait_for_signal()
    server.stop(1)


@elastic_app.command("task-server")
def task_server_cmd(
    data_server: Annotated[str, typer.Option(help="The data server's HOST:PORT.")],
    journal: Annotated[Path, typer.Option(help="Journal directory (one file per task).")],
    listen: Annotated[str, typer.Option(help="HOST:PORT (port 0 = any).")] = "127.0.0.1:7200",
    heartbeat_interval: Annotated[
        float, typer.Option(min=0.01, help="Seconds between beats.")
    ] = 1.0,
    heartbeat_timeout: Annotated[
        float, typer.Option(min=0.01, help="Silence before reassigning.")
    ] = 5.0,
    certs: Certs = None,
    name: Annotated[str, typer.Option(help="Certificate name under --certs.")] = "child",
    insecure: Insecure = False,
) -> None:
    """Register computing servers, assign batches, journal progress; resumes from --journal."""
    from fedenc.elastic.common import ElasticError, server_security_of
    from fedenc.elastic.task_server import TaskInfoServer, serve
    from fedenc.elastic.worker import channel_security

    try:
        impl = TaskInfoServer(
            data_server,
            journal,
            channel=channel_security(str(certs) if certs else None, name, insecure),
            heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout,
        )
        server, port = serve(impl, listen, server_security_of(certs, insecure))
    except (ElasticError, ValueError, OSError) as err:
        raise _fail(err) from err
    host = listen.rpartition(":")[0]
    print(f"task-information server listening on {host}:{port}", flush=True)
    _wait_for_signal(impl.failed)
    impl.stop()
    server.stop(1)
    if impl.failure is not None:
        raise _fail(impl.failure, code=1)


@elastic_app.command("worker")
def worker_cmd(
    task_server: Annotated[str, typer.Option(help="The task-information server's HOST:PORT.")],
    worker_id: Annotated[str, typer.Option("--id", help="Unique id (default host-pid).")] = "",
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 1,
    certs: Certs = None,
    name: Annotated[str, typer.Option(help="Certificate name under --certs.")] = "child",
    insecure: Insecure = False,
) -> None:
    """A stateless computing server."""
    from fedenc.elastic.worker import main

    argv = ["--task-server", task_server, "--threads", str(threads), "--name", name]
    argv += ["--id", worker_id] if worker_id else []
    argv += ["--certs", str(certs)] if certs else []
    argv += ["--insecure"] if insecure else []
    raise typer.Exit(main(argv))
