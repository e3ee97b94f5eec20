"""The command line's Control clients: ``fedenc train --master`` (submit or request a job, show
its rounds live, download the encoder as a checkpoint) and ``fedenc control`` (jobs, children,
cancel). Heavy imports (grpc, torch) happen inside the commands: ``fedenc --help`` stays quick."""

from __future__ import annotations

import getpass
import json
import shlex
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from fedenc.control.client import ControlClient, ControlError
    from fedenc.proto.fedenc.v1 import control_pb2 as cpb
    from fedenc.runtime.grpc.transport import ChannelSecurity

console = Console(stderr=True)

#: `fedenc train` options that set a job's encoder config, by option name -> EncoderConfig field.
ENCODER_OPTIONS = {
    "hidden": "hidden",
    "steps": "steps",
    "positions": "use_positions",
    "normalize": "normalize",
    "scale": "scale",
    "dropout": "dropout",
}
#: `fedenc train` options that set the children's local training, -> TrainingConfig field.
TRAINING_OPTIONS = {
    "epochs": "local_epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "lr_decay_step": "lr_decay_step",
    "lr_decay_rate": "lr_decay_rate",
    "l2": "l2",
    "seed": "seed",
    "max_examples": "max_examples_per_epoch",
}
#: `fedenc train` options that only mean something for local training.
LOCAL_ONLY = (
    "data",
    "recent",
    "synthetic",
    "synthetic_sessions",
    "synthetic_items",
    "valid_fraction",
    "patience",
    "device",
    "threads",
    "plan",
    "ps",
    "ps_exchange_every",
    "ps_scoring",
    "ps_addresses",
)
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=code)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def security_of(insecure: bool, certs: Path | None, cert_name: str) -> ChannelSecurity:
    """Plaintext with --insecure; TLS (mutual, with a certificate of the federation's CA) with
    --certs DIR --as NAME."""
    from fedenc.runtime.grpc.transport import ChannelSecurity

    if certs is None:
        return ChannelSecurity(insecure=insecure)
    if insecure:
        raise _fail("give either --insecure or --certs, not both")
    from fedenc.security.credentials import load_child_tls
    from fedenc.security.errors import SecurityError

    try:
        tls = load_child_tls(certs, cert_name)
    except (SecurityError, OSError, ValueError) as err:
        raise _fail(f"TLS credentials: {err}") from err
    override = dict(tls.options).get("grpc.ssl_target_name_override")
    return ChannelSecurity(credentials=tls.credentials, target_name=override)


def connection_flags(insecure: bool, certs: Path | None, cert_name: str) -> str:
    """The options that reach the master the way this command did (for printed commands)."""
    if certs is None:
        return "--insecure" if insecure else ""
    return f"--certs {shlex.quote(str(certs))} --as {shlex.quote(cert_name)}"


def connect(address: str, security: ChannelSecurity) -> ControlClient:
    from fedenc.control.client import ControlClient
    from fedenc.runtime.grpc.transport import InsecureTransportError

    try:
        return ControlClient(address, security)
    except InsecureTransportError as err:
        raise _fail(f"{err}; for a plaintext master use --insecure") from err
    except ValueError as err:
        raise _fail(str(err)) from err


def job_spec(options: Mapping[str, Any], given: set[str]) -> cpb.JobSpec:
    """The JobSpec of `fedenc train --master`: only the options given on the command line, the
    rest is the master's default."""
    local = [_flag(name) for name in LOCAL_ONLY if name in given]
    if local:
        raise _fail(
            f"{', '.join(local)}: local training only; with --master the children train on "
            "their own data with the master's settings"
        )
    from fedenc.control.spec import dict_to_struct
    from fedenc.proto.fedenc.v1 import control_pb2 as cpb

    spec = cpb.JobSpec()
    if "encoder" in given:
        spec.encoder_type = options["encoder"]
    encoder = {field: options[opt] for opt, field in ENCODER_OPTIONS.items() if opt in given}
    if "num_items" in given:
        encoder["num_items"] = options["num_items"]
    if encoder:
        spec.encoder_config.CopyFrom(dict_to_struct(encoder))
    for opt, field in TRAINING_OPTIONS.items():
        if opt in given:
            setattr(spec.training, field, options[opt])
    if options.get("rounds") is not None:
        spec.rounds = options["rounds"]
    if options.get("rule"):
        spec.rule = options["rule"]
    if options.get("stop"):
        spec.stop = options["stop"]
    if options.get("min_children") is not None:
        spec.participation.min_children = options["min_children"]
    if options.get("round_timeout") is not None:
        spec.participation.round_timeout_s = options["round_timeout"]
    return spec


def requester() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"fedenc train ({user}@{socket.gethostname()})"


def _state(job: cpb.Job) -> str:
    from fedenc.proto.fedenc.v1 import control_pb2 as cpb

    return cpb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()


