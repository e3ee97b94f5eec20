"""The ``fedenc`` command line.

``fedenc train`` trains one encoder locally (a child's trainer on its own); the federation commands
(``simulate``, ``master``, ``child``) build on the same pieces.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fedenc import __version__
from fedenc.ps.cli import ps_app
from fedenc.security.cli import certs_app

app = typer.Typer(
    name="fedenc",
    help="Federated training of shared session-recommendation encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command("encoders")
def encoders_cmd() -> None:
    """List the available encoder types."""
    from fedenc.encoders.registry import available_encoders, encoder_class

    for name in available_encoders():
        doc = (encoder_class(name).__doc__ or encoder_class(name).__module__).strip()
        typer.echo(f"{name:10s} {doc.splitlines()[0]}")


@app.command("train")
def train_cmd(
    encoder: Annotated[str, typer.Option(help="Encoder type (see `fedenc encoders`).")] = "srgnn",
    data: Annotated[
        Path | None,
        typer.Option(
            help="Prepared data directory (train_sessions.txt + test_sessions.txt) or a raw click "
            "log (.csv Diginetica, .dat/.txt Yoochoose). Omit for the synthetic default."
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
        bool, typer.Option(help="Reversed position embeddings (off = plain SR-GNN).")
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
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: Annotated[int, typer.Option(help="torch threads (0 = default).")] = 0,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the checkpoint and results.json.")
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
) -> None:
    """Train one encoder locally; select the epoch on validation, report test once."""
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
        )
        synthetic_config = SyntheticConfig(
            num_sessions=synthetic_sessions,
            num_items=synthetic_items,
            seed=seed,
            valid_fraction=valid_fraction,
        )
        splits = _load_splits(data, synthetic_config)
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
    started = time.time()
    live = sys.stderr.isatty()
    with TrainingProgress(enabled=not quiet, console=console, lines=not live) as progress:
        result = trainer.fit(train_ex, valid_ex, test_ex, progress=progress)

    summary: dict[str, Any] = {
        "encoder": encoder,
        "encoder_config": model.config.to_dict(),
        "train_config": config.to_dict(),
        "data": splits.summary(),
        "device": str(trainer.device),
        "started": started,
        **result.to_dict(),
    }
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


data_app = typer.Typer(help="Inspect data sets and partitions.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(certs_app, name="certs")
app.add_typer(ps_app, name="ps")


def _load_splits(data: Path | None, synthetic: Any) -> Any:
    """The data set at ``data``, or the synthetic one described by ``synthetic`` (a
    :class:`~fedenc.data.synthetic.SyntheticConfig`); bad input exits with a clear message."""
    from fedenc.data.splits import load_dataset
    from fedenc.data.synthetic import generate

    try:
        if data is None:
            return generate(synthetic)
        return load_dataset(data, valid_fraction=synthetic.valid_fraction)
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err


@data_app.command("stats")
def data_stats_cmd(
    data: Annotated[
        Path | None, typer.Option(help="Data directory or raw log; omit = synthetic.")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
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
    scheme: Annotated[str, typer.Option(help="iid | time | dirichlet")] = "iid",
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration (smaller = more skewed).")
    ] = 0.5,
    seed: Annotated[int, typer.Option()] = 0,
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


@app.command("simulate")
def simulate_cmd(
    scenario_file: Annotated[
        Path | None,
        typer.Argument(
            help="Scenario TOML (e.g. simulations/quickstart.toml); options below override it.",
            show_default=False,
        ),
    ] = None,
    children: Annotated[int | None, typer.Option(min=1, help="Number of children K.")] = None,
    partition: Annotated[str | None, typer.Option(help="iid | time | dirichlet")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration.")] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder type (`fedenc encoders`).")] = None,
    rule: Annotated[
        str | None, typer.Option(help="Fusion rule (weighted_sum, mean, median, krum, ...).")
    ] = None,
    stop: Annotated[
        str | None,
        typer.Option(help="Extra stop rule, e.g. 'plateau=valid_recall@20:3' or 'deadline_s=600'."),
    ] = None,
    rounds: Annotated[int | None, typer.Option(min=0, help="Round budget (0 = none).")] = None,
    local_epochs: Annotated[int | None, typer.Option(min=1, help="Local epochs per round.")] = None,
    max_examples: Annotated[
        int | None, typer.Option(min=0, help="Cap each child's training pairs per epoch (0=all).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Data directory or raw click log; omit for the synthetic default."),
    ] = None,
    synthetic_sessions: Annotated[int | None, typer.Option(help="Synthetic: sessions.")] = None,
    synthetic_items: Annotated[int | None, typer.Option(help="Synthetic: catalog size.")] = None,
    hidden: Annotated[int | None, typer.Option(min=1, help="Encoder width.")] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Share of the children sampled per round.")
    ] = None,
    min_children: Annotated[int | None, typer.Option(min=1, help="Fewest per round.")] = None,
    round_timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for a round's replies (0 = forever).")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Run the children in N worker processes (0 = in this process)."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=0, help="Torch threads per worker (0 = cores / workers).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default runs/<name>-<time>).")
    ] = None,
) -> None:
    """Simulate a federation in this process: K children, one master, per-round table."""
    from rich.live import Live

    from fedenc.federation.master import NotEnoughChildrenError, RoundResult
    from fedenc.federation.report import round_table
    from fedenc.runtime.simulate import Scenario, default_out_dir, run_scenario

    try:
        base = Scenario.from_toml(scenario_file) if scenario_file is not None else Scenario()
        scenario = base.with_overrides(
            children=children,
            partition=partition,
            alpha=alpha,
            encoder=encoder,
            rule=rule,
            stop=stop,
            rounds=rounds,
            local_epochs=local_epochs,
            workers=workers,
            threads=threads,
            max_examples_per_epoch=max_examples,
            data=str(data) if data is not None else None,
            synthetic_sessions=synthetic_sessions,
            synthetic_items=synthetic_items,
            hidden=hidden,
            fraction=fraction,
            min_children=min_children,
            round_timeout=round_timeout,
            seed=seed,
        )
    except (ValueError, FileNotFoundError) as err:
        raise _fail(str(err)) from err
    out_dir = out or default_out_dir(scenario)
    where = scenario.data or f"synthetic ({scenario.synthetic_sessions} sessions)"
    console.print(
        f"[bold]{scenario.name}[/]: {scenario.children} children ({scenario.partition}), "
        f"{scenario.encoder}, rule {scenario.rule}, {scenario.rounds} rounds, data {where}"
    )
    rows: list[dict[str, Any]] = []
    title = f"{scenario.name}: {scenario.encoder} / {scenario.rule}"
    live = Live(round_table(rows, title), console=console, auto_refresh=False)
    interactive = console.is_terminal

    def on_round(result: RoundResult) -> None:
        rows.append(result.to_dict())
        if interactive:
            live.update(round_table(rows, title), refresh=True)
        else:
            recall = "-" if result.recall_at_20 is None else f"{result.recall_at_20:.2f}"
            console.print(
                f"round {result.round}: {len(result.participants)}/{len(result.sampled)} "
                f"children, Recall@20 {recall}, {result.seconds:.2f} s"
            )

    try:
        if interactive:
            live.start()
        try:
            outcome = run_scenario(scenario, out_dir, on_round=on_round)
        finally:
            if interactive:
                live.stop()
    except (ValueError, FileNotFoundError, NotEnoughChildrenError) as err:
        raise _fail(str(err)) from err
    result = outcome.result
    Console().print(round_table(result["rounds"], title))
    final = result.get("final_metrics") or {}
    if "test_recall@20" in final:
        console.print(
            f"[bold green]test[/]: P@20 {final['test_recall@20']:.2f}  "
            f"MRR@20 {final.get('test_mrr@20', float('nan')):.2f}  "
            f"({int(final.get('test_examples', 0))} examples)"
        )
    console.print(f"stopped: {result['stop_reason']}; outputs in {out_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
