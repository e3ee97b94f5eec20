"""The master's side of the protocol (patent US20210209417A1), over any Flower ``Grid``.

:func:`run_master` is transport-free: it only calls ``grid.get_node_ids()`` and
``grid.send_and_receive()``, so the same loop runs on fedenc's in-process grid, its gRPC grid and
Flower's own engines. One job:

1. **Instruction.** A ``query`` message carrying the ``TrainingInstruction`` (job id, encoder type
   and config, local training config, round budget) goes to every available child.
2. **Confirmation.** Each child answers with a ``Confirmation``: accepted with its number of
   samples and a data summary, or declined with a reason. Decliners, children that fail and
   children that do not answer in time are left out of the job.
3. **Initial parameters, only now.** The first ``train`` message, which carries the initial shared
   parameters, goes to confirmed children only, and only after their confirmation came back.
4. **Rounds.** Each round samples the confirmed children (``fraction``, at least
   ``min_children``: seeded at random, or in turn with ``sampling = "cyclic"``), sends them the
   target, and fuses the replies with the pluggable rule
   (default ``weighted_sum``: ``w_i = n_i / Σ n_j`` over the round's accepted replies). A reply is
   rejected with a logged reason when it is an error, late, or malformed (missing or extra
   tensors, wrong shape or dtype, NaN/Inf, no sample count); the round goes on without it and
   the weights renormalise. Replies are fused in child order, not arrival order, so a run is
   reproducible bit for bit. Then ``evaluate`` messages ask every confirmed child for Recall@K /
   MRR@K of the new target on its held-out data (the example-weighted mean is the round's
   metric), and the stop rule decides. Children that appear later are queried at the start of the
   next round and take part once they confirm.
   With the federation-level PS (``ps = "federation"``, placement b of docs/ps.md) the item
   table lives in a distributed PS the master hosts (:class:`~fedenc.ps.federation.
   FederationTable`): the dense encoder is fused as above, each reply's sparse item rows are
   checked with it (one bad part rejects the whole reply) and fused row by row with the job's
   rule, each child weighted by the samples of its data touching the row
   (:class:`~fedenc.ps.sparse.RowFusion`),
   then applied to the table once the round is over.
5. **Publication.** After the last round the target is evaluated on the children's test splits,
   saved as an encoder checkpoint with the job's metadata, and returned with per-round reports.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedenc.encoders.base import EncoderConfig, SessionEncoder
from fedenc.encoders.registry import build_encoder
from fedenc.federation import records
from fedenc.federation.checkpoint import (
    MasterState,
    MasterStateError,
    capture_rng,
    check_resumable,
    config_fingerprint,
    read_master_state,
    restore_rng,
    state_path,
    write_master_state,
)
from fedenc.federation.fusion import EmptyRoundError, build_fusion_rule
from fedenc.federation.optimizer_state import OptimizerStateError, check_moments
from fedenc.federation.parameters import BadUpdateError, Parameters, relative_change
from fedenc.federation.runconfig import get_bool, get_float, get_int, get_json, get_str
from fedenc.federation.stopping import (
    CHILD_COUNTER_PREFIXES,
    AnyOf,
    MaxRounds,
    RoundReport,
    StopRule,
    build_stop_rule,
    unknown_round_metrics,
)
from fedenc.planner.balance import WorkBalancer
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.protocol.peer_text import clip
from fedenc.ps.federation import PLACEMENTS, FederationTable
from fedenc.ps.sparse import ROW_RULES, RowFusion, rows_from_record
from fedenc.runtime.flower_compat import SUPERLINK_NODE_ID
from fedenc.training.allocator import tune_allocator
from fedenc.training.checkpoint import save_checkpoint
from fedenc.training.config import TrainConfig

log = logging.getLogger(__name__)

RoundListener = Callable[["RoundResult"], None]
round_listener: ContextVar[RoundListener | None] = ContextVar("round_listener", default=None)
"""A callback for each finished round, for whoever hosts the ServerApp in this thread (the CLI's
live table); :func:`run_master` calls it in addition to its ``on_round`` argument."""

resumable: ContextVar[bool] = ContextVar("resumable", default=True)
"""False where a failed job is never resumed (the Control service gives every job a fresh id):
its children are then told at once to drop the job's state. Otherwise a failed or interrupted
job with a state directory leaves it in place, so that ``--resume`` continues it bit for bit."""


#: Bounds far above any real job: a typo or a remote job spec fails at once, not as a job that
#: never ends.
MAX_ROUNDS: Final = 1_000_000
MAX_CHILDREN: Final = 100_000
MAX_WAIT_S: Final = 7 * 24 * 3600.0

#: Seconds a message lives past the master's wait for its reply (its TTL on a SuperLink).
TTL_MARGIN_S: Final = 60.0

#: Seconds the master waits for the children to acknowledge the end of a job.
FINISH_TIMEOUT: Final = 30.0
#: Seconds between the log lines of a long wait for replies.
WAIT_LOG_S: Final = 30.0
#: Without a round timeout, evaluation replies are awaited at least this long (and at most
#: 4 x the round's slowest training beyond it).
EVAL_WAIT_FLOOR_S: Final = 600.0
#: How long the master waits for a left-out child to acknowledge why (it answers at once).
NOTICE_TIMEOUT_S: Final = 5.0


class NotEnoughChildrenError(RuntimeError):
    """Fewer children confirmed than the job's ``min_children``."""


SAMPLINGS = ("random", "cyclic")  # how a fraction of the children is drawn (MasterConfig)


