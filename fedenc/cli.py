"""The ``fedenc`` command line.

``fedenc train`` trains one encoder locally (a child's trainer on its own); the federation commands
(``simulate``, ``master``, ``child``) build on the same pieces.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fedenc import __version__
from fedenc.control.cli import control_app
from fedenc.elastic.cli import elastic_app
from fedenc.ps.cli import ps_app
from fedenc.security.cli import certs_app
from fedenc.security.errors import PemError, SecurityError

app = typer.Typer(
    name="fedenc",
    help="Federated training of shared session-recommendation encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code=2)


def _check_out(path: Path | None, option: str = "--out", earlier_ok: bool = False) -> None:
    """Refuse an output directory that cannot be written before any work, not after it; say
    when it holds an earlier run's outputs (unless ``earlier_ok``: a resume)."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        raise _fail(f"{option} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _fail(f"{option} {path}: cannot create it ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise _fail(f"{option} {path} is not writable")
    earlier = [n for n in ("results.json", "meta.json", "encoder") if (path / n).exists()]
    if earlier and not earlier_ok:  # said before the work, not discovered after it
        console.print(
            f"[yellow]{option} {path} holds an earlier run's {', '.join(earlier)}: this run "
            "replaces them[/]"
        )


def _given_options(ctx: typer.Context) -> set[str]:
    """The options of this command that the user set (on the command line or through the
    environment), as opposed to those left at their defaults."""
    from click.core import ParameterSource

    explicit = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {name for name in ctx.params if ctx.get_parameter_source(name) in explicit}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            is_eager=True,  # before typer insists on a command
            callback=_print_version,
        ),
    ] = False,
) -> None:
    """Federated training of shared session-recommendation encoders."""
    # A bad value of the native loss kernels' switch is a clear error before any work, not a
    # traceback at the first training step (the module needs torch: only when it is set).
    if "FEDENC_NATIVE_SOFTMAX" in os.environ:
        from fedenc.encoders.layers import native_softmax

        try:
            native_softmax.switched_on()
        except ValueError as err:
            raise _fail(str(err)) from None


