"""``fedenc simulate``: a scenario (children, partition, encoder, rule, rounds, data) run on the
in-process runtime with fedenc's own apps (``nodes/master.py`` + ``nodes/child.py``).

A scenario is a flat set of settings, from CLI options or a TOML file (``simulations/*.toml``)
whose top-level keys are the :class:`Scenario` fields in kebab-case, e.g.::

    name = "quickstart"
    children = 4
    partition = "iid"       # iid | time | dirichlet (with alpha)
    rounds = 3
    hidden = 32
    synthetic-sessions = 4000
    [rule-options]          # optional tables: rule-options, encoder-options, stop
    accumulator_dtype = "float64"

It becomes the apps' ``run_config`` (:meth:`Scenario.run_config`), the same keys ``flwr run``
would pass, so a scenario means the same on every runtime.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedenc import atomic
from fedenc.federation.master import SAMPLINGS, RoundListener, RoundResult, round_listener
from fedenc.plugins import did_you_mean

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from flwr.app import Context

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


#: Command-line option names whose scenario setting is spelt otherwise.
_OPTION_NAMES = {"max_examples": "max_examples_per_epoch"}
#: Settings of a plain scalar type, checked when read from a file (TOML: 4 is an int, 4.0 a float).
_SCALARS: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


def _is_a(value: Any, wanted: type) -> bool:
    if wanted is float:  # NumPy scalars too (a seed or a rate computed by a script)
        return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if wanted is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)
    return isinstance(value, wanted)


@dataclass(frozen=True)
class Scenario:
    """Everything a simulation needs; every field has a quick default."""

    name: str = "simulation"
    children: int = 4
    partition: str = "iid"
    alpha: float = 0.5
    encoder: str = "srgnn"
    hidden: int = 100
    steps: int = 1
    encoder_options: dict[str, Any] = field(default_factory=dict)
    rule: str = "weighted_sum"
    # What the children train together: "all" (the whole encoder, item table included), "encoder"
    # (item table local), "auto" = "encoder" with a parameter server in the children, else "all".
    share: str = "auto"
    rule_options: dict[str, Any] = field(default_factory=dict)
    stop: str | dict[str, Any] | None = None
    rounds: int = 5
    publish: str = "last"  # "last" round's target, or the "best" round's (valid Recall@20)
    local_epochs: int = 1
    batch_size: int = 100
    lr: float = 1e-3
    lr_decay_step: int = 3
    max_examples_per_epoch: int = 0
    data: str | None = None  # None = the synthetic default
    synthetic_sessions: int = 20000
    synthetic_items: int = 2000
    valid_fraction: float = 0.1
    seed: int = 0
    min_children: int = 1
    min_samples: int = 1  # fewest training samples a child may confirm (fewer: left out)
    fraction: float = 1.0
    sampling: str = "random"  # random | cyclic (the children in turn; see MasterConfig)
    row_weighting: bool = True  # fuse a shared item table row by row (weighted_sum)
    carry_optimizer: bool = False  # cyclic, one child a round: Adam moments travel along
    round_timeout: float = 0.0  # seconds, 0 = wait for every reply
    query_timeout: float = 0.0  # seconds for a child's confirmation, 0 = wait for it
    evaluate_every: int = 1
    concurrency: int = 1  # ClientApp calls running at once (in this process)
    workers: int = 0  # > 0: the children run in this many worker processes
    threads: int = 0  # torch threads per worker (0 = cores / workers)
    device: str = "cpu"
    # Stragglers and cost-balanced work (fedenc.planner.balance): per-child slowdown factors
    # (child i idles (f_i - 1) x its training time), and the master's balancing.
    slowdown: tuple[float, ...] = ()
    balance_work: bool = False
    work_deadline: float = 0.0
    # Two-level PS (fedenc.ps.federation): "" = off, "local" = placement (a), each child's own
    # PS; "federation" = placement (b), one item table in a PS the master hosts.
    ps: str = ""
    ps_exchange_every: int = 0  # samples between exchanges, 0 = end of round
    ps_scoring: str = "full"  # full | sampled
    ps_negatives: int = 256
    ps_capacity: int = 20000
    ps_shards: int = 1  # in-process shards of the (child's or the federation's) PS
    ps_pad_rows: int = 0  # placement b: random zero-delta rows added to each reply
    ps_addresses: str = ""  # gRPC shards (HOST:PORT,...) instead of in-process ones

    def __post_init__(self) -> None:
        for f in fields(self):  # a Scenario built in Python skips from_mapping's type checks
            wanted = _SCALARS.get(str(f.type))
            value = getattr(self, f.name)
            if wanted is not None and not _is_a(value, wanted):
                raise TypeError(f"{f.name} must be {wanted.__name__}, got {value!r}")
            if wanted in (int, float):
                object.__setattr__(self, f.name, wanted(value))
        if self.children < 1:
            raise ValueError(f"children must be >= 1, got {self.children}")
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        object.__setattr__(self, "slowdown", tuple(float(f) for f in self.slowdown))
        if len(self.slowdown) > self.children or any(not f >= 1.0 for f in self.slowdown):
            raise ValueError(
                f"slowdown takes at most one factor >= 1 per child, got {list(self.slowdown)}"
            )
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be random or cyclic, got {self.sampling!r}")
        if self.share not in ("auto", "all", "encoder"):
            raise ValueError(f"share must be auto, all or encoder, got {self.share!r}")
        if self.publish not in ("last", "best"):
            raise ValueError(f"publish must be last or best, got {self.publish!r}")
        if self.device not in ("cpu", "cuda", "auto") and not re.fullmatch(
            r"cuda:\d+", self.device
        ):
            raise ValueError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.workers < 0 or self.threads < 0:
            raise ValueError(
                f"workers and threads must be >= 0, got {self.workers}, {self.threads}"
            )

    def check(self) -> None:
        """``ValueError`` naming the setting when the encoder, rule, partition or stop rule is
        unknown, before anything runs."""
        from fedenc.encoders.registry import UnknownEncoderError, encoder_config
        from fedenc.federation.child_data import ChildDataConfig
        from fedenc.federation.fusion import UnknownFusionRuleError, build_fusion_rule
        from fedenc.federation.stopping import build_stop_rule

        run_config = self.run_config()
        # The children's data settings, by the config every child builds from the run config.
        ChildDataConfig.from_configs(
            run_config, {"partition-id": 0, "num-partitions": self.children}
        )
        try:
            # The catalog is the data's (unknown yet): any size checks the options.
            options = {"hidden": self.hidden, "steps": self.steps, **self.encoder_options}
            encoder_config(self.encoder, 2, **options)
            build_fusion_rule(self.rule, **self.rule_options)
        except (UnknownEncoderError, UnknownFusionRuleError, TypeError) as err:
            raise ValueError(str(err)) from None
        if self.stop:
            build_stop_rule(self.stop)
        if self.rounds == 0 and not self.stop:
            raise ValueError("rounds = 0 (no budget) needs a stop rule")
        if not 1 <= self.min_children <= self.children:
            raise ValueError(
                f"min_children must lie in [1, children = {self.children}], got "
                f"{self.min_children}: the job could never start"
            )
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("device cuda: torch sees no CUDA GPU here (use cpu or auto)")
        from fedenc.ps.federation import ps_config_from_run_config

        ps_config_from_run_config(run_config)
        if self.data and not Path(self.data).expanduser().exists():
            raise ValueError(f"data {self.data}: no such file or directory")
        # The master's and the children's training settings, checked before a port is bound
        # (the catalog size is the data's: any size checks the rest).
        from fedenc.federation.master import MasterConfig

        config = MasterConfig.from_run_config({**run_config, "num-items": 2})
        if config.train.epochs < 1 or config.train.batch_size < 1 or not config.train.lr > 0:
            raise ValueError(
                "training needs local-epochs >= 1, batch-size >= 1 and lr > 0 "
                f"(got {config.train.epochs}, {config.train.batch_size}, {config.train.lr})"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "scenario") -> Scenario:
        """From a mapping with kebab- or snake-case keys (or a command-line option's name, as
        ``max-examples``); unknown keys and values of the wrong type are an error naming them."""
        types = {f.name: f.type for f in fields(cls)}
        clean: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            name = _OPTION_NAMES.get(name, name)
            if name not in types:
                known = sorted(t.replace("_", "-") for t in types)
                hint = did_you_mean(key.replace("_", "-"), known)
                raise ValueError(
                    f"{source}: unknown setting {key!r}; {hint}known: {', '.join(known)}"
                )
            wanted = _SCALARS.get(str(types[name]))
            if wanted is not None and not _is_a(value, wanted):
                raise ValueError(f"{source}: {key} must be {wanted.__name__}, got {value!r}")
            clean[name] = value
        try:
            return cls(**clean)
        except (TypeError, ValueError) as err:  # a setting's own check: say where it came from
            raise ValueError(f"{source}: {err}") from err

    @classmethod
    def from_toml(cls, path: Path) -> Scenario:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"scenario file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as err:  # a directory, unreadable, not text
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise ValueError(f"{path}: cannot read the scenario file ({reason})") from None
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from err
        values.setdefault("name", path.stem)
        data = values.get("data")
        if isinstance(data, str) and data and not Path(data).expanduser().is_absolute():
            # Relative to the file, as config files do: the same from any working directory.
            beside = os.path.normpath(path.parent / data)
            if not Path(beside).exists() and Path(data).exists():
                # Files written when paths were read from the working directory still work.
                log.warning(
                    "%s: data %r is read from the working directory; paths in scenario files "
                    "are now relative to the file (%s)",
                    path,
                    data,
                    beside,
                )
            else:
                values["data"] = beside
        return cls.from_mapping(values, source=str(path))

    def with_overrides(self, **overrides: Any) -> Scenario:
        """A copy with the given settings replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def run_config(self, out_dir: Path | None = None) -> dict[str, bool | int | float | str]:
        """The apps' flat ``run_config`` for this scenario."""
        config: dict[str, bool | int | float | str] = {
            "encoder": self.encoder,
            "hidden": self.hidden,
            "steps": self.steps,
            "rule": self.rule,
            "share": self.share if self.share != "auto" else ("encoder" if self.ps else "all"),
            "num-server-rounds": self.rounds,
            "publish": self.publish,
            "local-epochs": self.local_epochs,
            "batch-size": self.batch_size,
            "lr": self.lr,
            "lr-decay-step": self.lr_decay_step,
            "max-examples-per-epoch": self.max_examples_per_epoch,
            "partition": self.partition,
            "alpha": self.alpha,
            "data": self.data or "",
            "synthetic-sessions": self.synthetic_sessions,
            "synthetic-items": self.synthetic_items,
            "valid-fraction": self.valid_fraction,
            "seed": self.seed,
            "min-children": self.min_children,
            "min-samples": self.min_samples,
            "fraction": self.fraction,
            "sampling": self.sampling,
            "row-weighting": self.row_weighting,
            "carry-optimizer": self.carry_optimizer,
            "round-timeout": self.round_timeout,
            "query-timeout": self.query_timeout,
            "evaluate-every": self.evaluate_every,
            "expect-children": self.children,
            "device": self.device,
        }
        if self.balance_work:
            config["balance-work"] = True
            config["work-deadline"] = self.work_deadline
        if self.encoder_options:
            config["encoder-options"] = json.dumps(self.encoder_options)
        if self.rule_options:
            config["rule-options"] = json.dumps(self.rule_options)
        if self.stop:
            config["stop"] = self.stop if isinstance(self.stop, str) else json.dumps(self.stop)
        if self.ps:
            config.update(
                {
                    "ps": self.ps,
                    "ps-exchange-every": self.ps_exchange_every,
                    "ps-scoring": self.ps_scoring,
                    "ps-negatives": self.ps_negatives,
                    "ps-capacity": self.ps_capacity,
                    "ps-shards": self.ps_shards,
                    "ps-pad-rows": self.ps_pad_rows,
                    "ps-addresses": self.ps_addresses,
                }
            )
        if out_dir is not None:
            config["out-dir"] = str(out_dir)
        return config