def _round_line(row: Mapping[str, Any]) -> str:
    recall = "-" if row["recall_at_20"] is None else f"{row['recall_at_20']:.2f}"
    mrr = "-" if row["mrr_at_20"] is None else f"{row['mrr_at_20']:.2f}"
    loss = "-" if row["loss"] is None else f"{row['loss']:.4f}"
    return (
        f"round {row['round']}: {len(row['participants'])}/{len(row['sampled'])} children, "
        f"loss {loss}, Recall@20 {recall}, MRR@20 {mrr}, {row['seconds']:.2f} s"
    )


def follow(client: ControlClient, job_id: str, quiet: bool = False) -> cpb.Job:
    """WatchJob to the end, with a live round table on a terminal (lines otherwise)."""
    from rich.live import Live

    from fedenc.control.spec import report_to_row
    from fedenc.federation.report import round_table

    rows: list[dict[str, Any]] = []
    title = f"job {job_id}"
    interactive = console.is_terminal and not quiet
    live = Live(round_table(rows, title), console=console, auto_refresh=False)
    final: cpb.Job | None = None
    last_state, activity = -1, ""
    if interactive:
        live.start()
    try:
        for event in client.watch(job_id):
            if event.WhichOneof("event") == "round":
                row = report_to_row(event.round)
                rows.append(row)
                if interactive:
                    live.update(round_table(rows, title), refresh=True)
                elif not quiet:
                    console.print(_round_line(row), highlight=False)
            else:
                job = event.job
                if job.state != last_state and not quiet:
                    where = f" (queue position {job.queue_position})" if job.queue_position else ""
                    console.print(f"job {job_id}: {_state(job)}{where}", highlight=False)
                if job.activity != activity and not quiet:
                    # Lines for the waits before a round (a job can wait minutes for its
                    # children); the live table shows the rounds' own progress in its title.
                    if job.activity.startswith("waiting"):
                        console.print(f"job {job_id}: {job.activity}", highlight=False)
                    if interactive:
                        title = f"job {job_id}" + (f": {job.activity}" if job.activity else "")
                        live.update(round_table(rows, title), refresh=True)
                last_state, activity = job.state, job.activity
                final = job
    finally:
        if interactive:
            live.stop()
    if final is None:
        raise _fail(f"the watch of job {job_id} ended without the job's state", EXIT_JOB_FAILED)
    return final


def train_remote(
    master: str,
    security: ChannelSecurity,
    options: Mapping[str, Any],
    given: set[str],
    *,
    request: bool,
    job_id: str | None,
    out: Path | None,
    quiet: bool,
    flags: str = "",
) -> None:
    """`fedenc train --master`: submit (or request, or follow) a job, watch it, download it.
    ``flags``: :func:`connection_flags`, for the commands printed on Ctrl-C."""
    from fedenc.control.client import ControlError
    from fedenc.proto.fedenc.v1 import control_pb2 as cpb
    from fedenc.proto.fedenc.v1 import federation_pb2 as fpb

    spec = job_spec(options, given)
    with connect(master, security) as client:
        try:
            if job_id:
                job = client.job(job_id)
            elif request:
                wanted = fpb.EncoderRequest(
                    encoder_type=options["encoder"],
                    requester=requester(),
                    training=spec.training,
                    round_budget=spec.rounds if spec.HasField("rounds") else 0,
                )
                if spec.HasField("encoder_config"):
                    wanted.config.CopyFrom(spec.encoder_config)
                answer = client.request_encoder(wanted)
                job = answer.job
                how = "started" if answer.started else f"answered by job ({_state(job)})"
                console.print(f"encoder request for {options['encoder']}: {how} {job.job_id}")
            else:
                job = client.submit(spec, requester())
                console.print(f"job {job.job_id} submitted to {master} ({_state(job)})")
            if job.state != cpb.JOB_STATE_SUCCEEDED:
                t0 = time.monotonic()
                try:
                    job = follow(client, job.job_id, quiet)
                except KeyboardInterrupt:
                    at = f"--master {master}" + (f" {flags}" if flags else "")
                    console.print(
                        f"stopped watching; job {job.job_id} goes on on the master "
                        f"(follow: fedenc train {at} --job {job.job_id}; "
                        f"cancel: fedenc control cancel {job.job_id} {at})"
                    )
                    raise typer.Exit(130) from None
                console.print(
                    f"job {job.job_id} {_state(job)} (watched for {time.monotonic() - t0:.1f} s)"
                )
            if job.state != cpb.JOB_STATE_SUCCEEDED:
                raise _fail(f"job {job.job_id} {_state(job)}: {job.error}", EXIT_JOB_FAILED)
            target = out or Path("runs") / job.job_id
            download = client.download(job.job_id, include_local=True)
        except ControlError as err:
            raise _fail(f"{err.code.name}: {err}", _exit_of(err)) from err
    path = download.save(target)
    final = dict(job.final_metrics)
    console.print(
        f"encoder of job {job.job_id} ({download.info.encoder.type}, "
        f"{len(download.tensors)} tensors, {download.wire_bytes / 1e6:.2f} MB) "
        f"saved as a fedenc checkpoint in {path}; stopped: {job.stop_reason}"
    )
    if "test_recall@20" in final:
        console.print(
            f"[bold green]test[/]: P@20 {final['test_recall@20']:.2f}  "
            f"MRR@20 {final.get('test_mrr@20', float('nan')):.2f}"
        )