@dataclass
class MasterConfig:
    """One job: the encoder, the local training, the fusion and stop rules, participation."""

    encoder: str = "srgnn"
    num_items: int = 2000
    encoder_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1))
    rounds: int = 5  # the round budget; 0 = none (then ``stop`` must end the job)
    stop: str | dict[str, Any] | None = None  # extra stop rule (build_stop_rule spec)
    rule: str = "weighted_sum"
    rule_options: dict[str, Any] = field(default_factory=dict)
    min_children: int = 1
    # The fewest training samples a child may confirm: an update computed from a handful of
    # sessions tells too much about them (and, under an unweighted rule, weighs as much as any).
    min_samples: int = 1
    fraction: float = 1.0  # share of the confirmed children sampled for each train round
    # How a fraction < 1 is drawn: "random" (seeded by job seed and round) or "cyclic" (in turn,
    # in name order: round r takes the next k children after round r-1's, wrapping). Cyclic with
    # one child a round is cyclic weight transfer: the encoder visits the children one after the
    # other, so a pass over the children is one pass over all the data, step for step like
    # centralized training (same number of optimizer steps per epoch), at the cost of parallelism.
    sampling: Literal["random", "cyclic"] = "random"
    # With cyclic sampling of one child a round: the Adam moments travel with the encoder from
    # child to child (fedenc.federation.optimizer_state says why, and what that reveals).
    carry_optimizer: bool = False
    round_timeout: float | None = None  # seconds to wait for a round's replies; None = forever
    query_timeout: float | None = None
    evaluate_every: int = 1  # evaluate the target every N rounds (0 = only the last round)
    eval_split: str = "valid"
    final_test: bool = True  # evaluate the published target on the children's test splits
    expect_children: int = 0  # wait until this many nodes are online before the query
    wait_timeout: float = 60.0
    seed: int = 0
    job_id: str = ""
    checkpoint_dir: Path | None = None
    # The job's checkpoint after each completed round (fedenc.federation.checkpoint), and whether
    # to continue the job found there instead of starting one.
    state_dir: Path | None = None
    resume: bool = False
    fold_order: Literal["child", "arrival"] = "child"  # see _Job.train_round
    # What the federation trains together: "all" = the whole encoder, item table included (the
    # children share one catalog: their item rows must live in one space for the fused encoder
    # to mean anything); "encoder" = everything but the item table, which stays local to each
    # child (private catalogs, or item rows too revealing to share).
    share: Literal["all", "encoder"] = "all"
    # With the item table shared, fuse its rows one by one, each child weighted by the samples of
    # its data that touch the row (rules that support it: weighted_sum); see fusion/weighted_sum.
    row_weighting: bool = True
    # Cost-balanced local work (fedenc.planner.balance): from round 2 each child trains as many
    # examples per epoch as it can in the same time, from its measured seconds per example.
    balance_work: bool = False
    work_deadline: float = 0.0  # seconds of local training per round; 0 = keep the total work
    # The children's parameter server (fedenc.ps.federation): "" = none, "local" = each child's
    # own (placement a: nothing changes here), "federation" = the item table in a PS the master
    # hosts (placement b): ps_shards in-process shards, or the gRPC shards of ps_addresses.
    ps: str = ""
    ps_shards: int = 1
    ps_addresses: str = ""
    # Which round's target the job publishes (and tests): "last", or "best", the round with the
    # highest Recall@20 on the evaluation split, as centralized training keeps its best epoch.
    publish: Literal["last", "best"] = "last"

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.rounds <= MAX_ROUNDS:
            problems.append(f"rounds must lie in 0..{MAX_ROUNDS} (got {self.rounds})")
        if self.rounds == 0 and not self.stop:
            problems.append("rounds = 0 (no budget) needs a stop rule")
        if not 1 <= self.min_samples <= 2**62:
            problems.append(f"min_samples must be >= 1 (got {self.min_samples})")
        for name in ("min_children", "expect_children"):
            low = 1 if name == "min_children" else 0
            if not low <= getattr(self, name) <= MAX_CHILDREN:
                problems.append(
                    f"{name} must lie in {low}..{MAX_CHILDREN} (got {getattr(self, name)})"
                )
        if not 0 <= self.wait_timeout <= MAX_WAIT_S:  # NaN fails too
            problems.append(
                f"wait_timeout must lie in 0..{MAX_WAIT_S:g} s (got {self.wait_timeout})"
            )
        if not 0.0 < self.fraction <= 1.0:
            problems.append(f"fraction must lie in (0, 1] (got {self.fraction})")
        if self.sampling not in SAMPLINGS:
            problems.append(f"sampling must be 'random' or 'cyclic' (got {self.sampling!r})")
        if self.carry_optimizer and self.sampling != "cyclic":
            problems.append("carry_optimizer needs sampling = 'cyclic' (one child a round)")
        for name in ("round_timeout", "query_timeout"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= MAX_WAIT_S:
                key = name.replace("_", "-")  # the run-config key, where 0 means no limit
                problems.append(
                    f"{key} must lie in (0, {MAX_WAIT_S:g}] seconds, or 0 for no limit "
                    f"(got {value})"
                )
        if not 0 <= self.evaluate_every <= MAX_ROUNDS:
            problems.append(
                f"evaluate_every must lie in 0..{MAX_ROUNDS} (got {self.evaluate_every})"
            )
        if self.eval_split not in records.SPLITS:
            problems.append(f"eval_split must be one of {records.SPLITS} (got {self.eval_split!r})")
        if self.work_deadline < 0:
            problems.append(f"work_deadline must be >= 0 (got {self.work_deadline})")
        if self.share not in ("all", "encoder"):
            problems.append(f"share must be 'all' or 'encoder' (got {self.share!r})")
        if self.ps not in PLACEMENTS:
            problems.append(f"ps must be one of {PLACEMENTS} (got {self.ps!r})")
        if self.ps == "federation":
            if self.share != "encoder":
                problems.append(
                    "ps = 'federation' keeps the item table in the federation PS: share must "
                    f"be 'encoder' (got {self.share!r})"
                )
            if self.rule not in ROW_RULES:
                problems.append(
                    f"ps = 'federation' fuses item rows with {sorted(ROW_RULES)}; rule "
                    f"{self.rule!r} has no row-wise form here"
                )
        if self.publish not in ("last", "best"):
            problems.append(f"publish must be 'last' or 'best' (got {self.publish!r})")
        if self.publish == "best" and self.eval_split == "test":
            problems.append(
                "publish = 'best' with eval_split = 'test' would choose the published round by "
                "the test split (model selection never looks at test): evaluate rounds on 'valid'"
            )
        if self.publish == "best" and self.ps == "federation":
            problems.append(
                "publish = 'best' keeps a copy of the best round's target; with ps = "
                "'federation' the item table lives in the PS, which keeps no such copy"
            )
        if self.fold_order not in ("child", "arrival"):
            problems.append(f"fold_order must be 'child' or 'arrival' (got {self.fold_order!r})")
        if self.resume and self.state_dir is None:
            problems.append("resume needs a state directory (state-dir, or out-dir)")
        if self.stop:  # a plateau on a metric no round reports would never stop the job
            try:
                rule = build_stop_rule(self.stop)
                problems.extend(unknown_round_metrics(rule, self.eval_split, self.train.ks))
            except (ValueError, TypeError) as err:
                problems.append(f"stop: {err}")
        if problems:
            raise ValueError("bad master config: " + "; ".join(problems))
        if not self.job_id and not self.resume:  # a resumed job takes its checkpoint's id
            self.job_id = f"{self.encoder}-{uuid.uuid4().hex[:12]}"

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> MasterConfig:
        """A job from Flower's flat ``run_config`` (kebab-case keys, every one optional).

        Encoder: ``encoder``, ``num-items`` (0 = the catalog of the children's data source, read
        through ``data`` / ``synthetic-items``), ``hidden``, ``steps``, ``use-positions``,
        ``normalize``, ``scale``, ``dropout``, ``encoder-options`` (JSON). Local training:
        ``local-epochs``, ``batch-size``, ``lr``, ``lr-decay-step``, ``lr-decay-rate``, ``l2``,
        ``max-examples-per-epoch``. Job: ``num-server-rounds`` (or ``rounds``), ``stop``,
        ``rule``, ``rule-options`` (JSON), ``min-children``, ``fraction``, ``round-timeout`` and
        ``query-timeout`` (seconds, 0 = none), ``evaluate-every``, ``eval-split``, ``final-test``,
        ``expect-children``, ``wait-timeout``, ``seed``, ``job-id``, ``fold-order``, ``share``,
        ``row-weighting``, ``ps``, ``ps-shards``, ``ps-addresses``, ``out-dir`` (the encoder
        checkpoint goes to ``<out-dir>/encoder``, the job's checkpoint after each round to
        ``state-dir``, by default ``<out-dir>/state``), ``resume``.
        """
        rc = run_config
        defaults = EncoderConfig(num_items=1)
        encoder_options: dict[str, Any] = {
            "hidden": get_int(rc, "hidden", defaults.hidden),
            "steps": get_int(rc, "steps", defaults.steps),
            "use_positions": get_bool(rc, "use-positions", defaults.use_positions),
            "normalize": get_bool(rc, "normalize", defaults.normalize),
            "scale": get_float(rc, "scale", defaults.scale),
            "dropout": get_float(rc, "dropout", defaults.dropout),
        }
        encoder_options.update(get_json(rc, "encoder-options"))
        base = TrainConfig()
        train = TrainConfig(
            epochs=get_int(rc, "local-epochs", 1),
            batch_size=get_int(rc, "batch-size", base.batch_size),
            lr=get_float(rc, "lr", base.lr),
            lr_decay_step=get_int(rc, "lr-decay-step", base.lr_decay_step),
            lr_decay_rate=get_float(rc, "lr-decay-rate", base.lr_decay_rate),
            l2=get_float(rc, "l2", base.l2),
            max_examples_per_epoch=get_int(rc, "max-examples-per-epoch", 0),
        )
        rounds = get_int(rc, "num-server-rounds", get_int(rc, "rounds", 5))
        round_timeout = get_float(rc, "round-timeout", 0.0)
        query_timeout = get_float(rc, "query-timeout", 0.0)
        out_dir = get_str(rc, "out-dir", "")
        state_dir = get_str(rc, "state-dir", "") or (
            str(Path(out_dir) / "state") if out_dir else ""
        )
        num_items = get_int(rc, "num-items", 0)
        if num_items <= 0:
            from fedenc.federation.child_data import ChildDataConfig, load_source

            num_items = load_source(ChildDataConfig.from_configs(rc, {})).num_items
        return cls(
            encoder=get_str(rc, "encoder", "srgnn"),
            num_items=num_items,
            encoder_options=encoder_options,
            train=train,
            rounds=rounds,
            stop=get_str(rc, "stop", "") or None,
            rule=get_str(rc, "rule", "weighted_sum"),
            rule_options=get_json(rc, "rule-options"),
            min_children=get_int(rc, "min-children", 1),
            min_samples=get_int(rc, "min-samples", 1),
            fraction=get_float(rc, "fraction", 1.0),
            sampling=get_str(rc, "sampling", "random"),  # type: ignore[arg-type]
            carry_optimizer=get_bool(rc, "carry-optimizer", False),
            round_timeout=round_timeout or None,
            query_timeout=query_timeout or None,
            evaluate_every=get_int(rc, "evaluate-every", 1),
            eval_split=get_str(rc, "eval-split", "valid"),
            final_test=get_bool(rc, "final-test", True),
            expect_children=get_int(rc, "expect-children", 0),
            wait_timeout=get_float(rc, "wait-timeout", 60.0),
            seed=get_int(rc, "seed", 0),
            job_id=get_str(rc, "job-id", ""),
            fold_order=get_str(rc, "fold-order", "child"),  # type: ignore[arg-type]
            share=get_str(rc, "share", "all"),  # type: ignore[arg-type]
            row_weighting=get_bool(rc, "row-weighting", True),
            balance_work=get_bool(rc, "balance-work", False),
            work_deadline=get_float(rc, "work-deadline", 0.0),
            ps=get_str(rc, "ps", ""),
            ps_shards=get_int(rc, "ps-shards", 1),
            ps_addresses=get_str(rc, "ps-addresses", ""),
            publish=get_str(rc, "publish", "last"),  # type: ignore[arg-type]
            checkpoint_dir=Path(out_dir) / "encoder" if out_dir else None,
            state_dir=Path(state_dir) if state_dir else None,
            resume=get_bool(rc, "resume", False),
        )

    def stop_rule(self) -> StopRule:
        rules: list[StopRule] = []
        if self.rounds:
            rules.append(MaxRounds(self.rounds))
        if self.stop:
            rules.append(build_stop_rule(self.stop))
        return rules[0] if len(rules) == 1 else AnyOf(*rules)


@dataclass
class ChildInfo:
    """A child as the master knows it."""

    node_id: int
    name: str
    accepted: bool
    num_samples: int = 0
    reason: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    joined_round: int = 1
    declined: bool = False  # said no itself (not: gone, failed or unreadable before answering)
    held_out: dict[str, int] = field(default_factory=dict)  # declared examples per split


@dataclass
class RoundResult:
    """What happened in one round."""

    round: int
    sampled: list[str]
    participants: list[str]
    excluded: dict[str, str]
    num_samples: int
    weights: dict[str, float]  # each accepted child's weight in the fusion (rule.child_weights)
    loss: float | None
    recall_at_20: float | None
    mrr_at_20: float | None
    metrics: dict[str, float]
    evaluated: list[str]
    bytes_sent: int
    bytes_received: int
    seconds: float
    param_change: float | None
    skipped: str | None = None
    stop_reason: str | None = None
    held_replies: int = 0  # most train replies held at once to fold them in child order
    # The accepted children's own training time, as they report it (timings stay out of
    # ``metrics``, which are reproducible bit for bit).
    child_seconds_max: float | None = None
    child_seconds_sum: float | None = None
    child_seconds: dict[str, float] = field(default_factory=dict)  # each one's (who is slow)
    work: dict[str, int] = field(default_factory=dict)  # balanced examples/epoch by child
    # The training exchange alone (train messages, replies, and with the federation PS the rows
    # children read from it while training), without the round's evaluation.
    train_bytes: int = 0
    # Placement b: bytes of the rows the children read from the federation PS this round
    # (training and evaluation; keys as int64 + float32 rows, as the PS protocol carries them).
    ps_bytes_pulled: int = 0
    # Placement b: the item-table part of train_bytes (the sparse rows of the replies and the
    # rows pulled while training), to set against the dense table's bytes.
    table_bytes: int = 0
    # Each evaluated child's own metrics on the evaluation split (the ``metrics`` are their
    # example-weighted mean).
    child_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # What the rule decided besides the target (Krum's "selected", clipped_mean's "clip_scales").
    fusion: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_sent + self.bytes_received + self.ps_bytes_pulled

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_moved"] = self.bytes_moved
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RoundResult:
        """Undo :meth:`to_dict` (a resumed job's earlier rounds)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


@dataclass
class MasterResult:
    """The outcome of a job: the target and the reports."""

    job_id: str
    encoder: str
    encoder_config: dict[str, Any]
    rule: str
    children: list[ChildInfo]
    rounds: list[RoundResult]
    stop_reason: str
    target: Parameters
    final_metrics: dict[str, float]
    seconds: float
    checkpoint: str | None = None
    ps_table: dict[str, Any] = field(default_factory=dict)  # placement b: the table's figures
    final_child_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    published_round: int = 0  # the round whose target this is (publish = "best": the best)

    @property
    def bytes_moved(self) -> int:
        return sum(r.bytes_moved for r in self.rounds)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-ready."""
        return {
            "job_id": self.job_id,
            "encoder": self.encoder,
            "encoder_config": self.encoder_config,
            "rule": self.rule,
            "children": [asdict(c) for c in self.children],
            "rounds": [r.to_dict() for r in self.rounds],
            "stop_reason": self.stop_reason,
            "final_metrics": self.final_metrics,
            "final_child_metrics": self.final_child_metrics,
            "published_round": self.published_round,
            "seconds": self.seconds,
            "bytes_moved": self.bytes_moved,
            "checkpoint": self.checkpoint,
            "shared_parameters": list(self.target),
            "ps_table": self.ps_table,
        }


# -- helpers ---------------------------------------------------------------------------------------


def _weighted_mean(values: Iterable[tuple[float, float]]) -> float | None:
    total = weight = 0.0
    for value, w in values:
        if w > 0 and math.isfinite(value):
            total += value * w
            weight += w
    return total / weight if weight > 0 else None


def _row_count(value: float | None) -> int:
    """A child's reported row count (0 when absent or not a sane count)."""
    if value is None or not math.isfinite(value) or value < 0:
        return 0
    return int(value)


def _reason(reply: Message) -> str:
    error = reply.error
    return f"error reply (code {error.code}): {error.reason}"


class ReplyStream(Protocol):
    """A grid that can hand back replies one by one as they arrive (fedenc's own grids do).

    ``receive(message_ids, timeout)`` yields each reply to one of ``message_ids`` once, as soon
    as it is there, and returns when all have come or ``timeout`` seconds have passed; replies
    that come later are dropped, as in ``send_and_receive``.
    """

    def receive(self, message_ids: Sequence[str], timeout: float | None) -> Iterator[Message]: ...


def _poll_replies(grid: Grid, ids: Sequence[str], timeout: float | None) -> Iterator[Message]:
    """``receive`` for any Flower grid: ``pull_messages`` with a backoff from 1 ms to 0.5 s
    (each pull is a request to Flower's SuperLink under its deployment runtime; Flower's own
    ``send_and_receive`` polls every 3 s)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = set(ids)
    pause = 0.001
    while pending:
        got = list(grid.pull_messages(sorted(pending)))
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if not pending:
            return
        if deadline is not None and time.monotonic() >= deadline:
            return
        pause = 0.001 if got else min(pause * 2, 0.5)
        left = None if deadline is None else deadline - time.monotonic()
        time.sleep(pause if left is None else max(0.0, min(pause, left)))


class _Exchange:
    """Sends one message per node and sorts the replies into answered / failed / missing."""

    def __init__(self, grid: Grid, children: Mapping[int, ChildInfo]) -> None:
        self.grid = grid
        self.children = children
        self.bytes_sent = 0
        self.bytes_received = 0

    def label(self, node_id: int) -> str:
        info = self.children.get(node_id)
        return info.name if info is not None else f"node-{node_id}"

    def stream(
        self,
        content: RecordDict,
        node_ids: Sequence[int],
        message_type: str,
        group_id: str,
        timeout: float | None,
        per_node: Mapping[int, RecordDict] | None = None,
    ) -> Generator[tuple[int, Message | str], None, None]:
        """Send, then yield ``(node, reply)`` as each reply with content arrives and
        ``(node, reason)`` for each node that errs; the nodes that never answered come last.
        ``per_node`` replaces ``content`` for the nodes it names."""
        per_node = per_node or {}
        # A message the master no longer waits for must not stay queued for Flower's default
        # 12 h: a slow node would work through stale rounds first (SuperLink drops it at its TTL).
        ttl = timeout + TTL_MARGIN_S if timeout else None
        messages = [
            Message(
                per_node.get(nid, content),
                dst_node_id=nid,
                message_type=message_type,
                group_id=group_id,
                ttl=ttl,
            )
            for nid in node_ids
        ]
        self.bytes_sent += sum(records.record_bytes(m.content) for m in messages)
        ids = list(self.grid.push_messages(messages))
        sent = dict(zip(ids, (msg.metadata.dst_node_id for msg in messages), strict=True))
        receive = getattr(self.grid, "receive", None)
        replies: Iterable[Message] = (
            receive(ids, timeout) if callable(receive) else _poll_replies(self.grid, ids, timeout)
        )
        done: set[int] = set()
        # A long wait (no timeout, a slow child) says every WAIT_LOG_S whom it waits for.
        watch = threading.Event()
        t0 = time.monotonic()

        def waiting() -> None:
            while not watch.wait(WAIT_LOG_S):
                late = [self.label(n) for n in node_ids if n not in done]
                if late:
                    limit = f" (limit {timeout:g} s)" if timeout else " (no limit)"
                    log.info(
                        "waiting %.0f s%s for %s replies from: %s",
                        time.monotonic() - t0,
                        limit,
                        message_type,
                        ", ".join(late),
                    )

        threading.Thread(target=waiting, name="fedenc-wait-log", daemon=True).start()
        try:
            yield from self._replies(replies, sent, done, node_ids, message_type, timeout)
        finally:
            watch.set()

    def _replies(
        self,
        replies: Iterable[Message],
        sent: Mapping[str, int],
        done: set[int],
        node_ids: Sequence[int],
        message_type: str,
        timeout: float | None,
    ) -> Iterator[tuple[int, Message | str]]:
        for reply in replies:
            meta = reply.metadata
            node = sent.get(meta.reply_to_message_id)
            # Flower's SuperLink answers for a node it cannot reach (NODE_UNAVAILABLE, an
            # expired message) with an error reply of its own: that one comes from the link.
            by_link = meta.src_node_id == SUPERLINK_NODE_ID and reply.has_error()
            if node is None or (node != meta.src_node_id and not by_link):
                log.warning(
                    "ignoring a %s reply from node %s to an unknown message %r",
                    message_type,
                    meta.src_node_id,
                    meta.reply_to_message_id,
                )
                continue
            if node in done:
                log.warning("ignoring a second %s reply from %s", message_type, self.label(node))
                continue
            done.add(node)
            if reply.has_error():
                yield node, _reason(reply)
            elif meta.message_type != message_type:  # e.g. an evaluation sent as an update
                yield node, f"a {meta.message_type!r} reply to a {message_type!r} message"
            else:
                self.bytes_received += records.record_bytes(reply.content)
                yield node, reply
        for node in node_ids:
            if node not in done:
                yield (
                    node,
                    (
                        f"no {message_type} reply within {timeout:g} s"
                        if timeout is not None
                        else f"no {message_type} reply"
                    ),
                )

    def __call__(
        self,
        content: RecordDict,
        node_ids: Sequence[int],
        message_type: str,
        group_id: str,
        timeout: float | None,
    ) -> tuple[dict[int, Message], dict[int, str]]:
        """``(replies with content by node, reasons of the nodes without one)``."""
        answered: dict[int, Message] = {}
        failed: dict[int, str] = {}
        for node, outcome in self.stream(content, node_ids, message_type, group_id, timeout):
            if isinstance(outcome, str):
                failed[node] = outcome
            else:
                answered[node] = outcome
        return answered, failed


# -- the job -------------------------------------------------------------------------------------


class _Job:
    def __init__(self, grid: Grid, config: MasterConfig) -> None:
        self.grid = grid
        self.config = config
        # Each round's fused target is a fresh model-sized allocation: keep freed ones in the
        # heap (first-touch page faults would otherwise halve the fusion's speed).
        tune_allocator()
        self.children: dict[int, ChildInfo] = {}
        self.finished = False  # the children were told the job ended
        self.exchange = _Exchange(grid, self.children)
        # Seeded as the children seed their models (their heads start from the same point).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_encoder(config.encoder, config.num_items, **config.encoder_options)
            self.model.reset_parameters()
        state = self.model.state_dict()
        self.target: Parameters = {
            name: state[name].detach().clone() for name in shared_names(self.model, config.share)
        }
        self.instruction = fpb.TrainingInstruction(
            job_id=config.job_id,
            encoder=records.encoder_spec(config.encoder, self.model.config, self.target),
            training=records.training_config_to_proto(_with_seed(config.train, config.seed)),
            round_budget=config.rounds,
            round=1,
        )
        self.rule = build_fusion_rule(config.rule, **config.rule_options)
        self.stop = config.stop_rule()
        self.held_peak = 0
        self.child_seconds: dict[str, float] = {}
        self.child_counters: dict[str, float] = {}
        encoder_only = set(self.model.shared_parameter_names())  # all but the item table
        self.carried: ArrayRecord | None = None  # carry_optimizer: the last child's moments
        self.row_names = (
            [name for name in self.target if name not in encoder_only]
            if config.row_weighting
            else []
        )
        self.balancer = WorkBalancer(config.work_deadline) if config.balance_work else None
        self.table: FederationTable | None = None
        self.row_fusion: RowFusion | None = None
        if config.ps == "federation":
            self.table = FederationTable(
                config.job_id,
                config.num_items + 1,
                self.model.config.hidden,
                config.seed,
                config.ps_shards,
                config.ps_addresses,
            )
            self.row_fusion = RowFusion(config.rule)
            if self.table.registered:
                # An in-process table starts where share = "all" starts: the initial encoder's
                # item table (shards named in ps-addresses keep what they hold).
                self.table.load(self.model.embedding.weight.detach())
        self.rows_pulled = 0  # rows the children read from the federation PS this round
        self.rows_bytes = 0  # bytes of the sparse rows in this round's accepted replies
        self._capped: set[tuple[int, str]] = set()  # (node, split) told its metrics are capped
        # publish = "best": the best round so far ({"round", "value", "target"}), else empty
        self.best: dict[str, Any] = {}
        self._joined: dict[str, int] = {}  # child name -> the round it first joined

    @property
    def select_metric(self) -> str:
        """The metric that publish = "best" maximises."""
        return f"{self.config.eval_split}_recall@20"

    def keep_if_best(self, result: RoundResult) -> None:
        """With publish = "best": keep this round's target when its metric beats the best's
        (ties keep the earlier round)."""
        value = result.metrics.get(self.select_metric)
        if self.config.publish != "best" or value is None or result.skipped is not None:
            return
        if not self.best or value > self.best["value"]:
            target = {n: t.detach().clone() for n, t in self.target.items()}
            self.best = {"round": result.round, "value": float(value), "target": target}

    def take_best(self, last_round: int) -> int:
        """Make the best round's target the one to publish; returns that round."""
        if self.config.publish != "best" or not self.best or self.best["round"] == last_round:
            return last_round
        log.info(
            "job %s: publishing round %d's target, the best by %s (%.2f), not round %d's",
            self.config.job_id, self.best["round"], self.select_metric, self.best["value"],
            last_round,
        )  # fmt: skip
        self.target = {n: t.clone() for n, t in self.best["target"].items()}
        return int(self.best["round"])

    @property
    def row_bytes(self) -> int:
        """Bytes of one pulled row (an int64 key and float32 values)."""
        return 8 + 4 * self.model.config.hidden

    # -- checkpoint ------------------------------------------------------------------------------

    def restore(self, state: MasterState) -> list[RoundResult]:
        """Continue from ``state``: target, rule and stop-rule state, RNG; returns the reports
        of the rounds done."""
        names = list(self.target)
        if list(state.target) != names or any(
            state.target[n].shape != self.target[n].shape
            or state.target[n].dtype != self.target[n].dtype
            for n in names
        ):
            raise MasterStateError(
                f"the checkpoint's target does not match encoder {self.config.encoder!r} "
                "(other tensors, shapes or dtypes)"
            )
        self.target = {n: state.target[n].clone() for n in names}
        self.rule.load_state_dict(state.rule)
        self.stop.load_state_dict(state.stop)
        self.carried = records.params_to_record(state.carried) if state.carried else None
        if self.table is not None and self.table.registered:
            rows = state.ps_rows.get("rows")
            if rows is None or tuple(rows.shape) != (self.table.num_keys, self.table.width):
                raise MasterStateError(
                    "the checkpoint holds no federation table of "
                    f"{self.table.num_keys} x {self.table.width} rows (placement b)"
                )
            self.table.load(rows)
        restore_rng(state.rng)
        self.best = dict(state.best)
        # Children confirm again after a resume: each keeps the round it first joined.
        self._joined = {
            str(c["name"]): int(c.get("joined_round", 1)) for c in state.children if "name" in c
        }
        return [RoundResult.from_dict(r) for r in state.rounds]

    def save(
        self, round_: int, results: Sequence[RoundResult], stop_reason: str, run_id: int
    ) -> None:
        """Write the job's checkpoint for a completed round (atomically)."""
        if self.config.state_dir is None:
            return
        state = MasterState(
            job_id=self.config.job_id,
            run_id=run_id,
            round=round_,
            config=config_fingerprint(self.config),
            target=self.target,
            rule=self.rule.state_dict(),
            stop=self.stop.state_dict(),
            stop_reason=stop_reason,
            rounds=[r.to_dict() for r in results],
            children=[asdict(c) for c in self.children.values()],
            rng=capture_rng(),
            # An in-process federation table dies with this process: keep it for --resume.
            ps_rows=(
                {"rows": self.table.rows()}
                if self.table is not None and self.table.registered
                else {}
            ),
            carried=(
                {}
                if self.carried is None
                else {n: t.clone() for n, t in records.record_to_params(self.carried, "").items()}
            ),
            best=self.best,
        )
        write_master_state(self.config.state_dir, state)

    # -- 1 + 2: instruction and confirmations ----------------------------------------------------

    def wait_for_nodes(self) -> list[int]:
        """The online nodes, once ``expect_children`` (at least ``min_children``) are there or
        ``wait_timeout`` has passed: some runtimes register their nodes after the ServerApp
        starts."""
        wanted = max(self.config.expect_children, self.config.min_children)
        timeout = self.config.wait_timeout
        t0 = time.monotonic()
        next_log = t0  # at once, then every WAIT_LOG_S: a silent wait looks like a hang
        while True:
            nodes = sorted(self.grid.get_node_ids())
            now = time.monotonic()
            if len(nodes) >= wanted:
                return nodes
            if now - t0 >= timeout:
                if nodes:
                    log.info("job %s: %d of %d expected children connected after %g s: "
                             "starting with them", self.config.job_id, len(nodes), wanted,
                             timeout)  # fmt: skip
                return nodes
            if now >= next_log:
                log.info("job %s: %d of %d children connected; waiting up to %.0f s more",
                         self.config.job_id, len(nodes), wanted, timeout - (now - t0))  # fmt: skip
                next_log = now + WAIT_LOG_S
            time.sleep(0.2)

    def query_new(self, round_: int) -> None:
        """Send the instruction to every online node not asked yet and record their answers."""
        new = [nid for nid in sorted(self.grid.get_node_ids()) if nid not in self.children]
        if not new:
            return
        self.instruction.round = round_
        answered, failed = self.exchange(
            records.query_content(self.instruction),
            new,
            "query",
            f"{self.config.job_id}:query:{round_}",
            self.config.query_timeout,
        )
        names = {info.name for info in self.children.values()}
        refused: dict[int, str] = {}  # answered, and refused by the master: told why below
        for nid in new:
            if nid in failed:
                info = ChildInfo(nid, self._node_label(nid), False, reason=failed[nid])
            else:
                try:
                    confirmation, name = records.read_confirmation(answered[nid].content)
                except ValueError as err:
                    reason = f"bad confirmation: {err}"
                    info = ChildInfo(nid, self._node_label(nid), False, reason=reason)
                    refused[nid] = reason
                else:
                    info = _child_info(
                        nid,
                        self._child_name(nid, name),
                        confirmation,
                        self.config.job_id,
                        self.config.min_samples,
                    )
                    info.declined = not info.accepted
                    if confirmation.accepted and not info.accepted:  # the master's refusal
                        refused[nid] = info.reason
            info.joined_round = self._joined.get(info.name, round_)
            if info.name in names:  # names label reports; keep them unique
                online = set(self.grid.get_node_ids())
                gone = [
                    n for n, c in self.children.items() if c.name == info.name and n not in online
                ]
                if gone:  # the same child reconnected (a new node id): it keeps its name
                    for n in gone:
                        del self.children[n]
                else:  # two live nodes claim one name (runtimes without identities)
                    info.name = f"{info.name}#{nid}"
            names.add(info.name)
            self._joined.setdefault(info.name, info.joined_round)
            self.children[nid] = info
            if info.accepted:
                log.info("%s confirmed (%d samples)", info.name, info.num_samples)
            else:
                log.warning(
                    "%s is left out of job %s: %s", info.name, self.config.job_id, info.reason
                )
        self.tell_left_out(refused, round_, drop=True)

    def await_confirmations(self, round_: int) -> list[int]:
        """The confirmed children; with fewer than ``min_children`` because some were lost
        before answering (not because they declined), wait up to ``wait_timeout`` for children
        to (re)connect and confirm, as a round does for children that left."""

        def short() -> str | None:
            if len(self.confirmed()) >= self.config.min_children:
                return None
            lost = [c for c in self.children.values() if not c.accepted and not c.declined]
            if not lost:  # every one answered: declines are not waited for
                return None
            # Lost, or its app failed on the query (an operator may restart it: it reconnects).
            missing = ", ".join(f"{c.name} ({clip(c.reason, 160)})" for c in lost)
            return (
                f"{len(self.confirmed())} of {self.config.min_children} child(ren) confirmed "
                f"(no confirmation from: {missing})"
            )

        self._wait_for_children(round_, short)
        return self.confirmed()

    def _wait_for_children(self, round_: int, short: Callable[[], str | None]) -> str | None:
        """Up to ``wait_timeout``, asking the children that (re)connect, until ``short()`` (why
        the job lacks children) is None; the first reason is logged, the last one returned
        (None: enough children)."""
        deadline = time.monotonic() + self.config.wait_timeout
        why = short()
        if why is not None and time.monotonic() < deadline:
            log.warning("%s: waiting up to %.0f s", why, self.config.wait_timeout)
        while why is not None and time.monotonic() < deadline:
            time.sleep(0.5)
            self.query_new(round_)
            why = short()
        return why

    def _transport_name(self, nid: int) -> str | None:
        """The name the runtime knows node ``nid`` by (the gRPC runtime's Hello name), if any."""
        name = getattr(self.grid, "node_name", lambda _: None)(nid)
        return str(name) if name else None

    def _child_name(self, nid: int, claimed: str) -> str:
        """The name a child is reported under: its transport's (the gRPC runtime's Hello name,
        which mutual TLS binds to the certificate), never one the child claims in a message when
        there is one; else the claimed name, if printable, else its node id."""
        known = self._transport_name(nid)
        if known:
            if claimed and claimed != known:
                log.warning("%s claims the name %r in its confirmation: reported as %s",
                            known, clip(claimed, 80), known)  # fmt: skip
            return known
        if claimed and len(claimed) <= 256 and claimed.isprintable():
            return claimed
        if claimed:  # a newline would forge log lines; megabytes would fill the reports
            log.warning("node %d claims an unprintable or overlong name: reported as node-%d",
                        nid, nid)  # fmt: skip
        return f"node-{nid}"

    def _node_label(self, nid: int) -> str:
        """A child that gave no readable name in its confirmation: its transport's name (the
        gRPC runtime's Hello name), else its node id."""
        return self._transport_name(nid) or f"node-{nid}"

    def confirmed(self) -> list[int]:
        """Confirmed children, ordered by name (the order replies are fused in)."""
        nodes = [nid for nid, info in self.children.items() if info.accepted]
        return sorted(nodes, key=lambda nid: (self.children[nid].name, nid))

    # -- 3 + 4: rounds ---------------------------------------------------------------------------

    def _split_confirmed(self) -> tuple[list[int], list[int]]:
        """The confirmed children still connected, and those gone (both in confirmed order)."""
        online = set(self.grid.get_node_ids())
        confirmed = self.confirmed()
        return [n for n in confirmed if n in online], [n for n in confirmed if n not in online]

    def connected(self, round_: int) -> list[int]:
        """The confirmed children still connected (in :meth:`confirmed` order). With fewer
        than ``min_children``, wait up to ``wait_timeout`` for children to (re)connect, asking
        the new ones (a restarted child comes back as a new node); still too few:
        :class:`NotEnoughChildrenError`. The job then stops after its last completed round,
        which ``--resume`` continues from, instead of spending its round budget on rounds that
        nobody trains."""

        ready: list[int] = []  # as short() last saw them

        def short() -> str | None:
            now, gone = self._split_confirmed()
            ready[:] = now
            if len(ready) >= self.config.min_children:
                return None
            names = ", ".join(self.children[nid].name for nid in gone) or "none"
            return (
                f"round {round_}: {len(ready)} confirmed child(ren) connected, the job needs "
                f"{self.config.min_children} (gone: {names})"
            )

        why = self._wait_for_children(round_, short)
        if why is not None:
            raise NotEnoughChildrenError(
                f"{why}; none came back within {self.config.wait_timeout:.0f} s"
            )
        return ready

    def sample(self, round_: int) -> list[int]:
        candidates = self.connected(round_)
        if self.config.fraction >= 1.0:
            return candidates
        k = max(self.config.min_children, math.ceil(self.config.fraction * len(candidates)))
        k = min(k, len(candidates))
        if self.config.sampling == "cyclic":
            start = (round_ - 1) * k % len(candidates)
            picked = {(start + i) % len(candidates) for i in range(k)}
            return [candidates[i] for i in sorted(picked)]
        rng = np.random.default_rng([self.config.seed, round_])
        chosen = np.sort(rng.choice(len(candidates), size=k, replace=False))
        return [candidates[int(i)] for i in chosen]

    def train_round(self, round_: int) -> RoundResult:
        t0 = time.perf_counter()
        sent0, received0 = self.exchange.bytes_sent, self.exchange.bytes_received
        if round_ > 1:
            self.query_new(round_)
        sampled = self.sample(round_)
        if self.config.carry_optimizer and len(sampled) != 1:
            raise ValueError(
                f"carry_optimizer hands the moments from one child to the next, but round "
                f"{round_} samples {len(sampled)} children: set fraction to 1/K and "
                "min_children to 1"
            )
        label = self.exchange.label
        arrays = records.params_to_record(self.target)
        self.rule.begin(round_, self.target, row_weighted=self.row_names)
        if self.row_fusion is not None:
            self.row_fusion.begin()
        self.rows_pulled = self.rows_bytes = 0
        excluded: dict[str, str] = {}
        losses: list[tuple[float, float]] = []
        # "child" order folds a reply as soon as every child before it (in child order) has been
        # folded or ruled out, holding only the replies that overtook a slower child: the sums
        # are then the same bit for bit whatever the arrival order. "arrival" folds each reply
        # the moment it comes (memory: one model, always).
        held: dict[int, Message | str] = {}
        next_rank = 0
        self.held_peak = 0  # most replies held at once (the reorder buffer's cost)
        self.child_seconds = {}  # each accepted child's local training time
        self.rejected: dict[int, str] = {}  # children whose reply came and was refused
        self.child_counters = {}  # elastic_* / ps_* counters of the accepted children, summed

        def round_content(work: int | None = None) -> RecordDict:
            return records.round_content(
                arrays,
                self.instruction,
                round_,
                work=work,
                carry=self.config.carry_optimizer,
                optimizer=self.carried,
            )

        content = round_content()
        per_node: dict[int, RecordDict] = {}
        assigned: dict[int, int] = {}
        if self.balancer is not None:
            uniform = {nid: self._uniform_work(nid) for nid in sampled}
            limit = {nid: self.children[nid].num_samples for nid in sampled}
            assigned = self.balancer.assign(uniform, limit)
            for nid, work in assigned.items():
                per_node[nid] = round_content(work)
        stream = self.exchange.stream(
            content, sampled, "train", str(round_), self.config.round_timeout, per_node
        )
        # Closed however the loop ends: that also stops the stream's wait-log thread.
        with contextlib.closing(stream):
            for nid, outcome in stream:
                if self.config.fold_order == "arrival":
                    self._fold(round_, nid, outcome, excluded, losses)
                    continue
                held[nid] = outcome
                while next_rank < len(sampled) and sampled[next_rank] in held:
                    node = sampled[next_rank]
                    self._fold(round_, node, held.pop(node), excluded, losses)
                    next_rank += 1
                waiting = sum(isinstance(o, Message) for o in held.values())
                self.held_peak = max(self.held_peak, waiting)
        train_bytes = (
            self.exchange.bytes_sent
            - sent0
            + self.exchange.bytes_received
            - received0
            + self.rows_pulled * self.row_bytes
        )
        table_bytes = self.rows_bytes + self.rows_pulled * self.row_bytes
        self.tell_left_out(self.rejected, round_)
        participants = self.rule.participants
        samples = self.rule.num_samples
        total = sum(samples.values())
        needed = max(self.config.min_children, self.rule.min_updates)
        skipped: str | None = None
        change: float | None = None
        if len(participants) < needed:
            skipped = (
                f"{len(participants)} accepted update(s), the round needs {needed}: "
                "target unchanged"
            )
            log.warning("round %d: %s", round_, skipped)
        else:
            try:
                new = self.rule.result()
            except EmptyRoundError as err:  # defensive: participants says otherwise
                skipped = str(err)
            else:
                change = relative_change(self.target, new)
                self.target = new
        # The weights the rule gave the children (none for a skipped round, nor for median and
        # trimmed mean, which have no per-child weights), and what else it decided.
        fused = skipped is None
        weights = self.rule.child_weights() if fused else None
        metrics: dict[str, float] = {}
        if self.row_fusion is not None and self.table is not None and fused:
            # The table changes only here, between rounds: every child of the round read it
            # as the previous round left it.
            keys, deltas = self.row_fusion.result()
            self.table.apply(keys, deltas)
            metrics["ps_rows_received"] = float(self.row_fusion.rows_received)
            metrics["ps_rows_fused"] = float(keys.size)
        for key, value in self.child_counters.items():  # the master's own figures win
            metrics.setdefault(key, value)
        loss = _weighted_mean(losses)
        if loss is not None:
            metrics["train_loss"] = loss
        per_child: dict[str, dict[str, float]] = {}
        if self._evaluate_now(round_):
            eval_metrics, per_child = self.evaluate(round_, self.config.eval_split)
            metrics.update(eval_metrics)
        split = self.config.eval_split
        return RoundResult(
            round=round_,
            sampled=[label(n) for n in sampled],
            participants=participants,
            excluded=excluded,
            num_samples=total,
            weights=weights or {},
            fusion=self.rule.details() if fused else {},
            loss=loss,
            recall_at_20=metrics.get(f"{split}_recall@20"),
            mrr_at_20=metrics.get(f"{split}_mrr@20"),
            metrics=metrics,
            evaluated=list(per_child),
            child_metrics=per_child,
            bytes_sent=self.exchange.bytes_sent - sent0,
            bytes_received=self.exchange.bytes_received - received0,
            seconds=time.perf_counter() - t0,
            param_change=change,
            skipped=skipped,
            held_replies=self.held_peak,
            work={label(nid): int(w) for nid, w in assigned.items()},
            child_seconds_max=max(self.child_seconds.values()) if self.child_seconds else None,
            child_seconds_sum=sum(self.child_seconds.values()) if self.child_seconds else None,
            child_seconds=dict(self.child_seconds),
            train_bytes=train_bytes,
            table_bytes=table_bytes,
            ps_bytes_pulled=self.rows_pulled * self.row_bytes,
        )

    def _fold(
        self,
        round_: int,
        nid: int,
        outcome: Message | str,
        excluded: dict[str, str],
        losses: list[tuple[float, float]],
    ) -> None:
        """Validate one child's train reply and fold it into the rule (or record why not)."""
        name = self.exchange.label(nid)
        if isinstance(outcome, str):
            excluded[name] = clip(outcome)
            log.warning("round %d: %s left out: %s", round_, name, excluded[name])
            return
        content = outcome.content
        try:
            arrays_in = content.array_records.get(records.ARRAYS_KEY)
            if arrays_in is None:
                raise BadUpdateError(name, "reply carries no parameters ('arrays')")
            params = records.record_to_params(arrays_in, name)
            n = records.read_num_examples(content, name)
            confirmed = self.children[nid].num_samples
            if n > confirmed:  # the count weighs its update: it cannot grow after confirming
                raise BadUpdateError(
                    name, f"reply counts {n} examples, but the child confirmed {confirmed}"
                )
            rows = None
            weights_in = content.array_records.get(records.ROW_WEIGHTS_KEY)
            # A child sends row weights whenever it shares the table; they only mean something
            # when this job fuses rows one by one (row_weighting on, rows named).
            row_weights = (
                records.record_to_params(weights_in, name)
                if weights_in is not None and self.row_names
                else None
            )
            if self.row_fusion is not None and self.table is not None:
                # Checked before the dense part is folded: a bad half rejects the whole reply.
                record = content.array_records.get(records.ROWS_KEY)
                if record is None:
                    raise BadUpdateError(name, "reply carries no sparse item rows ('rows')")
                rows = rows_from_record(record, name, self.table.num_keys, self.table.width)
            moments = None
            if self.config.carry_optimizer:
                moments = content.array_records.get(records.OPTIMIZER_KEY)
                if moments is None:
                    raise BadUpdateError(name, "reply carries no optimizer moments ('optimizer')")
                try:
                    check_moments(
                        self.target, list(self.target), records.record_to_params(moments, name)
                    )
                except OptimizerStateError as err:
                    raise BadUpdateError(name, str(err)) from None
            self.rule.add(name, params, n, row_weights)
            if moments is not None:
                self.carried = moments  # handed to the next round's child
            if rows is not None and self.row_fusion is not None:
                self.row_fusion.add(name, rows)
                self.rows_bytes += rows.wire_bytes()
        except BadUpdateError as err:  # (its text may quote what the child sent: clipped)
            log.warning("round %d: %s", round_, clip(str(err)))
            excluded[name] = clip(err.reason)
            self.rejected[nid] = excluded[name]
            return
        metrics = records.read_metrics(content)
        self.rows_pulled += _row_count(metrics.get(records.PS_ROWS_PULLED))
        loss = metrics.get("train_loss")
        if loss is not None:
            losses.append((loss, float(n)))
        for key, value in metrics.items():  # the site's own counters, totalled over children
            if key.startswith(CHILD_COUNTER_PREFIXES) and math.isfinite(value):
                self.child_counters[key] = self.child_counters.get(key, 0.0) + value
        seconds = metrics.get("seconds")
        if seconds is not None and math.isfinite(seconds) and seconds >= 0:
            self.child_seconds[name] = seconds
        if self.balancer is not None:
            self.balancer.observe(nid, metrics.get("seconds"), metrics.get("trained_examples"))

    def _uniform_work(self, nid: int) -> int:
        """Examples per epoch a child trains without balancing."""
        n = self.children[nid].num_samples
        cap = self.config.train.max_examples_per_epoch
        return min(n, cap) if cap else n

    def _evaluate_now(self, round_: int) -> bool:
        every = self.config.evaluate_every
        if every and round_ % every == 0:
            return True
        return bool(self.config.rounds) and round_ == self.config.rounds

    def tell_left_out(self, reasons: Mapping[int, str], round_: int, drop: bool = False) -> None:
        """Tell each child whose answer the master refused why (a ``query.notice``): without
        it, a child saw nothing but silence, and its operator needed the master's logs. Only
        children that answered (their worker is free), within :data:`NOTICE_TIMEOUT_S`.
        ``drop``: they are out of the whole job (refused at confirmation) and drop its state,
        which the end-of-job message, sent to confirmed children only, would never release."""
        if not reasons:
            return
        per_node = {
            nid: records.notice_content(self.config.job_id, round_, reason, drop)
            for nid, reason in reasons.items()
        }
        stream = self.exchange.stream(
            next(iter(per_node.values())),
            list(per_node),
            records.NOTICE_ACTION,
            f"{self.config.job_id}:notice:{round_}",
            NOTICE_TIMEOUT_S,
            per_node,
        )
        with contextlib.closing(stream):
            for nid, outcome in stream:
                if isinstance(outcome, str):  # e.g. a client that does not know notices
                    log.debug("%s was not told why it was left out: %s",
                              self.exchange.label(nid), outcome)  # fmt: skip

    def _evaluation_timeout(self) -> float:
        """How long evaluation replies are awaited: the round timeout, or without one
        max(:data:`EVAL_WAIT_FLOOR_S`, 4 x the round's slowest training). A child that kept
        its stream alive but never answered held the job (and its checkpoint) forever."""
        if self.config.round_timeout is not None:
            return self.config.round_timeout
        slowest = max(self.child_seconds.values(), default=0.0)
        return max(EVAL_WAIT_FLOOR_S, 4.0 * slowest)

    def evaluate(
        self, round_: int, split: str
    ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Example-weighted mean of the children's metrics of the target on ``split``, over the
        confirmed children still connected (one that left is not asked, round after round),
        and each evaluated child's own metrics (``{split}_…`` keys, with its example count):
        client variance and fairness are read from these."""
        nodes, _ = self._split_confirmed()
        if not nodes:
            return {}, {}
        arrays = records.params_to_record(self.target)
        answered, failed = self.exchange(
            records.round_content(arrays, self.instruction, round_, split=split),
            nodes,
            "evaluate",
            f"{round_}:{split}",
            self._evaluation_timeout(),
        )
        for nid, reason in failed.items():
            log.warning("round %d: %s not evaluated: %s", round_, self.exchange.label(nid), reason)
        per_metric: dict[str, list[tuple[float, float]]] = {}
        examples = 0
        per_child: dict[str, dict[str, float]] = {}
        for nid in nodes:
            if nid not in answered:
                continue
            values = records.read_metrics(answered[nid].content)
            self.rows_pulled += _row_count(values.pop(records.PS_ROWS_PULLED, None))
            n = values.pop(records.NUM_EXAMPLES, 0.0)
            # Only the ranking metrics are averaged: others are the child's own (a value of
            # 1e300 under a name no check knows made the average inf, and results.json invalid).
            values = {k: v for k, v in values.items() if _RANKING_METRIC.fullmatch(k)}
            if n == 0 and self.children[nid].held_out.get(split, 0) == 0:
                # A child with no session of this split (a skewed partition): not a fault.
                log.debug(
                    "round %d: %s has no %s examples", round_, self.exchange.label(nid), split
                )
                continue
            why = _bad_evaluation(n, values) or _outweighs(self.children[nid], split, n)
            if why is not None:
                log.warning(
                    "round %d: %s's %s metrics left out: %s",
                    round_,
                    self.exchange.label(nid),
                    split,
                    why,
                )
                continue
            weight = n
            if n > self.children[nid].num_samples:
                # More held-out examples than training samples, as declared (a small child):
                # its metrics count, weighing what its training samples weigh in the fusion.
                weight = float(self.children[nid].num_samples)
                if (nid, split) not in self._capped:
                    self._capped.add((nid, split))
                    log.info(
                        "%s's %s metrics weigh %d, its training samples, not its %g examples",
                        self.exchange.label(nid), split, self.children[nid].num_samples, n,
                    )  # fmt: skip
            per_child[self.exchange.label(nid)] = {
                **{f"{split}_{key}": value for key, value in values.items()},
                f"{split}_examples": float(n),
            }
            examples += int(weight)
            for key, value in values.items():
                per_metric.setdefault(key, []).append((value, weight))
        out: dict[str, float] = {}
        for key, pairs in per_metric.items():
            mean = _weighted_mean(pairs)
            if mean is not None:
                out[f"{split}_{key}"] = mean
        if per_child:
            out[f"{split}_examples"] = float(examples)
        return out, per_child

    def release(self) -> None:
        """:meth:`finish` for a job that failed: best effort, logged, never raising (the job's
        own error is the one to report)."""
        if self.finished:
            return
        try:
            self.finish()
        except Exception as err:
            log.info("job %s: could not tell the children it ended: %s", self.config.job_id, err)

    def finish(self) -> None:
        """Tell the connected children the job is over (they drop its state); at most
        :data:`FINISH_TIMEOUT` seconds for their acknowledgements."""
        self.finished = True
        nodes, _ = self._split_confirmed()
        if not nodes:
            return
        timeout = min(self.config.round_timeout or FINISH_TIMEOUT, FINISH_TIMEOUT)
        _, failed = self.exchange(
            records.finish_content(self.config.job_id),
            nodes,
            records.FINISH_ACTION,
            f"{self.config.job_id}:finish",
            timeout,
        )
        for nid, reason in failed.items():
            log.info(
                "%s did not acknowledge the end of the job: %s", self.exchange.label(nid), reason
            )


def round_line(result: RoundResult) -> str:
    """One log line for a finished round."""
    if result.skipped is not None:
        return f"round {result.round}: skipped ({result.skipped})"
    parts = [
        f"round {result.round}: {len(result.participants)}/{len(result.sampled)} child(ren)",
        f"{result.num_samples} samples",
    ]
    if result.loss is not None:
        parts.append(f"train loss {result.loss:.4f}")
    if result.recall_at_20 is not None and result.mrr_at_20 is not None:
        parts.append(f"Recall@20 {result.recall_at_20:.2f} MRR@20 {result.mrr_at_20:.2f}")
    if result.excluded:
        parts.append(f"left out: {', '.join(sorted(result.excluded))}")
    parts.append(f"{result.seconds:.1f} s")
    if len(result.child_seconds) > 1:  # who the round waited for
        slowest = max(result.child_seconds, key=result.child_seconds.__getitem__)
        parts.append(f"slowest {slowest} ({result.child_seconds[slowest]:.1f} s)")
    if result.stop_reason:
        parts.append(f"stop: {result.stop_reason}")
    return ", ".join(parts)


def _bad_evaluation(n: float, values: Mapping[str, float]) -> str | None:
    """Why a child's evaluation reply cannot be averaged in (None: it can). Ranking metrics are
    percentages: a value outside [0, 100] is a broken or hostile child, not a result."""
    if not (n > 0 and math.isfinite(n)):
        return f"{records.NUM_EXAMPLES} is {n!r}, not a positive count"
    for key, value in values.items():
        if not math.isfinite(value):
            return f"{key} is {value!r}"
        if key.startswith(("recall@", "mrr@")) and not 0 <= value <= 100:
            return f"{key} = {value!r} is outside [0, 100]"
    return None


_RANKING_METRIC = re.compile(r"(recall|mrr)@\d+")


def _outweighs(info: ChildInfo, split: str, n: float) -> str | None:
    """Why an evaluation reply is left out (None: it is not): more examples of ``split`` than
    it declared in its confirmation, or, without a declaration, than its training samples. A
    reply within its declaration still weighs at most its training samples (the caller caps
    it): a declaration is the child's own word, and its training count is the weight FedAvg
    already gives it. Unbounded, one child claiming 10^12 examples set the federation's
    published metrics alone."""
    declared = info.held_out.get(split)
    cap, what = (
        (declared, f"the {split} examples")
        if declared
        else (info.num_samples, "the training samples")
    )
    if n > cap:
        return f"{records.NUM_EXAMPLES} = {n:g} exceeds {what} it confirmed ({cap})"
    return None


def shared_names(model: SessionEncoder, share: str) -> list[str]:
    """The ordered names of the tensors a job federates (see ``MasterConfig.share``); the
    instruction lists them, and the children exchange exactly those."""
    if share == "all":
        return [name for name, _ in model.named_parameters()]
    return model.shared_parameter_names()


def _with_seed(config: TrainConfig, seed: int) -> TrainConfig:
    return TrainConfig.from_dict({**config.to_dict(), "seed": seed})


def _child_info(
    nid: int, name: str, confirmation: fpb.Confirmation, job_id: str, min_samples: int = 1
) -> ChildInfo:
    name = name or f"node-{nid}"
    if confirmation.job_id != job_id:
        return ChildInfo(nid, name, False, reason=f"confirmation for job {confirmation.job_id!r}")
    if not confirmation.accepted:
        return ChildInfo(nid, name, False, reason=confirmation.decline_reason or "declined")
    if confirmation.num_samples < 1:
        return ChildInfo(nid, name, False, reason="confirmed with no samples")
    summary = {
        f.name: getattr(confirmation.summary, f.name)
        for f in confirmation.summary.DESCRIPTOR.fields
    }
    held_out = {
        split: int(n)
        for split, n in (
            ("valid", confirmation.num_valid_examples),
            ("test", confirmation.num_test_examples),
        )
        if n
    }
    info = ChildInfo(
        nid,
        name,
        True,
        num_samples=int(confirmation.num_samples),
        summary=summary,
        held_out=held_out,
    )
    if info.num_samples < min_samples:
        info.accepted = False
        info.reason = (
            f"confirmed {info.num_samples} training samples; the job needs at least "
            f"{min_samples} (min-samples)"
        )
    return info


def run_master(
    grid: Grid, config: MasterConfig, on_round: RoundListener | None = None
) -> MasterResult:
    """Run one job on ``grid`` (see the module docstring); returns the target and the reports.

    With ``config.state_dir`` a checkpoint is written after each completed round; with
    ``config.resume`` the job continues from it (children confirm again, then the next round
    runs as it would have without the interruption)."""
    t0 = time.perf_counter()
    saved = _saved_state(config) if config.resume else None
    job = _Job(grid, config)
    job.stop.start()
    results: list[RoundResult] = []  # (before the try: its except reads it)
    try:
        stop_reason = ""
        round_ = 0
        if saved is not None:
            results = job.restore(saved)
            round_, stop_reason = saved.round, saved.stop_reason
            log.info("job %s: resumed after round %d", config.job_id, round_)
        elif config.state_dir is not None and state_path(config.state_dir).exists():
            log.warning(
                "%s holds an earlier job's checkpoint: this new job replaces it after its first "
                "round (resume that job instead with --resume)",
                config.state_dir,
            )
        run = getattr(grid, "run", None)
        run_id = int(run.run_id) if run is not None else 0
        log.info(
            "job %s: %s, %d shared tensors, rule %s",
            config.job_id,
            config.encoder,
            len(job.target),
            config.rule,
        )
        nodes = job.wait_for_nodes()
        log.info("job %s: %d node(s) online", config.job_id, len(nodes))
        job.query_new(round_ + 1)
        confirmed = job.await_confirmations(round_ + 1)
        if len(confirmed) < config.min_children:
            job.finish()
            declined = [f"{c.name} ({c.reason})" for c in job.children.values() if not c.accepted]
            why = (
                f"left out: {'; '.join(declined)}"
                if declined
                else f"no child connected within wait-timeout ({config.wait_timeout:g} s, --wait)"
            )
            raise NotEnoughChildrenError(
                f"{len(confirmed)} child(ren) confirmed, job {config.job_id} needs "
                f"{config.min_children}; {why}"
            )
        listeners = [cb for cb in (on_round, round_listener.get()) if cb is not None]
        while not stop_reason:
            round_ += 1
            result = job.train_round(round_)
            report = RoundReport(
                round=round_,
                participants=result.participants,
                num_samples=result.num_samples,
                metrics=result.metrics,
                param_change=result.param_change,
                seconds=result.seconds,
            )
            stop_reason = job.stop.update(report) or ""
            result.stop_reason = stop_reason or None
            results.append(result)
            job.keep_if_best(result)
            # The round is complete (fused, evaluated, the stop rule updated): a master killed
            # from here on resumes after it.
            job.save(round_, results, stop_reason, run_id)
            if not listeners:  # no host shows the rounds (Flower's runtimes): the log does
                log.info("%s", round_line(result))
            for callback in listeners:
                callback(result)
        if results and all(r.skipped is not None for r in results):
            # The target is still the initial encoder: publishing it as the job's result would
            # pass an untrained model off as a trained one.
            raise NotEnoughChildrenError(
                f"no round of job {config.job_id} trained: all {len(results)} were skipped (the "
                f"last: {results[-1].skipped}; excluded: {results[-1].excluded}); nothing is "
                "published"
            )
        published = job.take_best(round_)
        final: dict[str, float] = {}
        final_by_child: dict[str, dict[str, float]] = {}
        if config.final_test:
            final, final_by_child = job.evaluate(round_, "test")
        table_rows = job.table.rows() if job.table is not None else None
        # A job that ran to its end releases the children's state; a failed one only when
        # nothing will resume it (below): else `--resume` continues it bit for bit.
        job.finish()
    except Exception:  # (not on Ctrl-C: the user wants the process back now)
        if config.state_dir is None or not resumable.get() or not results:
            # Nothing will resume it (no checkpoint, a Control job, no round completed): the
            # children need not keep its state.
            job.release()
        raise
    finally:
        # The in-process federation table is registered under the job id: a job that failed
        # early must not hold it (nor its memory) for the life of a long-lived master.
        if job.table is not None:
            job.table.close()
    model = job.model
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in job.target.items():
            params[name].copy_(tensor)
        if table_rows is not None:  # placement b: the published encoder has the fused table
            model.embedding.weight.copy_(table_rows)
    ps_table: dict[str, Any] = {}
    if job.table is not None:
        ps_table = {
            "placement": "federation",
            "num_keys": job.table.num_keys,
            "width": job.table.width,
            "rows_applied": job.table.rows_applied,
            "finite": bool(table_rows is not None and torch.isfinite(table_rows).all()),
        }
    outcome = MasterResult(
        job_id=config.job_id,
        encoder=config.encoder,
        encoder_config=model.config.to_dict(),
        rule=job.rule.name,
        children=sorted(job.children.values(), key=lambda c: c.name),
        rounds=results,
        stop_reason=stop_reason,
        target=job.target,
        final_metrics=final,
        final_child_metrics=final_by_child,
        published_round=published,
        seconds=time.perf_counter() - t0,
        ps_table=ps_table,
    )
    if config.checkpoint_dir is not None:
        # Tensors left at the master's initial values (with placement b the table is fused).
        local = (
            []
            if outcome.ps_table
            else [name for name, _ in model.named_parameters() if name not in outcome.target]
        )
        path = save_checkpoint(
            config.checkpoint_dir,
            model,
            {  # the tensors this job federated (share = all includes the item table)
                "shared_parameters": list(outcome.target),
                "federation": _metadata(outcome, config, local),
            },
        )
        outcome.checkpoint = str(path)
    return outcome


def _note(result: MasterResult, local: list[str]) -> str:
    """What the published checkpoint's tensors are, for whoever loads it."""
    if result.ps_table:
        return (
            "the shared tensors are the federation's target; the item embeddings are the "
            "federation PS's fused table (placement b)"
        )
    if not local:
        return "every tensor is the federation's fused target"
    return (
        "only the shared tensors are the federation's target; "
        f"{', '.join(local)} (the children's local heads) are the master's initial values: "
        "score with each child's own head, not these"
    )


def _saved_state(config: MasterConfig) -> MasterState:
    """The checkpoint to resume, checked against ``config`` (whose empty job id it fills)."""
    if config.state_dir is None:
        raise MasterStateError("resume needs a state directory")
    state = read_master_state(config.state_dir)
    check_resumable(state, config.job_id, config_fingerprint(config))
    config.job_id = state.job_id
    return state


def _metadata(result: MasterResult, config: MasterConfig, local: list[str]) -> dict[str, Any]:
    return {
        "job_id": result.job_id,
        "rule": result.rule,
        "rule_options": config.rule_options,
        "rounds": len(result.rounds),
        "round_budget": config.rounds,
        "stop_reason": result.stop_reason,
        "train_config": config.train.to_dict(),
        "seed": config.seed,
        "participants": {str(r.round): r.participants for r in result.rounds},
        "metrics": {str(r.round): r.metrics for r in result.rounds},
        "final_metrics": result.final_metrics,
        "final_child_metrics": result.final_child_metrics,
        "published_round": result.published_round,
        "children": [asdict(c) for c in result.children],
        "local_parameters": local,
        "note": _note(result, local),
    }