@app.command("encoders")
def encoders_cmd(
    tensors: Annotated[
        str | None,
        typer.Option(
            help="List this encoder type's tensors (name, shape, dtype, what the federation "
            "exchanges) for --hidden and --num-items: what a child written in another stack must "
            "send back (docs/encoders.md).",
        ),
    ] = None,
    hidden: Annotated[int, typer.Option(min=1)] = 100,
    num_items: Annotated[int, typer.Option(min=1)] = 43097,
    positions: Annotated[bool, typer.Option("--positions/--no-positions")] = True,
) -> None:
    """List the available encoder types (or one type's tensors)."""
    from fedenc.encoders.registry import UnknownEncoderError, available_encoders, encoder_class

    if tensors is None:
        for name in available_encoders():
            doc = (encoder_class(name).__doc__ or encoder_class(name).__module__).strip()
            typer.echo(f"{name:10s} {doc.splitlines()[0]}")
        return
    from fedenc.encoders.registry import build_encoder

    try:
        model = build_encoder(tensors, num_items, hidden=hidden, use_positions=positions)
    except (UnknownEncoderError, ValueError) as err:
        raise _fail(str(err)) from err
    encoder = set(model.shared_parameter_names())
    table = Table(title=f"{tensors} tensors (hidden {hidden}, {num_items} items)")
    for column in ("tensor", "shape", "dtype", "exchanged with share ="):
        table.add_column(column)
    for name, param in model.named_parameters():
        share = "all, encoder" if name in encoder else "all (the item table)"
        dtype = str(param.dtype).removeprefix("torch.")
        table.add_row(name, " x ".join(map(str, param.shape)), dtype, share)
    Console().print(table)


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    encoder: Annotated[str, typer.Option(help="Encoder type (see `fedenc encoders`).")] = "srgnn",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Prepared data directory (train_sessions.txt + test_sessions.txt) or a raw click "
            "log (.csv Diginetica, .dat/.txt Yoochoose). Omit for the synthetic default."
        ),
    ] = None,
    recent: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Raw Yoochoose log: keep the training sessions of its most recent 1/N of "
            "training examples, as SR-GNN cuts them (Yoochoose 1/64 is --recent 64); default: "
            "all of them.",
        ),
    ] = None,
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="Use the embedded synthetic data set.")
    ] = False,
    synthetic_sessions: Annotated[int, typer.Option(help="Synthetic: sessions to draw.")] = 20000,
    synthetic_items: Annotated[int, typer.Option(help="Synthetic: catalog size.")] = 2000,
    epochs: Annotated[int, typer.Option(min=1)] = 8,
    batch_size: Annotated[int, typer.Option(min=1)] = 100,
    lr: Annotated[float, typer.Option()] = 1e-3,
    lr_decay_step: Annotated[int, typer.Option(help="Epochs between LR decays, 0 = never.")] = 3,
    lr_decay_rate: Annotated[float, typer.Option()] = 0.1,
    l2: Annotated[float, typer.Option(help="Adam weight decay.")] = 1e-5,
    hidden: Annotated[int, typer.Option(min=1)] = 100,
    steps: Annotated[int, typer.Option(min=0, help="Graph propagation steps.")] = 1,
    positions: Annotated[
        bool,
        typer.Option(
            help="Reversed position embeddings (off: SR-GNN without them; add --no-normalize "
            "for the published SR-GNN)."
        ),
    ] = True,
    normalize: Annotated[
        bool, typer.Option(help="L2-normalised item and session vectors (NISER).")
    ] = True,
    scale: Annotated[float, typer.Option(help="Logit scale when normalising.")] = 12.0,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.0,
    valid_fraction: Annotated[
        float, typer.Option(help="Validation share carved from the end of training sessions.")
    ] = 0.1,
    patience: Annotated[int, typer.Option(help="Early stop after N epochs w/o gain.")] = 0,
    max_examples: Annotated[int, typer.Option(help="Cap training pairs per epoch (0=all).")] = 0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    threads: Annotated[int, typer.Option(help="torch threads (0 = default).")] = 0,
    plan: Annotated[
        str,
        typer.Option(
            help="Execution plan of a training step: default (the plain loop: the same seed "
            "gives the same encoder, bit for bit), auto (the fastest by measured cost, cached "
            "per machine; equal up to float summation order) or a name such as "
            "cpu-t1-c4096-s2 (docs/planner.md)."
        ),
    ] = "default",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for the checkpoint and results.json (without it nothing is saved)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    ps: Annotated[
        bool, typer.Option("--ps", help="Item rows through the two-level PS (docs/ps.md).")
    ] = False,
    ps_exchange_every: Annotated[
        int, typer.Option(min=0, help="PS: samples between exchanges (0 = every epoch).")
    ] = 0,
    ps_scoring: Annotated[str, typer.Option(help="PS: full | sampled softmax.")] = "full",
    ps_addresses: Annotated[
        str, typer.Option(help="PS: gRPC shard addresses, comma-separated (default in-process).")
    ] = "",
    master: Annotated[
        str | None,
        typer.Option(
            help="Train federated instead: submit the job to the Control API of the master at "
            "HOST:PORT (`fedenc master --serve`), show its rounds live, and save the encoder to "
            "--out (default runs/<job id>). Only the encoder and training options given here "
            "are sent; the rest is the master's default.",
            rich_help_panel="Federated (--master)",
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option(
            "--insecure",
            help="--master: plaintext gRPC (no TLS).",
            rich_help_panel="Federated (--master)",
        ),
    ] = False,
    certs: Annotated[
        Path | None,
        typer.Option(
            help="--master: certificates directory (fedenc certs) for TLS.",
            rich_help_panel="Federated (--master)",
        ),
    ] = None,
    cert_name: Annotated[
        str,
        typer.Option(
            "--as",
            help="--master with --certs: the name of this client's certificate.",
            rich_help_panel="Federated (--master)",
        ),
    ] = "operator",
    rounds: Annotated[
        int | None,
        typer.Option(min=0, help="--master: round budget.", rich_help_panel="Federated (--master)"),
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(help="--master: fusion rule.", rich_help_panel="Federated (--master)"),
    ] = None,
    stop: Annotated[
        str | None,
        typer.Option(
            help="--master: extra stop rule, plateau=METRIC:ROUNDS (valid_recall@20, ...) or "
            "deadline_s=SECONDS.",
            rich_help_panel="Federated (--master)",
        ),
    ] = None,
    min_children: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="--master: fewest children per round.",
            rich_help_panel="Federated (--master)",
        ),
    ] = None,
    round_timeout: Annotated[
        float | None,
        typer.Option(
            help="--master: seconds to wait for a round's replies (0 = no limit for training).",
            rich_help_panel="Federated (--master)",
        ),
    ] = None,
    num_items: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="--master: catalog size (default: the master's data).",
            rich_help_panel="Federated (--master)",
        ),
    ] = None,
    request: Annotated[
        bool,
        typer.Option(
            "--request",
            help="--master: ask for an encoder of --encoder's type (RequestEncoder): reuse a "
            "finished or running job's encoder of that type, else start one.",
            rich_help_panel="Federated (--master)",
        ),
    ] = False,
    job: Annotated[
        str | None,
        typer.Option(
            help="--master: follow (and download) this existing job instead of submitting one.",
            rich_help_panel="Federated (--master)",
        ),
    ] = None,
) -> None:
    """Train one encoder locally; select the epoch on validation, report test once.

    With --master HOST:PORT, train it federated through a master's Control API instead.
    """
    remote_only = {
        "--rounds": rounds,
        "--rule": rule,
        "--stop": stop,
        "--min-children": min_children,
        "--round-timeout": round_timeout,
        "--num-items": num_items,
        "--job": job,
        "--certs": certs,
    }
    if master is None:
        given_remote = [flag for flag, value in remote_only.items() if value is not None]
        given_remote += ["--request"] if request else []
        if given_remote:
            raise _fail(f"{', '.join(given_remote)} need --master HOST:PORT")
        _check_out(out)
    else:
        from fedenc.control.cli import connection_flags, security_of, train_remote

        given = _given_options(ctx)
        train_remote(
            master,
            security_of(insecure, certs, cert_name),
            ctx.params,
            given,
            request=request,
            job_id=job,
            out=out,
            quiet=quiet,
            flags=connection_flags(insecure, certs, cert_name),
        )
        return
    import torch

    from fedenc.data.sessions import Examples
    from fedenc.data.synthetic import SyntheticConfig
    from fedenc.encoders.registry import UnknownEncoderError, build_encoder
    from fedenc.training.checkpoint import save_checkpoint
    from fedenc.training.config import TrainConfig
    from fedenc.training.progress import TrainingProgress
    from fedenc.training.trainer import Trainer

    if data is not None and synthetic:
        raise _fail("give either --data or --synthetic, not both")
    try:
        config = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            lr_decay_step=lr_decay_step,
            lr_decay_rate=lr_decay_rate,
            l2=l2,
            seed=seed,
            device=device,
            patience=patience,
            max_examples_per_epoch=max_examples,
            num_threads=threads,
            plan=plan,
        )
        synthetic_config = SyntheticConfig(
            num_sessions=synthetic_sessions,
            num_items=synthetic_items,
            seed=seed,
            valid_fraction=valid_fraction,
        )
        splits = _load_splits(data, synthetic_config, recent)
        model = build_encoder(
            encoder,
            splits.num_items,
            hidden=hidden,
            steps=steps,
            use_positions=positions,
            normalize=normalize,
            scale=scale,
            dropout=dropout,
        )
        torch.manual_seed(seed)
        model.reset_parameters()
        if ps and plan not in ("auto", "default"):
            raise ValueError(
                f"--plan {plan} cannot drive the two-level PS trainer; use --plan default"
            )
        if ps:
            # The planner's step programs assume the plain embedding table: the PS trainer
            # runs the default loop.
            config.plan = "default"
        trainer = Trainer(model, config)
        if ps:
            from fedenc.ps.federation import make_trainer

            trainer = make_trainer(
                model,
                config,
                {
                    "ps": "local",
                    "ps-exchange-every": ps_exchange_every,
                    "ps-scoring": ps_scoring,
                    "ps-addresses": ps_addresses,
                },
                seed,
            )
            trainer.flush_after_epoch = ps_exchange_every == 0  # type: ignore[attr-defined]
    except (ValueError, FileNotFoundError, UnknownEncoderError) as err:
        raise _fail(str(err)) from err

    train_ex = Examples.from_sessions(splits.train)
    valid_ex = Examples.from_sessions(splits.valid)
    test_ex = Examples.from_sessions(splits.test)
    console.print(
        f"[bold]{encoder}[/] on [bold]{splits.name}[/]: {splits.num_items:,} items, "
        f"{len(train_ex):,} train / {len(valid_ex):,} valid / {len(test_ex):,} test pairs, "
        f"device {trainer.device}, {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    try:
        trainer.prepare_plan(
            train_ex, log=None if quiet else (lambda line: console.print(line, highlight=False))
        )
    except ValueError as err:  # a plan override this machine or model cannot run
        raise _fail(str(err)) from err
    if out is None:  # said before the work: an hour's training would otherwise be lost
        console.print("[yellow]no --out: the trained encoder will not be saved[/]")
    started = time.time()
    live = sys.stderr.isatty()
    try:
        with TrainingProgress(enabled=not quiet, console=console, lines=not live) as progress:
            result = trainer.fit(train_ex, valid_ex, test_ex, progress=progress)
        if ps and out is not None:
            from fedenc.ps.trainer import PSTrainer

            if isinstance(trainer, PSTrainer) and trainer.sampled:
                # Sampled scoring holds no item table of its own: save the PS's.
                model.embedding = trainer.item_table()
    except KeyboardInterrupt:
        console.print("interrupted before the first epoch ended: nothing to save")
        raise typer.Exit(130) from None
    except FloatingPointError as err:
        raise _fail(f"{err} in the first epoch (try a lower --lr)") from err
    except ConnectionError as err:  # a PS shard gone for good (ShardUnavailableError)
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(1) from err
    finally:
        trainer.close()

    summary: dict[str, Any] = {
        "encoder": encoder,
        "encoder_config": model.config.to_dict(),
        "train_config": config.to_dict(),
        "data": splits.summary(),
        "device": str(trainer.device),
        "plan": trainer.plan.name if trainer.plan is not None else "default",
        # What `fedenc evaluate` reads back to rebuild the same splits.
        "run_config": _train_data_settings(data, recent, synthetic_config),
        "started": started,
        **result.to_dict(),
    }
    if result.stopped:
        console.print(
            f"[yellow]stopped early[/]: {result.stopped}; kept epoch {result.best_epoch} "
            f"of {len(result.history)} done"
        )
    if out is not None:
        save_checkpoint(out, model, {"train": summary})
        (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        console.print(f"checkpoint and results.json written to {out}")
    if result.test:
        t = result.test
        console.print(
            f"[bold green]test[/] (best valid epoch {result.best_epoch}): "
            f"P@20 {t['recall@20']:.2f}  MRR@20 {t['mrr@20']:.2f}  "
            f"P@10 {t['recall@10']:.2f}  MRR@10 {t['mrr@10']:.2f}"
        )
    if result.stopped:
        raise typer.Exit(130 if result.stopped.startswith("interrupted") else 1)


def _train_data_settings(data: Path | None, recent: int | None, synthetic: Any) -> dict[str, Any]:
    """The data settings of a ``fedenc train`` run, as ``fedenc evaluate`` reads them back: an
    absolute data path (evaluate may run elsewhere) or the synthetic set's parameters."""
    if data is not None:
        settings: dict[str, Any] = {
            "data": str(data.resolve()),
            "valid-fraction": synthetic.valid_fraction,
        }
        if recent is not None:
            settings["recent"] = recent
        return settings
    return {
        "synthetic-sessions": synthetic.num_sessions,
        "synthetic-items": synthetic.num_items,
        "seed": synthetic.seed,
        "valid-fraction": synthetic.valid_fraction,
    }


def _run_data_settings(checkpoint: Path) -> tuple[Path, dict[str, Any]]:
    """The encoder directory of ``checkpoint`` (a checkpoint, or a run directory holding
    ``encoder/``), and the data settings of the run that wrote it (its ``results.json`` run
    config; empty when there is none)."""
    if (
        not (checkpoint / "meta.json").is_file()
        and (checkpoint / "encoder" / "meta.json").is_file()
    ):
        checkpoint = checkpoint / "encoder"
    for results in (checkpoint / "results.json", checkpoint.parent / "results.json"):
        if results.is_file():
            try:  # fedenc simulate records its scenario, the ServerApp its run config
                written = json.loads(results.read_text())
                recorded = written.get("run_config") or written.get("scenario") or {}
                settings = {str(k).replace("_", "-"): v for k, v in recorded.items()}
            except (OSError, ValueError, AttributeError):
                return checkpoint, {}
            data = settings.get("data")
            keys = ("data", "valid-fraction", "recent") if data else (
                "synthetic-sessions", "synthetic-items", "seed", "valid-fraction"
            )  # fmt: skip
            return checkpoint, {k: settings[k] for k in keys if settings.get(k) is not None}
    return checkpoint, {}


@app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A saved encoder: the --out of fedenc train, a run's encoder/, or the run's "
            "directory (whose results.json supplies the data settings not given here)."
        ),
    ],
    data: Annotated[
        Path | None,
        typer.Option(help="Data directory or raw click log; omit for the synthetic data set."),
    ] = None,
    synthetic_sessions: Annotated[int, typer.Option(help="Synthetic: sessions.")] = 20000,
    synthetic_items: Annotated[int, typer.Option(help="Synthetic: catalog size.")] = 2000,
    seed: Annotated[int, typer.Option(help="Synthetic: the seed it was drawn with.")] = 0,
    valid_fraction: Annotated[float, typer.Option(help="Validation share.")] = 0.1,
    recent: Annotated[
        int | None,
        typer.Option(min=1, help="Raw Yoochoose log: the --recent N the encoder was trained with."),
    ] = None,
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    batch_size: Annotated[int, typer.Option(min=1, help="Sessions scored at once.")] = 500,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the metrics to this JSON file.")
    ] = None,
) -> None:
    """Score a saved encoder: Recall@K and MRR@K on a test or validation split.

    K = 20 and 10, every catalog item ranked. Give the data the encoder was trained on: the
    same --data, or the same synthetic settings (fedenc simulate's scenario:
    synthetic-sessions, synthetic-items, seed); a run directory's own are read from it."""
    from fedenc.data.sessions import Examples
    from fedenc.data.synthetic import SyntheticConfig
    from fedenc.training.checkpoint import load_checkpoint
    from fedenc.training.config import TrainConfig, resolve_device
    from fedenc.training.progress import TrainingProgress
    from fedenc.training.trainer import Trainer

    if split not in ("test", "valid"):
        raise _fail(f"--split must be test or valid, got {split!r}")
    checkpoint, recorded = _run_data_settings(checkpoint)
    if recorded:
        given = _given_options(ctx)
        run_data = recorded.get("data")
        if run_data and "data" not in given and not Path(str(run_data)).is_absolute():
            # Relative to wherever the run was started: not to be guessed from here.
            raise _fail(
                f"the run read its data from {run_data!r}, relative to where it ran: give --data"
            )
        taken = []
        for key, value in recorded.items():
            name = key.replace("-", "_")
            if name in given or (key == "data" and not value):
                continue
            if key == "data":
                data = Path(str(value))
            elif key == "valid-fraction":
                valid_fraction = float(value)
            elif key == "seed":
                seed = int(value)
            elif key == "recent":
                recent = int(value)
            elif key == "synthetic-sessions":
                synthetic_sessions = int(value)
            else:
                synthetic_items = int(value)
            taken.append(f"{key} = {value}")
        if taken:
            console.print(f"data settings of the run: {', '.join(taken)}", highlight=False)
    try:
        model, meta = load_checkpoint(checkpoint)
        synthetic = SyntheticConfig(
            num_sessions=synthetic_sessions,
            num_items=synthetic_items,
            seed=seed,
            valid_fraction=valid_fraction,
        )
        config = TrainConfig(eval_batch_size=batch_size, device=device)
        resolve_device(device)  # before the data load: "no CUDA here" was a late traceback
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err
    splits = _load_splits(data, synthetic, recent)
    data_given = recorded or _given_options(ctx) & {"data", "synthetic_sessions", "synthetic_items"}
    if not data_given and splits.num_items != model.config.num_items:
        # Nothing says which data the encoder saw: the default synthetic set is a guess.
        raise _fail(
            f"{checkpoint} records no data settings and its catalog has "
            f"{model.config.num_items:,} items, the default synthetic set {splits.num_items:,}: "
            "give the data it was trained on (--data, or --synthetic-sessions/--synthetic-items"
            "/--seed)"
        )
    if splits.num_items > model.config.num_items:
        raise _fail(
            f"the data use item ids up to {splits.num_items}, the encoder's catalog has "
            f"{model.config.num_items}: not the data it was trained on"
        )
    examples = Examples.from_sessions(splits.test if split == "test" else splits.valid)
    if len(examples) == 0:
        raise _fail(f"the {split} split has no (prefix, next item) pairs")
    _note_local_heads(meta)
    trainer = Trainer(model, config)
    try:
        with TrainingProgress(console=console, lines=not sys.stderr.isatty()) as progress:
            metrics = trainer.evaluate(examples, progress, label=split)
    finally:
        trainer.close()
    metrics["examples"] = len(examples)
    console.print(
        f"[bold green]{split}[/] ({len(examples):,} pairs, {meta['encoder']}): "
        f"P@20 {metrics['recall@20']:.2f}  MRR@20 {metrics['mrr@20']:.2f}  "
        f"P@10 {metrics['recall@10']:.2f}  MRR@10 {metrics['mrr@10']:.2f}"
    )
    if json_out is not None:
        json_out.write_text(json.dumps({"checkpoint": str(checkpoint), split: metrics}, indent=2))