def _exit_of(err: ControlError) -> int:
    import grpc

    bad_input = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    return EXIT_BAD_INPUT if err.code in bad_input else EXIT_JOB_FAILED


# -- fedenc control ------------------------------------------------------------------------------

control_app = typer.Typer(
    help="Talk to a master's Control API (`fedenc master --serve`): jobs, children, cancel.",
    no_args_is_help=True,
)
MasterOpt = Annotated[str, typer.Option(help="The master's HOST:PORT.")]
InsecureOpt = Annotated[bool, typer.Option("--insecure", help="Plaintext gRPC (no TLS).")]
CertsOpt = Annotated[
    Path | None, typer.Option(help="Certificates directory (fedenc certs) for TLS.")
]
AsOpt = Annotated[str, typer.Option("--as", help="With --certs: the certificate's name.")]


def _ms(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


_R = TypeVar("_R")


def _ask(
    master: str, insecure: bool, certs: Path | None, cert_name: str, call: Callable[[Any], _R]
) -> _R:
    """One Control call on a fresh connection; a refusal exits with its code and message."""
    from fedenc.control.client import ControlError

    with connect(master, security_of(insecure, certs, cert_name)) as client:
        try:
            return call(client)
        except ControlError as err:
            raise _fail(str(err), _exit_of(err)) from err


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for i, name in enumerate(columns):
        # The first column is an id to copy into other commands: never cut or wrapped.
        table.add_column(name, no_wrap=i == 0, overflow="fold" if i else "ignore")
    return table


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON (the Control API's messages) instead.")
]


def _print_json(items: list[Any]) -> None:
    from google.protobuf import json_format

    rows = [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in items]
    typer.echo(json.dumps(rows, indent=1))


@control_app.command("jobs")
def jobs_cmd(
    master: MasterOpt = "127.0.0.1:9092",
    insecure: InsecureOpt = False,
    certs: CertsOpt = None,
    cert_name: AsOpt = "operator",
    as_json: JsonOpt = False,
) -> None:
    """Every job of the master, oldest first."""
    jobs = _ask(master, insecure, certs, cert_name, lambda client: client.jobs())
    if as_json:
        _print_json(jobs)
        return
    columns = ("job", "state", "encoder", "rounds", "requester", "created", "note")
    table = _table(f"jobs on {master}", columns)
    for job in jobs:
        budget = job.round_budget or "-"
        note = job.error or job.stop_reason or job.activity
        table.add_row(
            job.job_id,
            _state(job),
            job.encoder_type,
            f"{job.rounds_done}/{budget}",
            job.requester,
            _ms(job.created_unix_ms),
            note,
        )
    Console().print(table)


@control_app.command("children")
def children_cmd(
    master: MasterOpt = "127.0.0.1:9092",
    insecure: InsecureOpt = False,
    certs: CertsOpt = None,
    cert_name: AsOpt = "operator",
    as_json: JsonOpt = False,
) -> None:
    """The children the master has seen and what they are doing."""
    from fedenc.proto.fedenc.v1 import control_pb2 as cpb

    children = _ask(master, insecure, certs, cert_name, lambda client: client.children())
    if as_json:
        _print_json(children)
        return
    columns = ("child", "node", "state", "job", "last seen", "peer", "note")
    table = _table(f"children of {master}", columns)
    for c in children:
        state = cpb.ChildState.Name(c.state).removeprefix("CHILD_STATE_").lower()
        note = c.decline_reason or c.left_reason
        table.add_row(
            c.name, str(c.node_id), state, c.job_id, _ms(c.last_seen_unix_ms), c.peer, note
        )
    Console().print(table)


@control_app.command("cancel")
def cancel_cmd(
    job_id: Annotated[str, typer.Argument(help="The job to cancel.")],
    master: MasterOpt = "127.0.0.1:9092",
    insecure: InsecureOpt = False,
    certs: CertsOpt = None,
    cert_name: AsOpt = "operator",
    reason: Annotated[str, typer.Option(help="Why (kept with the job).")] = "",
) -> None:
    """Cancel a job: a queued one never starts, a running one stops after its round."""
    who = reason or requester()
    job = _ask(master, insecure, certs, cert_name, lambda client: client.cancel(job_id, who))
    state = _state(job)
    if state == "cancelled" and job.cancel_requested:
        console.print(f"job {job.job_id}: cancelled")
    elif state in ("succeeded", "failed", "cancelled"):
        console.print(f"job {job.job_id} already {state}: nothing to cancel")
    else:  # running: it stops after its current round
        console.print(f"job {job.job_id}: {state}, stops after its current round")


__all__ = ["control_app", "follow", "job_spec", "security_of", "train_remote"]