@dataclass
class SimulationOutcome:
    """The job's result (``MasterResult.to_dict()``), where its files are, and the run's cost."""

    result: dict[str, Any]
    out_dir: Path | None
    files: dict[str, Path]
    wire_bytes: int
    seconds: float


def default_out_dir(scenario: Scenario, root: Path = Path("runs")) -> Path:
    return root / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def missing_child_states(state_dir: Path) -> tuple[int, int]:
    """``(missing, trained)``: of the children that trained in the rounds checkpointed in
    ``state_dir``, how many left no saved state under ``state_dir/children`` (a ``--processes``
    run keeps none, or the files went). Resumed, those restart their optimizer and random
    streams: the run goes on validly, not bit for bit. ``(0, 0)`` without a checkpoint."""
    from fedenc.federation.checkpoint import MasterStateError, read_master_state, state_path

    if not state_path(state_dir).is_file():
        return 0, 0
    try:
        saved = read_master_state(state_dir)
    except MasterStateError:
        return 0, 0  # (the resume itself says what is wrong with it)
    trained = len({name for r in saved.rounds for name in r.get("participants", [])})
    # The files are named by node, not by the names the rounds list: count them.
    kept = len(list((state_dir / "children" / saved.job_id).glob("*.pt")))
    return max(trained - kept, 0), trained