def _note_local_heads(meta: dict[str, Any]) -> None:
    """Say when a federation's checkpoint lacks the children's heads (its item table is then the
    master's initial one): its scores and recommendations come from that table."""
    federation = meta.get("federation", {})
    if federation.get("local_parameters"):
        console.print(f"[yellow]note[/]: {federation['note']}", soft_wrap=True, highlight=False)


@app.command("recommend")
def recommend_cmd(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A saved encoder: the --out of fedenc train, a run's encoder/, or "
            "the run's directory."
        ),
    ],
    sessions: Annotated[
        list[str],
        typer.Argument(help="Sessions as comma-separated item ids in click order, e.g. 12,5,7."),
    ],
    top: Annotated[int, typer.Option(min=1, help="Items to list per session.")] = 10,
    exclude_clicked: Annotated[
        bool, typer.Option(help="Leave out the items the session already clicked.")
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON instead of a table.")
    ] = False,
) -> None:
    """The items a saved encoder ranks highest after each given session."""
    from fedenc.training.checkpoint import load_checkpoint

    checkpoint, _ = _run_data_settings(checkpoint)
    parsed: list[list[int]] = []
    for text in sessions:
        try:
            clicks = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise _fail(f"session {text!r}: item ids are integers, comma-separated") from None
        if not clicks:
            raise _fail(f"session {text!r} has no clicks")
        parsed.append(clicks)
    try:
        model, meta = load_checkpoint(checkpoint)
        items, scores = model.recommend(parsed, k=top, exclude_clicked=exclude_clicked)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err
    _note_local_heads(meta)
    if json_out:
        rows = [
            {"session": s, "items": i.tolist(), "scores": [round(float(v), 6) for v in v_row]}
            for s, i, v_row in zip(parsed, items, scores, strict=True)
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    for s, i, v_row in zip(parsed, items, scores, strict=True):
        ranked = "  ".join(f"{int(a)} ({float(b):.2f})" for a, b in zip(i, v_row, strict=True))
        console.print(f"[bold]{','.join(map(str, s))}[/] → {ranked}", highlight=False)


data_app = typer.Typer(help="Inspect data sets and partitions.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(certs_app, name="certs")
app.add_typer(ps_app, name="ps")
app.add_typer(control_app, name="control")
app.add_typer(elastic_app, name="elastic")


def _load_splits(data: Path | None, synthetic: Any, recent: int | None = None) -> Any:
    """The data set at ``data``, or the synthetic one described by ``synthetic`` (a
    :class:`~fedenc.data.synthetic.SyntheticConfig`); bad input exits with a clear message.
    ``recent``: :func:`~fedenc.data.splits.load_dataset`'s, for a raw Yoochoose log."""
    from fedenc.data.splits import load_dataset
    from fedenc.data.synthetic import generate

    try:
        if data is None:
            if recent is not None:
                raise ValueError("--recent applies to a raw Yoochoose click log (--data)")
            return generate(synthetic)
        return load_dataset(data, valid_fraction=synthetic.valid_fraction, recent=recent)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err


@data_app.command("stats")
def data_stats_cmd(
    data: Annotated[
        Path | None, typer.Option(help="Data directory or raw log; omit = synthetic.")
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Sessions, clicks, examples and items of each split."""
    from fedenc.data.synthetic import SyntheticConfig

    splits = _load_splits(data, SyntheticConfig(seed=seed))
    typer.echo(json.dumps(splits.summary(), indent=2))


@data_app.command("partition")
def data_partition_cmd(
    data: Annotated[
        Path | None, typer.Option(help="Data directory or raw log; omit = synthetic.")
    ] = None,
    children: Annotated[int, typer.Option(min=1, help="Number of children K.")] = 4,
    scheme: Annotated[
        str, typer.Option("--scheme", "--partition", help="iid | time | dirichlet")
    ] = "iid",
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration (smaller = more skewed).")
    ] = 0.5,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Split the training sessions among K children and print per-child statistics."""
    from fedenc.data.partition import partition, print_partition_stats
    from fedenc.data.synthetic import SyntheticConfig

    splits = _load_splits(data, SyntheticConfig(seed=seed))
    try:
        parts = partition(splits.train, children, scheme, seed=seed, alpha=alpha)
    except ValueError as err:
        raise _fail(str(err)) from err
    print_partition_stats(parts, title=f"{splits.name}: {scheme} over {children} children")


# Scenario options shared by `fedenc simulate` and `fedenc master` (None = the scenario's value).
ScenarioFile = Annotated[
    Path | None,
    typer.Argument(
        help="Scenario TOML (e.g. simulations/quickstart.toml); options below override it.",
        show_default=False,
    ),
]
ChildrenOpt = Annotated[int | None, typer.Option(min=1, help="Number of children K.")]
PartitionOpt = Annotated[str | None, typer.Option(help="iid | time | dirichlet")]
AlphaOpt = Annotated[float | None, typer.Option(help="Dirichlet concentration.")]
EncoderOpt = Annotated[str | None, typer.Option(help="Encoder type (`fedenc encoders`).")]
RuleOpt = Annotated[
    str | None, typer.Option(help="Fusion rule (weighted_sum, mean, median, krum, ...).")
]
StopOpt = Annotated[
    str | None,
    typer.Option(
        help="Extra stop rule: plateau=METRIC:ROUNDS stops after ROUNDS rounds without a "
        "better METRIC (valid_recall@20, valid_mrr@20, ...); deadline_s=SECONDS after that "
        "long."
    ),
]
RoundsOpt = Annotated[int | None, typer.Option(min=0, help="Round budget (0 = none).")]
EpochsOpt = Annotated[int | None, typer.Option(min=1, help="Local epochs per round.")]
LrDecayOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="A child's local epochs between LR decays (x0.1), counted over all its rounds; "
        "0 = never. Default 3 (SR-GNN's), which freezes learning after about 9 one-epoch "
        "rounds: raise it for long federations.",
    ),
]
MaxExamplesOpt = Annotated[
    int | None, typer.Option(min=0, help="Cap each child's training pairs per epoch (0=all).")
]
DataOpt = Annotated[
    Path | None,
    typer.Option(help="Data directory or raw click log; omit for the synthetic default."),
]
SessionsOpt = Annotated[int | None, typer.Option(help="Synthetic: sessions.")]
ItemsOpt = Annotated[int | None, typer.Option(help="Synthetic: catalog size.")]
HiddenOpt = Annotated[int | None, typer.Option(min=1, help="Encoder width.")]
FractionOpt = Annotated[float | None, typer.Option(help="Share of the children sampled per round.")]
MinChildrenOpt = Annotated[int | None, typer.Option(min=1, help="Fewest per round.")]
MinSamplesOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="Leave out a child that confirms fewer training samples (privacy: default 1)."
    ),
]
RoundTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        help="Seconds to wait for a round's replies (0 = training replies as long as the "
        "child's stream lives, evaluation replies max(600 s, 4x the slowest training))."
    ),
]
QueryTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Seconds to wait for a child's confirmation of the job (0 = forever); a child "
        "that does not confirm in time is left out.",
    ),
]
SamplingOpt = Annotated[
    str | None,
    typer.Option(help="How --fraction is drawn: random (seeded) | cyclic (children in turn)."),
]
RowWeightingOpt = Annotated[
    bool | None,
    typer.Option(
        "--row-weighting/--no-row-weighting",
        help="Fuse a shared item table row by row, weighted by the samples touching each row.",
    ),
]
EvaluateEveryOpt = Annotated[
    int | None, typer.Option(min=0, help="Evaluate every N rounds (0 = the last round only).")
]
CarryOptimizerOpt = Annotated[
    bool | None,
    typer.Option(
        "--carry-optimizer/--no-carry-optimizer",
        help="Cyclic, one child a round: hand the Adam moments on with the encoder.",
    ),
]
ShareOpt = Annotated[
    str | None,
    typer.Option(help="What is federated: all (item table too) | encoder (table stays local)."),
]
PublishOpt = Annotated[
    str | None,
    typer.Option(
        help="Which round's encoder to publish and test: last | best (the highest Recall@20 "
        "on the children's validation data, as `fedenc train` keeps its best epoch)."
    ),
]
SeedOpt = Annotated[int | None, typer.Option()]
OutOpt = Annotated[Path | None, typer.Option(help="Output directory (default runs/<name>-<time>).")]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="Plaintext gRPC (no TLS, children unauthenticated): the explicit opt-out of --certs; "
        "prints a warning.",
    ),
]
CertsOpt = Annotated[
    Path | None,
    typer.Option(
        "--certs",
        help="Certificates directory (`fedenc certs init` / `issue`): mutual TLS, each child "
        "identified by its certificate.",
    ),
]


def _warn(message: str) -> None:
    console.print(f"[bold yellow]{message}[/]", highlight=False)


def _scenario(scenario_file: Path | None, **overrides: Any) -> Any:
    """The scenario of a file (or the defaults) with the CLI's overrides; exits 2 on bad input."""
    from fedenc.runtime.simulate import Scenario

    data = overrides.pop("data", None)
    try:
        base = Scenario.from_toml(scenario_file) if scenario_file is not None else Scenario()
        return base.with_overrides(data=str(data) if data is not None else None, **overrides)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err


def _round_printer(title: str) -> tuple[Any, Any, list[dict[str, Any]]]:
    """A live round table on a terminal, one line per round otherwise."""
    from rich.live import Live

    from fedenc.federation.report import round_table

    rows: list[dict[str, Any]] = []
    live = Live(round_table(rows, title), console=console, auto_refresh=False)
    interactive = console.is_terminal

    def on_round(result: Any) -> None:
        rows.append(result.to_dict())
        if interactive:
            live.update(round_table(rows, title), refresh=True)
        else:
            recall = "-" if result.recall_at_20 is None else f"{result.recall_at_20:.2f}"
            console.print(
                f"round {result.round}: {len(result.participants)}/{len(result.sampled)} "
                f"children, Recall@20 {recall}, {result.seconds:.2f} s"
            )

    return (live if interactive else None), on_round, rows