def _warn_inexact_resume(state_dir: Path) -> None:
    missing, trained = missing_child_states(state_dir)
    if missing:
        log.warning(
            "the saved state of %d of the %d children that trained is missing from %s: the "
            "run resumes from the master's checkpoint, but those children restart their "
            "optimizer state and random streams, so its encoder will differ from an "
            "uninterrupted run's",
            missing, trained, state_dir / "children",
        )  # fmt: skip


THREADS_FILE = "threads.json"


def _native_loss_kernels(scenario: Scenario) -> bool:
    """Whether the children's loss runs in the native kernels: a CPU run whose items are
    normalised with a scale within the exp-keeping bound, on a machine where they build."""
    from fedenc.encoders.base import EncoderConfig
    from fedenc.encoders.layers import native_softmax
    from fedenc.encoders.layers.full_softmax import SAFE_LOGIT

    defaults = EncoderConfig.__dataclass_fields__
    options = scenario.encoder_options
    import torch

    device = str(scenario.device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cpu"):
        return False
    if not options.get("normalize", defaults["normalize"].default):
        return False
    if float(options.get("scale", defaults["scale"].default)) > SAFE_LOGIT:
        return False
    return native_softmax.active()


def _note_threads(state_dir: Path, scenario: Scenario, resume: bool) -> None:
    """Record the torch thread count the children train with and whether the native loss
    kernels were available to them; on a resume, warn when either changed: threads change the
    order of float sums (the encoder then equals an uninterrupted run's to about 1e-7), the
    kernels also the ``exp`` (about 1e-6 a step): neither is bit for bit."""
    import torch

    threads = {
        "torch_threads": torch.get_num_threads(),
        "workers": scenario.workers,
        "worker_threads": scenario.threads,
        "native_loss_kernels": _native_loss_kernels(scenario),
    }
    path = state_dir / THREADS_FILE
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, ValueError):
            before = None
        if isinstance(before, dict) and before != threads:
            kernels = "native_loss_kernels"
            how = (
                "about 1e-7 (the order of float sums)"
                if before.get(kernels) == threads[kernels]
                else "float rounding (another loss path: about 1e-6 a step)"
            )
            log.warning(
                "the interrupted run trained with %s, this resume with %s: the encoder will equal "
                "an uninterrupted run's to %s, not bit for bit",
                before, threads, how,
            )  # fmt: skip
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(threads) + "\n")
    except OSError:
        pass  # (the run's own writes there say what is wrong)