def _print_outcome(result: dict[str, Any], title: str, out_dir: Path) -> None:
    from fedenc.federation.report import DECILES_FROM, deciles, round_table

    Console().print(round_table(result["rounds"], title))
    published = result.get("published_round") or 0
    if result["rounds"] and 0 < published != result["rounds"][-1]["round"]:
        console.print(f"published: round {published}'s encoder, the best on validation")
    final = result.get("final_metrics") or {}
    if "test_recall@20" in final:
        console.print(
            f"[bold green]test[/]: P@20 {final['test_recall@20']:.2f}  "
            f"MRR@20 {final.get('test_mrr@20', float('nan')):.2f}  "
            f"({int(final.get('test_examples', 0))} examples)"
        )
    by_child = {
        name: m["test_recall@20"]
        for name, m in (result.get("final_child_metrics") or {}).items()
        if "test_recall@20" in m
    }
    if len(by_child) > 1:
        low, high = min(by_child, key=by_child.__getitem__), max(by_child, key=by_child.__getitem__)
        spread = f"{by_child[low]:.2f} ({low}) to {by_child[high]:.2f} ({high})"
        if len(by_child) >= DECILES_FROM:
            import statistics

            p10, p90 = deciles(list(by_child.values()))
            spread = (
                f"median {statistics.median(by_child.values()):.2f}, p10-p90 {p10:.2f} "
                f"to {p90:.2f}; {spread}"
            )
        console.print(f"children's own test P@20: {spread}", highlight=False)
    confirmed = sum(1 for c in result.get("children", []) if c.get("accepted"))
    if final and 0 < len(result.get("final_child_metrics") or {}) < confirmed:
        console.print(
            f"the final test covers {len(result['final_child_metrics'])} of the {confirmed} "
            "children (the others had no test data or did not answer in time)",
            highlight=False,
        )
    console.print(f"stopped: {result['stop_reason']}; outputs in {out_dir}")


@app.command("simulate")
def simulate_cmd(
    scenario_file: ScenarioFile = None,
    children: ChildrenOpt = None,
    partition: PartitionOpt = None,
    alpha: AlphaOpt = None,
    encoder: EncoderOpt = None,
    rule: RuleOpt = None,
    stop: StopOpt = None,
    rounds: RoundsOpt = None,
    local_epochs: EpochsOpt = None,
    lr_decay_step: LrDecayOpt = None,
    max_examples: MaxExamplesOpt = None,
    data: DataOpt = None,
    synthetic_sessions: SessionsOpt = None,
    synthetic_items: ItemsOpt = None,
    hidden: HiddenOpt = None,
    fraction: FractionOpt = None,
    sampling: SamplingOpt = None,
    row_weighting: RowWeightingOpt = None,
    evaluate_every: EvaluateEveryOpt = None,
    carry_optimizer: CarryOptimizerOpt = None,
    min_children: MinChildrenOpt = None,
    min_samples: MinSamplesOpt = None,
    round_timeout: RoundTimeoutOpt = None,
    query_timeout: QueryTimeoutOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Run the children in N worker processes (0 = in this process)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=0, help="Torch threads per worker (0 = cores / workers).")
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Where the children train: cpu | cuda | cuda:N | auto.")
    ] = None,
    share: ShareOpt = None,
    publish: PublishOpt = None,
    processes: Annotated[
        bool,
        typer.Option(
            "--processes",
            help="Run the children as processes over gRPC on 127.0.0.1 (the master stays in this "
            "process) instead of in this process. Mutual TLS with a throwaway CA unless --certs "
            "or --insecure.",
        ),
    ] = False,
    port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="--processes: the master's port on 127.0.0.1 (0 = any free one).",
        ),
    ] = 0,
    wait: Annotated[
        float | None,
        typer.Option(
            min=1.0,
            help="--processes: seconds to wait for the child processes to start and connect "
            "(each imports torch and loads its data; default: 120, plus 5 per child beyond 8).",
        ),
    ] = None,
    certs: Annotated[
        Path | None,
        typer.Option(
            "--certs",
            help="--processes: certificates directory to use (missing child-i certificates are "
            "issued with its CA key) instead of a throwaway CA.",
        ),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="--processes: plaintext gRPC (prints a warning).")
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the interrupted simulation checkpointed in --out (same scenario and "
            "options) after its last completed round. The master and the simulated children "
            "take up the state they saved after each round, so the encoder equals an "
            "uninterrupted run's, bit for bit.",
        ),
    ] = False,
) -> None:
    """Simulate a federation on this machine: K children, one master, per-round table."""
    from fedenc.federation.fusion import FusionOutputError
    from fedenc.federation.master import NotEnoughChildrenError

    scenario = _scenario(
        scenario_file,
        children=children,
        partition=partition,
        alpha=alpha,
        encoder=encoder,
        rule=rule,
        stop=stop,
        rounds=rounds,
        local_epochs=local_epochs,
        lr_decay_step=lr_decay_step,
        max_examples_per_epoch=max_examples,
        data=data,
        synthetic_sessions=synthetic_sessions,
        synthetic_items=synthetic_items,
        hidden=hidden,
        fraction=fraction,
        sampling=sampling,
        row_weighting=row_weighting,
        evaluate_every=evaluate_every,
        carry_optimizer=carry_optimizer,
        min_children=min_children,
        min_samples=min_samples,
        round_timeout=round_timeout,
        query_timeout=query_timeout,
        seed=seed,
        workers=workers,
        threads=threads,
        device=device,
        share=share,
        publish=publish,
    )
    from fedenc.runtime.simulate import default_out_dir, run_scenario

    if (certs is not None or insecure or port or wait is not None) and not processes:
        raise _fail("--certs, --insecure, --port and --wait apply to --processes only")
    if resume and (out is None or processes):
        raise _fail(
            "--resume needs the interrupted simulation's --out, and resumes in this process: "
            "drop --processes (a --processes run's children kept no state; `fedenc master "
            "--resume` continues a job whose child processes still run)"
        )
    if certs is not None and insecure:
        raise _fail("give either --certs DIR or --insecure, not both")
    if insecure:
        from fedenc.security.policy import insecure_warning

        _warn(insecure_warning("master"))
    _check_out(out, earlier_ok=resume)
    out_dir = out or default_out_dir(scenario)
    where = scenario.data or f"synthetic ({scenario.synthetic_sessions} sessions)"
    kind = (
        "child processes over gRPC"
        if processes
        else f"in {scenario.workers} worker processes"
        if scenario.workers
        else "in-process"
    )
    console.print(
        f"[bold]{scenario.name}[/]: {scenario.children} children ({scenario.partition}, {kind}), "
        f"{scenario.encoder}, rule {scenario.rule}, {scenario.rounds} rounds, data {where}"
    )
    title = f"{scenario.name}: {scenario.encoder} / {scenario.rule}"
    live, on_round, rows = _round_printer(title)
    if resume:
        from fedenc.federation.checkpoint import read_master_state, state_path

        console.print(
            f"resuming: the master and the simulated children continue from {out_dir / 'state'}"
        )
        if state_path(out_dir / "state").is_file():
            try:
                saved = read_master_state(out_dir / "state")
            except (ValueError, OSError):
                saved = None  # (the run itself reports what is wrong with it)
            if saved is not None and saved.stop_reason:
                console.print(
                    f"the job's rounds are complete (round {saved.round}, {saved.stop_reason}): "
                    "resuming only runs its final test and writes its outputs again"
                )

    def on_term(signum: int, frame: Any) -> None:
        raise _Interrupted(signum)

    main = threading.current_thread() is threading.main_thread()  # signals: main thread only
    previous_term = signal.signal(signal.SIGTERM, on_term) if main else None  # as Ctrl-C
    try:
        if live is not None:
            live.start()
        try:
            if processes:
                from fedenc.runtime.grpc.launcher import run_scenario_processes

                console.print(  # each child imports torch and loads its data: seconds each
                    f"starting {scenario.children} child processes; the rounds follow once "
                    "they have connected"
                )

                startup = wait if wait is not None else 120.0 + 5.0 * max(scenario.children - 8, 0)
                outcome = run_scenario_processes(
                    scenario,
                    out_dir,
                    on_round=on_round,
                    certs=certs,
                    insecure=insecure,
                    port=port,
                    startup_timeout=startup,
                )
            else:
                outcome = run_scenario(scenario, out_dir, on_round=on_round, resume=resume)
        finally:
            if live is not None:
                live.stop()
    except (KeyboardInterrupt, _Interrupted) as stop:
        if processes:  # the child processes' state went with them
            console.print(
                f"interrupted: the rounds done are checkpointed in {out_dir / 'state'}; the "
                "child processes stopped with their state, so the run cannot continue bit for "
                f"bit: the same command without --processes, with --out {out_dir} --resume, "
                "continues from the master's checkpoint (the children restart their optimizers)"
            )
        else:
            console.print(
                f"interrupted: the rounds done are checkpointed in {out_dir / 'state'}; continue "
                f"with the same command and --out {out_dir} --resume"
            )
        code = 128 + stop.signum if isinstance(stop, _Interrupted) else 130
        raise typer.Exit(code) from None
    except (ValueError, FileNotFoundError, NotEnoughChildrenError, SecurityError) as err:
        _keep_failed_rounds(rows, out_dir, scenario, str(err), resume)
        raise _fail(str(err)) from err
    except FusionOutputError as err:  # nothing of that round is kept or published
        _keep_failed_rounds(rows, out_dir, scenario, str(err), resume)
        raise _fail(f"{err}; the rounds before it are checkpointed in {out_dir / 'state'}") from err
    finally:
        if main and previous_term is not None:  # None: a handler not set from Python
            signal.signal(signal.SIGTERM, previous_term)
    _print_outcome(outcome.result, title, out_dir)


def _keep_failed_rounds(
    rows: list[dict[str, Any]], out_dir: Path, scenario: Any, error: str, resume: bool = False
) -> None:
    """A run that failed after some rounds: their metrics in results.json and rounds.csv, as a
    finished run's (they were on the screen only), with the error. A resumed run's rounds
    before the resume come from its checkpoint."""
    from fedenc.federation.checkpoint import MasterStateError, read_master_state, state_path
    from fedenc.federation.report import write_results, write_rounds_csv

    if resume and state_path(out_dir / "state").is_file():
        try:
            earlier = read_master_state(out_dir / "state").rounds
        except MasterStateError:
            earlier = []
        first = rows[0]["round"] if rows else math.inf
        rows = [r for r in earlier if r["round"] < first] + rows
    if not rows:
        return
    try:
        write_results(
            {"state": "failed", "error": error, "rounds": rows},
            out_dir,
            {"scenario": dataclasses.asdict(scenario)},
        )
        write_rounds_csv(rows, out_dir)
    except OSError as err:
        console.print(f"[yellow]warning[/]: cannot write the rounds done to {out_dir}: {err}")
        return
    console.print(f"the {len(rows)} round(s) done are in {out_dir / 'results.json'} and rounds.csv")


class _Interrupted(BaseException):
    """SIGINT/SIGTERM in the master: unwinds the ServerApp (BaseException: no handler eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _log_level(level: str) -> None:
    import logging

    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command("master")
def master_cmd(
    scenario_file: ScenarioFile = None,
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to serve children on (0.0.0.0 for remote children).")
    ] = "127.0.0.1:9092",
    certs: CertsOpt = None,
    allowlist: Annotated[
        Path | None,
        typer.Option(
            help="With --certs: only these children may join (one name per line, # comments; "
            "reloaded when it changes)."
        ),
    ] = None,
    insecure: InsecureOpt = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the interrupted job whose state is in --state (or <--out>/state) from "
            "its last completed round.",
        ),
    ] = False,
    state: Annotated[
        Path | None,
        typer.Option(
            help="Where the job's checkpoint is written after each round (default <out>/state)."
        ),
    ] = None,
    children: Annotated[
        int | None,
        typer.Option(min=1, help="Children to wait for before the job starts (and K of the run)."),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds to wait for the children before starting anyway."),
    ] = 300.0,
    partition: PartitionOpt = None,
    alpha: AlphaOpt = None,
    encoder: EncoderOpt = None,
    rule: RuleOpt = None,
    stop: StopOpt = None,
    rounds: RoundsOpt = None,
    local_epochs: EpochsOpt = None,
    lr_decay_step: LrDecayOpt = None,
    max_examples: MaxExamplesOpt = None,
    data: DataOpt = None,
    synthetic_sessions: SessionsOpt = None,
    synthetic_items: ItemsOpt = None,
    hidden: HiddenOpt = None,
    fraction: FractionOpt = None,
    sampling: SamplingOpt = None,
    row_weighting: RowWeightingOpt = None,
    evaluate_every: EvaluateEveryOpt = None,
    carry_optimizer: CarryOptimizerOpt = None,
    share: ShareOpt = None,
    publish: PublishOpt = None,
    min_children: MinChildrenOpt = None,
    min_samples: MinSamplesOpt = None,
    round_timeout: RoundTimeoutOpt = None,
    query_timeout: QueryTimeoutOpt = None,
    seed: SeedOpt = None,
    out: OutOpt = None,
    heartbeat: Annotated[float, typer.Option(help="Heartbeat interval, seconds.")] = 5.0,
    heartbeat_timeout: Annotated[
        float, typer.Option(help="Drop a child silent for this long, seconds.")
    ] = 30.0,
    send_turns: Annotated[
        bool,
        typer.Option(
            help="Start large messages to the children one after another (the first children "
            "train while the last still receive; docs/runtime.md), or side by side. Turns win "
            "where the master's CPU or uplink is the bottleneck; a child on a slow link never "
            "holds the others back. Turn them off where the master's uplink is many times "
            "faster than each child's and the children's links are fast (> ~0.7 Gbit/s)."
        ),
    ] = True,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="Start with no job and serve the Control API (fedenc.v1.Control, "
            "docs/control-api.md) on the same port until SIGINT/SIGTERM: jobs come from "
            "`fedenc train --master` or any gRPC client; the scenario and options above are "
            "their defaults; --out is the root of the jobs' output directories.",
        ),
    ] = False,
    stop_children: Annotated[
        bool,
        typer.Option(
            "--stop-children",
            help="When this master stops before the job's end (a signal, a failure), end the "
            "children's sessions (SHUTDOWN) instead of asking them to wait for a --resume "
            "(RESTART, the default when a round's checkpoint exists).",
        ),
    ] = False,
    operators: Annotated[
        str,
        typer.Option(
            help="--serve with --certs: the certificate names (comma-separated) that may "
            "submit, cancel and list jobs and children; other certificates of the CA may only "
            "request, watch and download encoders, and operators cannot join as children.",
        ),
    ] = "operator",
    max_crashes: Annotated[
        int,
        typer.Option(
            min=0,
            help="--serve: a job whose master died more than this many times while running it "
            "(killed or crashed, not stopped by a signal) is failed instead of taken up again by "
            "the next master on the same --out.",
        ),
    ] = 2,
) -> None:
    """Serve a federation: children dial in (`fedenc child`), the job runs, the master exits.

    With --serve, the master runs the jobs that Control clients submit, one at a time, until
    stopped. Mutual TLS with --certs DIR (plaintext only with an explicit --insecure). A
    checkpoint is written after each round; --resume continues a killed master's job from it.
    SIGINT/SIGTERM close every child's stream (the children exit) and exit 0.
    """
    import os

    if certs is not None and "GRPC_VERBOSITY" not in os.environ:
        # A child whose certificate BoringSSL rejects (another CA, expired) never reaches
        # fedenc's code; gRPC's own "Handshake failed ..." line is the master's only trace of
        # it. Flower silences gRPC below errors when imported (next lines) unless the variable
        # is set: set, but empty, it keeps gRPC's default log.
        os.environ["GRPC_VERBOSITY"] = ""
    from fedenc.federation.checkpoint import MasterStateError, read_master_state
    from fedenc.federation.fusion import FusionOutputError
    from fedenc.federation.master import NotEnoughChildrenError
    from fedenc.runtime.grpc.master import FederationServer, run_server_app
    from fedenc.runtime.grpc.security import master_security
    from fedenc.runtime.grpc.send_turns import DEFAULT_PATIENCE
    from fedenc.runtime.simulate import default_out_dir, outcome_of
    from nodes.master import app as master_app

    _log_level(log_level)
    scenario = _scenario(
        scenario_file,
        children=children,
        partition=partition,
        alpha=alpha,
        encoder=encoder,
        rule=rule,
        stop=stop,
        rounds=rounds,
        local_epochs=local_epochs,
        lr_decay_step=lr_decay_step,
        max_examples_per_epoch=max_examples,
        data=data,
        synthetic_sessions=synthetic_sessions,
        synthetic_items=synthetic_items,
        hidden=hidden,
        fraction=fraction,
        sampling=sampling,
        row_weighting=row_weighting,
        evaluate_every=evaluate_every,
        carry_optimizer=carry_optimizer,
        share=share,
        publish=publish,
        min_children=min_children,
        min_samples=min_samples,
        round_timeout=round_timeout,
        query_timeout=query_timeout,
        seed=seed,
    )
    try:
        scenario.check()  # before anything is created: a bad setting leaves nothing behind
    except (ValueError, OSError) as err:
        raise _fail(str(err)) from err
    if not resume:  # (a resumed job's directories exist; reading them reports what is wrong)
        _check_out(out)
        _check_out(state, "--state")
    state_dir = state if state is not None else (out / "state" if out is not None else None)
    if resume and state_dir is None:
        raise _fail("--resume needs the interrupted job's --out (or --state) directory")
    run_id: int | None = None
    try:
        if resume:
            assert state_dir is not None
            # The children key their state by run id: the resumed run keeps the job's.
            saved = read_master_state(state_dir)
            run_id = saved.run_id
            if saved.stop_reason:
                console.print(
                    f"the job's rounds are complete (round {saved.round}, {saved.stop_reason}): "
                    "resuming only runs its final test on the children and publishes the encoder"
                )
        security = master_security(certs, insecure, allowlist=allowlist, warn=_warn)
        server = FederationServer(
            listen,
            security,
            heartbeat_interval=heartbeat,
            heartbeat_timeout=heartbeat_timeout,
            send_patience=DEFAULT_PATIENCE if send_turns else None,
        )
    except (ValueError, OSError, SecurityError, MasterStateError) as err:
        raise _fail(str(err)) from err

    stopping: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        # Once: a second signal (`timeout` and process-group kills send two) would otherwise
        # escape the shutdown the first one started, as a traceback.
        if stopping:
            return
        stopping.append(signum)
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    if serve:
        try:
            _serve_control(
                server, scenario, out, children, wait, operators, stop_children, max_crashes
            )
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return
    out_dir = out or default_out_dir(scenario)
    title = f"{scenario.name}: {scenario.encoder} / {scenario.rule}"
    _, on_round, _ = _round_printer(title)
    server.start()
    # A line that scripts (and `fedenc simulate --processes`) can wait for.
    console.print(f"listening on {server.address}, waiting for {scenario.children} children")
    from fedenc.federation.master import round_listener

    started = time.time()  # a checkpoint older than this is an earlier job's

    def close_children(detail: str, signal_name: str = "") -> None:
        """Close the children (RESTART when this run checkpointed a round to resume from, and
        not --stop-children), say so after a signal, and print the resume hint."""
        checkpoint = state_dir or out_dir / "state"
        resumable = not stop_children and _resumable(checkpoint, started)
        waiting = _close_children(server, detail, resumable)
        if signal_name:
            console.print(
                f"{signal_name}: closing every child's stream"
                + (" (RESTART: they wait for the resume)" if waiting else "")
            )
        _print_resume_hint(checkpoint, started, waiting)

    try:
        run_config = scenario.run_config(out_dir)
        run_config["wait-timeout"] = wait
        run_config["state-dir"] = str(state_dir or out_dir / "state")
        run_config["resume"] = resume
        token = round_listener.set(on_round)
        try:
            run = run_server_app(master_app, server, run_config, run_id=run_id)
        finally:
            round_listener.reset(token)
        runtime = {
            "kind": "grpc",
            "tls": certs is not None,
            "resumed": resume,
            "listen": server.address,
            "wire_bytes_sent": run.bytes_sent,
            "wire_bytes_received": run.bytes_received,
            "seconds": run.seconds,
        }
        outcome = outcome_of(scenario, out_dir, run.server_context, runtime)
    except _Interrupted as sig:
        name = signal.Signals(sig.signum).name
        close_children(f"the master was stopped ({name})", signal_name=name)
        raise typer.Exit(0) from None
    except (
        ValueError,
        FileNotFoundError,
        ConnectionError,  # a PS shard gone for good (an OSError, but not a write's)
        NotEnoughChildrenError,
        FusionOutputError,
    ) as err:
        # A job that failed after a checkpoint can be resumed (run_master kept the children's
        # state for it): the children wait for it, as after a signal.
        close_children(f"the job failed: {err}")
        raise _fail(str(err)) from err
    except OSError as err:  # a full disk, a read-only or replaced --out: said, and no hang
        close_children(f"the master cannot write: {err}")
        where = f" {err.filename}" if err.filename else ""
        raise _fail(f"cannot write{where}: {err.strerror or err}") from err
    except BaseException as err:
        # Anything else (a bug, torch failing to write): the children are closed all the same,
        # or the gRPC threads keep this process, and its children, waiting for ever.
        close_children(f"the job failed: {type(err).__name__}: {err}")
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    server.stop("the job is over")
    _print_outcome(outcome.result, title, out_dir)


def _close_children(server: Any, detail: str, resume: bool) -> bool:
    """Close every child's stream: RESTART when the job will be resumed (children keep its state
    and dial again), else SHUTDOWN; returns whether it was RESTART."""
    if not resume:
        server.stop(detail)
        return False
    from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb

    server.stop(f"{detail}; it can be resumed", reason=spb.CLOSE_REASON_RESTART)
    return True


def _resumable(state_dir: Path, since: float) -> bool:
    """Whether this run wrote a checkpoint in ``state_dir`` (since ``since``; an older one is an
    earlier job's)."""
    from fedenc.federation.checkpoint import state_path

    path = state_path(state_dir)
    return path.is_file() and path.stat().st_mtime >= since


def _print_resume_hint(state_dir: Path, since: float, children_wait: bool = True) -> None:
    """How to continue a master's job that stopped after a completed round (if one did)."""
    if not _resumable(state_dir, since):
        return
    children = (
        "The children keep their state and dial again for their --connect-timeout (0: without "
        "end); a child that exits before the resume starts the job afresh, and the result then "
        "differs from an uninterrupted run"
        if children_wait
        else "The children were told to stop (--stop-children): restarted, they start the job "
        "afresh, and the result differs from an uninterrupted run"
    )
    console.print(
        f"the job's checkpoint after its last completed round is in {state_dir}: continue it "
        f"with the same command plus --resume. {children}",
        highlight=False,
    )


def _serve_control(
    server: Any,
    scenario: Any,
    out: Path | None,
    children: int | None,
    wait: float,
    operators: str = "operator",
    stop_children: bool = False,
    max_crashes: int = 2,
) -> None:
    """``fedenc master --serve``: the Control API next to Federation until a signal."""

    from fedenc.control.service import ControlService, serve_defaults

    out_root = out or Path("runs") / f"control-{time.strftime('%Y%m%d-%H%M%S')}"
    defaults = serve_defaults(scenario.run_config(), children, wait)
    names = [n.strip() for n in operators.split(",") if n.strip()]
    try:
        service = ControlService(
            server, defaults, out_root, operators=names, max_crashes=max_crashes
        ).attach()
    except ValueError as err:  # another master serves out_root
        raise _fail(str(err)) from err
    server.start()
    # A line that scripts can wait for, as in the default mode.
    console.print(
        f"listening on {server.address}, serving the Control API (no job yet); "
        f"job outputs go to {out_root}/<job id>"
    )
    try:
        while True:
            time.sleep(0.5)
    except _Interrupted as sig:
        name = signal.Signals(sig.signum).name
        console.print(
            f"{name}: the running job stops after its round (at most 10 s); it and the queued "
            f"jobs go on when a master serves {out_root} again"
        )
        waiting = service.stop(f"the master was stopped ({name})", timeout=10.0, keep=True)
        waiting = waiting and not stop_children
        _close_children(server, f"the master was stopped ({name})", waiting)
        if waiting:
            console.print("closed every child's stream with RESTART: they wait for the resume")


@app.command("child")
def child_cmd(
    master: Annotated[str, typer.Option(help="The master's HOST:PORT.")] = "127.0.0.1:9092",
    name: Annotated[
        str,
        typer.Option(
            help="This child's name, unique in the federation; with --certs, the name of its "
            "certificate (the master knows the child by that name only)."
        ),
    ] = "child",
    certs: CertsOpt = None,
    server_name: Annotated[
        str | None,
        typer.Option(
            help="With --certs: the name to expect in the master's certificate when the dialled "
            "address is not among its names (a tunnel, a load balancer)."
        ),
    ] = None,
    local_check: Annotated[
        bool,
        typer.Option(
            "--local-check/--no-local-check",
            help="With --certs: check this child's certificate (CA, validity, key) before "
            "dialling; --no-local-check lets the master's TLS handshake decide.",
        ),
    ] = True,
    insecure: InsecureOpt = False,
    data: Annotated[
        Path | None,
        typer.Option(help="Local data directory or raw click log (default: the run's)."),
    ] = None,
    index: Annotated[int, typer.Option(min=0, help="This child's partition i of K.")] = 0,
    children: Annotated[int, typer.Option(min=1, help="K: partitions of the data set.")] = 1,
    partition: Annotated[
        str | None, typer.Option(help="iid | time | dirichlet (default: the run's).")
    ] = None,
    alpha: AlphaOpt = None,
    synthetic_sessions: SessionsOpt = None,
    synthetic_items: ItemsOpt = None,
    valid_fraction: Annotated[float | None, typer.Option(help="Validation share.")] = None,
    app_path: Annotated[
        str, typer.Option("--app", help="The ClientApp, module:attribute.")
    ] = "nodes.child:app",
    threads: Annotated[int, typer.Option(min=0, help="torch threads (0 = default).")] = 0,
    workers: Annotated[
        int, typer.Option(min=0, help="Train on N computing-server processes (fedenc.elastic).")
    ] = 0,
    plan: Annotated[
        str,
        typer.Option(
            help="Execution plan of this child's training steps: default (the plain loop: a "
            "job gives the same encoder as in a simulation, bit for bit), auto (the fastest by "
            "measured cost on this machine, cached; equal up to float summation order) or a "
            "name such as cpu-t1-c4096-s2 (docs/planner.md). The PS and --workers train "
            "their own way.",
        ),
    ] = "default",
    elastic_listen: Annotated[
        str | None,
        typer.Option(
            help="--workers: HOST:PORT of the site's task-information server, for computing "
            "servers on other machines (`fedenc elastic worker --task-server HOST:PORT`). "
            "Default: 127.0.0.1, this machine only.",
            rich_help_panel="Elastic (--workers)",
        ),
    ] = None,
    elastic_advertise: Annotated[
        str | None,
        typer.Option(
            help="--workers: the host name other machines dial (default: the listen host, or "
            "this machine's name for 0.0.0.0).",
            rich_help_panel="Elastic (--workers)",
        ),
    ] = None,
    elastic_certs: Annotated[
        Path | None,
        typer.Option(
            help="--workers: the site's own fedenc certificates (mutual TLS between its "
            "services and computing servers).",
            rich_help_panel="Elastic (--workers)",
        ),
    ] = None,
    elastic_insecure: Annotated[
        bool,
        typer.Option(
            "--elastic-insecure",
            help="--workers: plaintext off this machine (trusted networks only).",
            rich_help_panel="Elastic (--workers)",
        ),
    ] = False,
    connect_timeout: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Give up after this long without a connection, seconds (0 = never: a child "
            "that waits through master restarts).",
        ),
    ] = 60.0,
    stay: Annotated[
        bool, typer.Option("--stay", help="Keep serving (reconnect) after the master shuts down.")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug | info | warning")] = "info",
) -> None:
    """Join a federation: dial the master, hold one stream, run the ClientApp on its messages.

    Exit codes: 0 after the master's shutdown or SIGINT/SIGTERM (the child says goodbye), 1 when
    the master cannot be reached, 2 on bad options, 3 when the master refuses this child (or its
    own certificate is unusable), with the reason.
    """
    import importlib

    from fedenc.runtime.grpc.child import EXIT_REFUSED, GrpcChild
    from fedenc.runtime.grpc.security import child_security

    _log_level(log_level)
    if index >= children:
        raise _fail(f"--index {index} must be below --children {children}")
    elastic = [elastic_listen, elastic_advertise, elastic_certs, elastic_insecure or None]
    if not workers and any(v is not None for v in elastic):
        raise _fail("--elastic-listen/--elastic-advertise/--elastic-certs/--elastic-insecure "
                    "need --workers N")  # fmt: skip
    if elastic_certs is not None and not elastic_certs.is_dir():
        raise _fail(f"--elastic-certs {elastic_certs}: no such directory")
    if plan not in ("auto", "default"):
        from fedenc.planner.spec import PlanError, PlanSpec

        try:
            PlanSpec.parse(plan)
        except PlanError as err:
            raise _fail(f"--plan {plan}: {err}") from err
        if workers:
            raise _fail(f"--plan {plan}: --workers trains on computing servers, not by a plan")
    module_name, _, attr = app_path.partition(":")
    try:
        client_app = getattr(importlib.import_module(module_name), attr or "app")
    except (ImportError, AttributeError) as err:
        raise _fail(f"cannot load the ClientApp {app_path!r}: {err}") from err
    if data is not None and not data.exists():
        raise _fail(f"--data {data}: no such file or directory")
    if data is None and children == 1:
        console.print(
            f"{name} trains on the whole of the job's data source (no --data): give --index I "
            "--children K to take part I of K of a source the children share",
            highlight=False,
        )
    if threads:
        import torch

        torch.set_num_threads(threads)
    # The name the operator gave (unique: the master refuses a second stream with it) labels
    # this child in the master's reports, results and logs.
    node_config: dict[str, Any] = {"partition-id": index, "num-partitions": children, "name": name}
    optional = {
        "data": str(data) if data is not None else None,
        "partition": partition,
        "alpha": alpha,
        "synthetic-sessions": synthetic_sessions,
        "synthetic-items": synthetic_items,
        "valid-fraction": valid_fraction,
        "elastic-workers": workers or None,
        "plan": plan,
        "elastic-listen": elastic_listen,
        "elastic-advertise": elastic_advertise,
        "elastic-certs": str(elastic_certs) if elastic_certs is not None else None,
        "elastic-insecure": elastic_insecure or None,
    }
    node_config.update({k: v for k, v in optional.items() if v is not None})
    # What can be checked before a job arrives is (the data itself is read with the job's
    # instruction): a bad setting would otherwise surface only then, as a declined job. The
    # job's run config may set more; these are the child's own, checked by the same config.
    from fedenc.federation.child_data import ChildDataConfig

    try:
        ChildDataConfig.from_configs({}, node_config)
    except ValueError as err:  # its message starts with the key, which is the option's name
        raise _fail(f"--{err}") from err
    try:
        security = child_security(
            certs,
            insecure,
            name,
            master,
            server_name=server_name,
            local_check=local_check,
            warn=_warn,
        )
        child = GrpcChild(
            master,
            name,
            client_app,
            node_config,
            security,
            connect_timeout=connect_timeout,
            stay=stay,
        )
    except PemError as err:  # its own certificate: the master would refuse it
        console.print(f"[bold red]refused:[/] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(code=EXIT_REFUSED) from err
    except (ValueError, SecurityError) as err:
        raise _fail(str(err)) from err

    def on_signal(signum: int, frame: Any) -> None:
        child.stop(f"{signal.Signals(signum).name} received")

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    code = child.run()
    from fedenc.federation.child import close_sites

    close_sites()  # its computing servers end with it (--workers)
    if child.working:
        # Stopped mid-call: the ClientApp's thread (and torch's and the planner's threads under
        # it) cannot be joined, and tearing the interpreter down under them aborts the process
        # ("terminate called without an active exception", exit 134). The goodbye is sent.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