CHILD_APP = "nodes.child:app"
"""The ClientApp by reference, for worker processes that import it themselves."""


def run_scenario(
    scenario: Scenario,
    out_dir: Path | None = None,
    on_round: RoundListener | None = None,
    resume: bool = False,
) -> SimulationOutcome:
    """Run ``scenario`` in this process; with ``out_dir``, write the encoder checkpoint,
    results.json, rounds.csv and metrics.png there. ``on_round`` sees each round as it ends.
    ``resume`` continues the interrupted job checkpointed in ``out_dir/state`` after its last
    completed round; the children take up the state they saved under ``out_dir/state/children``
    after each round, so the result equals an uninterrupted run's."""
    from fedenc.runtime.inprocess import run_inprocess
    from nodes.child import app as child_app
    from nodes.master import app as master_app

    scenario.check()
    if out_dir is not None:
        if resume:
            _warn_inexact_resume(out_dir / "state")
        _note_threads(out_dir / "state", scenario, resume)
    token = round_listener.set(on_round)
    try:
        run = run_inprocess(
            master_app,
            CHILD_APP if scenario.workers else child_app,
            scenario.children,
            {**scenario.run_config(out_dir), "resume": resume},
            # Its children live in this process: with an output directory each keeps its state
            # beside the master's, so that --resume continues the run bit for bit. A child's own
            # setting, not the run's: a master cannot make a child write files.
            [
                {"slowdown": f, "child-state": out_dir is not None}
                for f in [*scenario.slowdown, *[1.0] * scenario.children][: scenario.children]
            ],
            concurrency=scenario.concurrency,
            workers=scenario.workers,
            threads=scenario.threads or None,
        )
    finally:
        round_listener.reset(token)
    runtime = {
        "kind": "inprocess",
        "workers": scenario.workers,
        "wire_bytes_sent": run.bytes_sent,
        "wire_bytes_received": run.bytes_received,
        "seconds": run.seconds,
        "messages_handled": {str(k): v for k, v in run.messages_handled.items()},
    }
    return outcome_of(scenario, out_dir, run.server_context, runtime)


def outcome_of(
    scenario: Scenario, out_dir: Path | None, server_context: Context, runtime: dict[str, Any]
) -> SimulationOutcome:
    """The outcome of a finished run of ``nodes/master.py`` on any runtime: its result from the
    ServerApp's context; with ``out_dir``, results.json gets the scenario and ``runtime`` (kind,
    ``wire_bytes_sent`` / ``wire_bytes_received``, ``seconds``, ...)."""
    from fedenc.federation.report import PLOT_FILE, ROUNDS_FILE, write_results
    from nodes.master import RESULT_KEY

    result: dict[str, Any] = json.loads(str(server_context.state[RESULT_KEY]["json"]))
    files: dict[str, Path] = {}
    if out_dir is not None:
        # share = auto as the job ran it (all, or encoder with a parameter server)
        settings = {**asdict(scenario), "share": scenario.run_config()["share"]}
        extra = {"scenario": settings, "runtime": runtime}
        files["results"] = write_results(result, out_dir, extra)
        files["rounds"] = out_dir / ROUNDS_FILE
        if (out_dir / PLOT_FILE).is_file():
            files["plot"] = out_dir / PLOT_FILE
        if result.get("checkpoint"):
            files["checkpoint"] = Path(result["checkpoint"])
    return SimulationOutcome(
        result=result,
        out_dir=out_dir,
        files=files,
        wire_bytes=int(runtime["wire_bytes_sent"]) + int(runtime["wire_bytes_received"]),
        seconds=float(runtime["seconds"]),
    )


__all__ = [
    "RoundResult",
    "Scenario",
    "SimulationOutcome",
    "default_out_dir",
    "outcome_of",
    "run_scenario",
]
