"""The child's side of the protocol: what ``nodes/child.py``'s ClientApp handlers do.

- ``query`` (the TrainingInstruction): select the local samples for the encoder type, build the
  model and its trainer, and confirm with the number of samples, or decline with a reason (an
  encoder type this child cannot build, a catalog smaller than its item ids, no samples);
- ``train``: load the received shared parameters into the child's model (its local head, the item
  embeddings, stays as it is), train the local epochs with :class:`~fedenc.training.Trainer`, and
  reply with the updated shared parameters, the number of samples and the training metrics;
- ``evaluate``: Recall@K / MRR@K of the received parameters on the local held-out split;
- ``query.finish``: the job is over; drop its state.

A child loads its data once and keeps its model, optimizer and head across rounds in a
process-wide registry keyed by ``(run id, partition id, job id)``, and records in the node's
``Context.state`` which version of that state it left after each message. fedenc's own runtimes
run all of a node's messages in one process (:data:`~fedenc.runtime.clientapp.persistent_host`),
so the registry is all they need. Flower's deployment runtime starts a new process for every
message (and its simulation may give a node's messages to different actors): there the child
also leaves the state itself in ``Context.state`` after each round it trains, and a process
without it takes it up from there, so a round never starts from a forgotten model, optimizer or
head. A trainer whose state lives outside the model (the two-level PS) cannot travel that way:
such a child fails the round with :class:`ChildStateLostError`, naming the fix, instead of
training on from scratch. A process that has no state and finds none recorded (a ``fedenc
child`` that restarted: its context is new too) rebuilds it from the instruction that every round
message carries: it loses its optimizer moments and head, not the round.

A master that restarts (``fedenc master --resume``) queries the children again: a child that
still holds the job's state confirms with it (its model, optimizer and head are kept), and since
the master resumes after its last *completed* round, it may send a round this child has already
trained (the master died before fusing it). The child keeps a copy of its local state from before
the last round it trained (model, optimizer, LR schedule, shuffling RNG) and trains such a round
again from that copy, so a resumed job gives the target of an uninterrupted one, bit for bit on
CPU. The copy costs one model plus its optimizer state in memory; ``replay-round = false`` in the
run config turns it off. A child that restarted has lost all of that: it rebuilds its state from
the instruction (fresh optimizer moments, a head from the job seed), so the job goes on but its
result differs from an uninterrupted run. The two-level PS trainer keeps its rows in parameter
servers and is not rewound.

Each handler raises on bad input; the runtime turns that into an error reply, which the master
logs and leaves out of the round.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedenc import atomic
from fedenc.data.sessions import Examples
from fedenc.encoders.base import SessionEncoder
from fedenc.encoders.registry import UnknownEncoderError, encoder_class
from fedenc.federation import records
from fedenc.federation.child_data import ChildData, ChildDataConfig, load_child_data
from fedenc.federation.optimizer_state import export_moments, import_moments
from fedenc.federation.parameters import Parameters, check_compatible
from fedenc.federation.runconfig import get_bool, get_float, get_int, get_str
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.protocol.peer_text import clip
from fedenc.ps.federation import (
    end_round,
    make_trainer,
    ps_config_from_run_config,
    refresh_rows,
    take_pulled,
    take_rows,
)
from fedenc.runtime.clientapp import persistent_host
from fedenc.training.checkpoint import load_failure
from fedenc.training.config import TrainConfig
from fedenc.training.trainer import Trainer

log = logging.getLogger(__name__)

StateKey = tuple[int, int, str]


class DeclinedError(Exception):
    """The child cannot take part in the job; ``reason`` goes into its Confirmation."""


class ChildStateLostError(RuntimeError):
    """The child trained rounds of a job, but this process has not their state and the node's
    ``Context.state`` does not carry it: training on would silently start over."""


#: Context.state keys: the job and version of the state this node last left (ConfigRecord), and,
#: where the host does not keep the process, that state itself (ArrayRecord of one byte array).
CONTEXT_META: Final = "fedenc.child"
CONTEXT_STATE: Final = "fedenc.child.state"


@dataclass
class _Snapshot:
    """A child's local training state before a round (see the module docstring)."""

    round: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    order: tuple[dict[str, object], np.ndarray | None, int]  # EpochOrder.state()
    epochs_done: int
    rounds_trained: int


@dataclass
class ChildState:
    """Everything a child keeps across the rounds of one job."""

    key: StateKey
    name: str
    instruction: fpb.TrainingInstruction
    data: ChildData
    train_examples: Examples
    model: SessionEncoder
    trainer: Trainer
    shared_names: list[str]
    seed: int
    rounds_trained: int = 0
    # Per shared item-table tensor: the samples of this child's data touching each row (the
    # master fuses such tables row by row; fusion/weighted_sum.py says why).
    row_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    last_round: int = 0  # the highest round number trained
    before_last: _Snapshot | None = None  # the state before training ``last_round``
    version: int = 0  # rounds trained in this job, recorded in the node's Context.state

    @property
    def num_samples(self) -> int:
        return len(self.train_examples)

    def shared(self) -> Parameters:
        state = self.model.state_dict()
        return {name: state[name] for name in self.shared_names}

    def close(self) -> None:
        """Release what the trainer holds beyond memory: a planned schedule's worker threads, a
        PS client's channels. Called whenever the state is dropped or replaced."""
        try:
            self.trainer.close()
        except Exception as err:  # the job is over either way
            log.warning("%s: closing the trainer of job %s: %s", self.name, self.key[2], err)


_lock = threading.Lock()
# torch's global generator is one per process: children running in threads of one process (the
# in-process runtime with concurrency > 1) must not seed and draw from it at the same time, or
# their initialisation would depend on the thread schedule.
_rng_lock = threading.Lock()


@contextmanager
def _global_rng(seed: int, needed: bool = True) -> Iterator[None]:
    """Seed torch's global generator for this block (restored after), one thread at a time."""
    if not needed:
        yield
        return
    with _rng_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


_states: dict[StateKey, ChildState] = {}
# The states that their nodes' contexts also carry, least recently left first. A host that runs
# messages in processes of its own (Flower's simulation actors) may give one process the messages
# of hundreds of nodes: this process keeps only the last few of those, and a node whose state was
# dropped here takes it up from its context again (a data load and a copy, not a lost round).
_travelled: dict[StateKey, None] = {}
TRAVELLED_STATES_KEPT = 2


def _mix(*values: int) -> int:
    """One 63-bit seed from several integers (job seed, child, round)."""
    return (
        int(
            np.random.SeedSequence([v & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(
                2, np.uint64
            )[0]
        )
        >> 1
    )


def data_config(context: Context) -> ChildDataConfig:
    return ChildDataConfig.from_configs(context.run_config, context.node_config)


def select_samples(encoder_type: str, data: ChildData) -> Examples:
    """The child's training samples for an encoder of ``encoder_type``.

    Every registered encoder reads click sessions and learns from their (prefix, next item) pairs,
    so every session with at least two clicks qualifies; an unregistered type has none
    (:class:`DeclinedError`).
    """
    try:
        encoder_class(encoder_type)
    except UnknownEncoderError as err:
        raise DeclinedError(str(err)) from None  # it names the type and the known ones
    return data.examples("train")


def _build_state(
    key: StateKey, context: Context, instruction: fpb.TrainingInstruction
) -> ChildState:
    encoder_type = instruction.encoder.type
    try:
        cls = encoder_class(encoder_type)
    except UnknownEncoderError as err:
        raise DeclinedError(str(err)) from None  # it names the type and the known ones
    try:
        cfg = data_config(context)
    except ValueError as err:  # the run's or this child's data settings
        raise DeclinedError(f"bad data settings: {err}") from None
    try:
        data = load_child_data(cfg)
    except (ValueError, OSError) as err:  # a bad or missing file (DataFormatError: its line)
        raise DeclinedError(f"cannot read its data: {err}") from None
    examples = select_samples(encoder_type, data)
    if len(examples) == 0:
        raise DeclinedError(f"no training samples for encoder type {encoder_type!r}")
    try:
        encoder_config = records.encoder_config_from_spec(instruction.encoder)
    except ValueError as err:
        raise DeclinedError(f"bad encoder config: {err}") from None
    if encoder_config.num_items < data.num_items:
        raise DeclinedError(
            f"encoder catalog has {encoder_config.num_items} items, local data use ids up to "
            f"{data.num_items}: set num-items in the run config to the catalog the children "
            f"share (at least {data.num_items}); 0 sizes it from the master's own data source"
        )
    base = TrainConfig(device=get_str(context.run_config, "device", "cpu") or "cpu")
    try:
        train_config = records.training_config_from_proto(instruction.training, base)
    except ValueError as err:
        raise DeclinedError(f"bad training config: {err}") from None
    train_config.plan = _plan(context)
    job_seed = int(train_config.seed)
    seed = _mix(job_seed, cfg.partition_id)
    train_config.seed = seed
    # The head (item embeddings) is initialised from the job seed, as the master initialises its
    # model, so every child starts from the same embedding space; the shared part is overwritten
    # by the master's initial parameters before the first round.
    with _global_rng(job_seed):
        model = cls(encoder_config)
        model.reset_parameters()
    # The instruction names the tensors the job federates, in the encoder's order (the whole
    # encoder, or all but the item table); an older instruction without names means the latter.
    expected = [spec.name for spec in instruction.encoder.shared_parameters]
    shared_names = expected or model.shared_parameter_names()
    own = [name for name, _ in model.named_parameters()]
    unknown = sorted(set(shared_names) - set(own))
    if unknown:
        raise DeclinedError(
            f"encoder {encoder_type!r} here has no parameters {unknown} that the instruction lists"
        )
    if shared_names != [name for name in own if name in set(shared_names)]:
        raise DeclinedError("the instruction lists the shared parameters out of encoder order")
    uses_ps = ps_config_from_run_config(context.run_config) is not None
    if uses_ps or get_int(context.node_config, "elastic-workers", 0, source="node config") > 0:
        # The planner's step programs assume the plain trainer on this process's cores.
        if train_config.plan not in ("auto", "default"):
            what = "the two-level PS trainer" if uses_ps else "elastic training (--workers)"
            raise DeclinedError(f"plan {train_config.plan!r} cannot drive {what}")
        train_config.plan = "default"
    # Per item row, the samples of this child's data touching it (clicks and targets): the
    # row weights of a shared table, fused densely or (placement b) row by row in the PS.
    item_counts = np.bincount(data.train.items, minlength=encoder_config.num_items + 1)
    try:
        trainer = make_trainer(
            model,
            train_config,
            context.run_config,
            job_seed,
            instruction.job_id,
            row_counts=item_counts.astype(np.int64),
        )
    except ValueError as err:
        raise DeclinedError(f"cannot set up local training: {err}") from None
    if type(trainer) is not Trainer:
        head = set(model.head_parameter_names()) & set(shared_names)
        if head:
            raise DeclinedError(
                f"the item table lives in this child's parameter server; the job shares "
                f"{sorted(head)}: run it with share = 'encoder'"
            )
    shared_heads = [name for name in shared_names if name in set(model.head_parameter_names())]
    row_weights: dict[str, torch.Tensor] = {}
    for name in shared_heads:
        rows = model.state_dict()[name].shape[0]
        row_weights[name] = torch.from_numpy(item_counts[:rows].astype(np.float32))
    state = ChildState(
        key=key,
        name=child_name(context, cfg.partition_id),
        instruction=instruction,
        data=data,
        train_examples=examples,
        model=model,
        trainer=trainer,
        shared_names=shared_names,
        seed=seed,
        row_weights=row_weights,
    )
    _restore_persisted(state, context)
    return state


def _plan(context: Context) -> str:
    """This child's execution plan (node_config ``plan``, ``fedenc child --plan``): chosen on
    the child's machine, not by the master; the plain loop when not given (simulations)."""
    return get_str(context.node_config, "plan", "default", source="node config") or "default"


def child_name(context: Context, partition_id: int) -> str:
    """The name the master reports this child by: its node's ``name`` (``fedenc child
    --name``, the name its certificate proves), else ``child-<partition id>``."""
    name = context.node_config.get("name")
    return str(name) if name else f"child-{partition_id}"


def _key(context: Context, job_id: str) -> StateKey:
    # Only the partition id: a job with bad data settings must still be declined by its key.
    return (
        int(context.run_id),
        get_int(context.node_config, "partition-id", 0, source="node config"),
        job_id,
    )


def _live_snapshot(state: ChildState, round_: int) -> _Snapshot:
    """The state as it is now, by reference: to be saved at once, not kept."""
    trainer = state.trainer
    return _Snapshot(
        round=round_,
        model=dict(state.model.state_dict()),
        optimizer=trainer.optimizer.state_dict(),
        scheduler=trainer.scheduler.state_dict(),
        order=trainer.epoch_order.state(),
        epochs_done=trainer.epochs_done,
        rounds_trained=state.rounds_trained,
    )


def _take_snapshot(state: ChildState, round_: int) -> _Snapshot:
    """A copy of the state, kept while training goes on."""
    live = _live_snapshot(state, round_)
    return replace(
        live,
        model={k: v.detach().clone() for k, v in live.model.items()},
        optimizer=copy.deepcopy(live.optimizer),
        scheduler=copy.deepcopy(live.scheduler),
    )


def _restore_snapshot(state: ChildState, snap: _Snapshot) -> None:
    # Copies in: the snapshot must stay intact should the same round come a third time.
    trainer = state.trainer
    state.model.load_state_dict(snap.model)
    trainer.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
    trainer.scheduler.load_state_dict(copy.deepcopy(snap.scheduler))
    trainer.epoch_order.restore(snap.order)
    trainer.epochs_done = snap.epochs_done
    state.rounds_trained = snap.rounds_trained


# -- persisted state (simulations: `fedenc simulate --resume` continues bit for bit) ----------


def _persist_path(state: ChildState, context: Context) -> Path | None:
    """Where this child's state is kept between rounds, or None. Only when the child itself is
    set up for it (node config ``child-state``, which `fedenc simulate --out` gives its
    in-process children: they live in the process that may be killed, beside the master's
    files), never because a master asks, and only when the state can be rewound (the plain
    trainer)."""
    if not get_bool(context.node_config, "child-state", False, source="node config"):
        return None
    if type(state.trainer) is not Trainer or not get_bool(context.run_config, "replay-round", True):
        return None
    root = get_str(context.run_config, "state-dir", "")
    out = get_str(context.run_config, "out-dir", "")
    if not root and not out:
        return None
    base = Path(root) if root else Path(out) / "state"
    job = state.key[2]
    if not re.fullmatch(r"[A-Za-z0-9._-]+", job) or job in (".", ".."):
        return None  # a job id is a file name here: nothing that could leave the folder
    return base / "children" / job / f"{state.key[1]}.pt"


def _snapshot_payload(snap: _Snapshot) -> dict[str, Any]:
    rng, order, cursor = snap.order
    return {  # tensors and plain values only: read back with torch.load(weights_only=True)
        "round": snap.round,
        "model": snap.model,
        "optimizer": snap.optimizer,
        "scheduler": snap.scheduler,
        "order": (dict(rng), None if order is None else torch.from_numpy(order.copy()), cursor),
        "epochs_done": snap.epochs_done,
        "rounds_trained": snap.rounds_trained,
    }


def _snapshot_of(payload: Mapping[str, Any]) -> _Snapshot:
    rng, order, cursor = payload["order"]
    return _Snapshot(
        round=int(payload["round"]),
        model=dict(payload["model"]),
        optimizer=dict(payload["optimizer"]),
        scheduler=dict(payload["scheduler"]),
        order=(dict(rng), None if order is None else order.numpy(), int(cursor)),
        epochs_done=int(payload["epochs_done"]),
        rounds_trained=int(payload["rounds_trained"]),
    )


def _state_payload(state: ChildState, with_before: bool = True) -> dict[str, Any]:
    """The state after the last round and (``with_before``) the one before it (a master that
    resumes before this round replays it, one that resumes after it goes on from here): tensors
    and plain values only, read back with ``torch.load(weights_only=True)``."""
    before = state.before_last if with_before else None
    return {
        "format": 1,
        "job_id": state.key[2],
        "last_round": state.last_round,
        "after": _snapshot_payload(_live_snapshot(state, state.last_round)),  # saved at once
        "before": None if before is None else _snapshot_payload(before),
    }


def _restore_payload(state: ChildState, payload: Mapping[str, Any]) -> None:
    """Take up :func:`_state_payload`'s output, all of it or (raising) nothing: a model restored
    before the optimizer failed would leave saved weights with a fresh optimizer."""
    fresh = _take_snapshot(state, 0)
    try:
        after = _snapshot_of(payload["after"])
        before = None if payload["before"] is None else _snapshot_of(payload["before"])
        last_round = int(payload["last_round"])
        _restore_snapshot(state, after)
    except BaseException:
        _restore_snapshot(state, fresh)
        raise
    state.last_round, state.before_last = last_round, before


def _persist(state: ChildState, context: Context) -> None:
    """After a trained round, with the child's own ``child-state`` setting: save its state."""
    path = _persist_path(state, context)
    if path is None:
        return
    try:
        atomic.torch_save(_state_payload(state), path, atomic.PRIVATE)
    except OSError as err:  # the round's update still counts; only an exact resume is lost
        log.warning("%s: cannot save its state to %s (%s): a resume would not be exact",
                    state.name, path, err)  # fmt: skip


def _restore_persisted(state: ChildState, context: Context) -> None:
    """A state rebuilt from its instruction takes up the persisted one, if there is one."""
    path = _persist_path(state, context)
    if path is None or not path.is_file():
        return
    try:
        _restore_payload(state, atomic.torch_load(path, weights_only=True))
    except Exception as err:  # an unreadable file: start afresh, as before, and say so
        log.warning("%s: cannot read its saved state %s (%s): starting afresh", state.name,
                    path, load_failure(err))  # fmt: skip
        return
    log.info("%s: resumed its state after round %d from %s", state.name, state.last_round, path)


# -- the node's Context.state (hosts that run each message in a new process) -------------------


def _recorded_version(context: Context, job_id: str) -> int | None:
    """The version of job ``job_id``'s state this node last left, None if none is recorded."""
    meta = context.state.config_records.get(CONTEXT_META)
    if meta is None or meta.get("job") != job_id:
        return None
    version = meta.get("version")
    return int(version) if isinstance(version, int) else None


def _leave_in_context(state: ChildState, context: Context) -> None:
    """Record the state's version in the node's context and, where the host will not keep this
    process and the state can travel (the plain trainer), the state itself."""
    context.state[CONTEXT_META] = ConfigRecord({"job": state.key[2], "version": state.version})
    keep = not persistent_host.get() and state.version > 0 and type(state.trainer) is Trainer
    _note_used(state)  # (droppable here at version 0 too: the instruction rebuilds it)
    if not keep:  # version 0 is what the instruction rebuilds; fedenc's runtimes keep the process
        _forget_in_context(context, meta=False)
        return
    buffer = io.BytesIO()
    # Without the replay copy: under Flower a resumed master is a new run, with new contexts.
    torch.save(_state_payload(state, with_before=False), buffer)
    blob = np.frombuffer(buffer.getbuffer(), dtype=np.uint8)
    context.state[CONTEXT_STATE] = ArrayRecord({"payload": Array(blob)})


def _note_used(state: ChildState) -> None:
    """On a host that keeps no process (Flower's), ``state`` is the most recently used of the
    states this process may drop; the older ones beyond :data:`TRAVELLED_STATES_KEPT` are
    dropped (their nodes' contexts carry them, or the instruction rebuilds them)."""
    if persistent_host.get() or type(state.trainer) is not Trainer:
        return
    key = state.key
    with _lock:
        _travelled.pop(key, None)
        _travelled[key] = None
        old = list(_travelled)[: max(0, len(_travelled) - TRAVELLED_STATES_KEPT)]
        dropped = [_states.pop(k, None) for k in old]
        for k in old:
            del _travelled[k]
    for old_state in dropped:
        if old_state is not None:
            old_state.close()


def _forget_in_context(context: Context, meta: bool = True) -> None:
    for key in (CONTEXT_META, CONTEXT_STATE) if meta else (CONTEXT_STATE,):
        if key in context.state:
            del context.state[key]


def _take_up_context(state: ChildState, context: Context, version: int) -> None:
    """A state rebuilt from its instruction takes up version ``version`` from the context."""
    record = context.state.array_records.get(CONTEXT_STATE)
    if record is None or type(state.trainer) is not Trainer:
        what = (
            "the plain trainer's" if type(state.trainer) is Trainer else "a two-level PS trainer's"
        )
        raise ChildStateLostError(
            f"{state.name} trained {version} round(s) of job {state.key[2]}, but this process "
            f"holds none of it and the node's context does not carry {what} state: the host "
            "runs messages in new processes (Flower's deployment runtime, or several simulation "
            "actors). Run the children on fedenc's runtimes (`fedenc child`, `fedenc simulate`), "
            'or keep the item table out of a parameter server (ps = "")'
        )
    try:
        payload = atomic.torch_load(
            io.BytesIO(record["payload"].numpy().tobytes()), weights_only=True
        )
    except Exception as err:  # damaged on its way through the host: say so, not torch's advice
        raise ChildStateLostError(
            f"{state.name}: the state of job {state.key[2]} in the node's context cannot be "
            f"read ({load_failure(err)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("job_id") != state.key[2]:
        found = payload.get("job_id") if isinstance(payload, dict) else type(payload).__name__
        raise ChildStateLostError(
            f"{state.name}: the state in the node's context is job {found!r}'s, "
            f"not job {state.key[2]!r}'s"
        )
    _restore_payload(state, payload)
    state.version = version
    log.info("%s: took up its state of job %s after %d round(s) from the node's context",
             state.name, state.key[2], version)  # fmt: skip


def _replay_guard(state: ChildState, round_: int, context: Context) -> None:
    """Before training ``round_``: rewind when it is the last round trained again (a master
    that resumed after the round before it), else keep a snapshot of the state before it."""
    if round_ <= 0 or type(state.trainer) is not Trainer:
        return  # no round number, or the PS trainer (its rows live in parameter servers)
    if not get_bool(context.run_config, "replay-round", True):
        return
    if not persistent_host.get():  # Flower's hosts: a resumed master is a new run, no replay
        state.last_round = max(state.last_round, round_)
        return
    if round_ == state.last_round and state.before_last is not None:
        # Expected on every resume (one line per child that trained the round): info.
        log.info(
            "%s: round %d of job %s again (the master resumed): retrained from the state it "
            "had before that round, as an uninterrupted run would",
            state.name,
            round_,
            state.key[2],
        )
        _restore_snapshot(state, state.before_last)
    elif round_ < state.last_round:
        log.warning(
            "%s: round %d after round %d: only the last round can be replayed; training from "
            "the current state",
            state.name,
            round_,
            state.last_round,
        )
    else:
        state.before_last = _take_snapshot(state, round_)
        state.last_round = round_


def _same_job(a: fpb.TrainingInstruction, b: fpb.TrainingInstruction) -> bool:
    """The same job, encoder and training (the round a child joins at may differ)."""
    left, right = fpb.TrainingInstruction(), fpb.TrainingInstruction()
    left.CopyFrom(a)
    right.CopyFrom(b)
    left.round = right.round = 0
    return left == right


def _state_for(context: Context, config: Mapping[str, Any]) -> ChildState:
    """The state of the message's job: this process's, when it is the version the node's context
    records; else rebuilt from the instruction and, when rounds were trained, the context."""
    instruction = records.instruction_from_bytes(config.get(records.INSTRUCTION))
    key = _key(context, instruction.job_id)
    recorded = _recorded_version(context, instruction.job_id)
    with _lock:
        state = _states.get(key)
    if state is not None and (recorded is None or state.version == recorded):
        _note_used(state)
        return state
    if state is None:
        log.info("no state for job %s here: rebuilding it from the instruction", key[2])
    else:  # this process ran an older message of the node; another one ran the later ones
        log.info("job %s: this process holds version %d of the state, the node's is %d",
                 key[2], state.version, recorded)  # fmt: skip
    built = _build_state(key, context, instruction)
    try:
        if recorded:
            _take_up_context(built, context, recorded)
    except BaseException:
        built.close()
        raise
    with _lock:
        current = _states.get(key)
        if current is not None and current is not state:  # another thread rebuilt it first
            winner = current
        else:
            winner = _states[key] = built
    for loser in (state, built):
        if loser is not None and loser is not winner:
            loser.close()
    _note_used(winner)
    return winner


def _summary(data: ChildData, examples: Examples) -> fpb.DataSummary:
    sessions = data.train
    n = len(sessions)
    return fpb.DataSummary(
        num_sessions=n,
        num_clicks=sessions.num_clicks,
        num_examples=len(examples),
        num_items=int(np.unique(sessions.items).size),
        mean_session_length=sessions.num_clicks / n if n else 0.0,
    )


# -- handlers ------------------------------------------------------------------------------------


def handle_query(message: Message, context: Context) -> Message:
    """Answer a TrainingInstruction with a Confirmation (accepted or declined with a reason)."""
    record = message.content.config_records.get(records.FEDENC_KEY)
    instruction = records.instruction_from_bytes(
        None if record is None else record.get(records.INSTRUCTION)
    )
    key = _key(context, instruction.job_id)
    name = child_name(context, key[1])
    with _lock:
        existing = _states.get(key)
    try:
        if existing is not None and _same_job(existing.instruction, instruction):
            # Asked again (a reconnect, a master that resumed the job): keep what this child
            # has learnt so far, model, optimizer and head.
            log.info("%s confirms job %s again with its current state", name, instruction.job_id)
            state = existing
        else:
            state = _build_state(key, context, instruction)
    except DeclinedError as err:
        log.info("%s declines job %s: %s", name, instruction.job_id, err)
        confirmation = fpb.Confirmation(
            job_id=instruction.job_id, accepted=False, decline_reason=str(err)
        )
        return Message(records.confirmation_content(confirmation, name), reply_to=message)
    with _lock:
        replaced = _states.get(key)
        _states[key] = state
    if replaced is not None and replaced is not state:
        replaced.close()
    _leave_in_context(state, context)
    confirmation = fpb.Confirmation(
        job_id=instruction.job_id,
        accepted=True,
        num_samples=state.num_samples,
        summary=_summary(state.data, state.train_examples),
        # The master caps each evaluation reply's weight at these (a child cannot outweigh
        # the others' metrics by claiming more examples than it has).
        num_valid_examples=len(state.data.examples("valid")),
        num_test_examples=len(state.data.examples("test")),
    )
    return Message(records.confirmation_content(confirmation, state.name), reply_to=message)


def _load_shared(state: ChildState, content: RecordDict) -> None:
    arrays = content.array_records.get(records.ARRAYS_KEY)
    if arrays is None:
        raise ValueError("message carries no shared parameters ('arrays')")
    params = records.record_to_params(arrays, "master")
    current = state.shared()
    # Tensors arrive on the CPU; a child that trains on a GPU checks and loads them there.
    params = {k: v.to(current[k].device) if k in current else v for k, v in params.items()}
    check_compatible(current, params, "master")
    with torch.no_grad():
        for name in state.shared_names:
            current[name].copy_(params[name])


def _round(config: Mapping[str, Any]) -> int:
    value = config.get(records.ROUND, 0)
    return int(value) if isinstance(value, int) else 0


def handle_train(message: Message, context: Context) -> Message:
    """Train the local epochs from the received shared parameters; reply with the updated ones."""
    config: Mapping[str, Any] = message.content.config_records.get(records.CONFIG_KEY) or {}
    state = _state_for(context, config)
    round_ = _round(config)
    _replay_guard(state, round_, context)
    _load_shared(state, message.content)
    carried = message.content.array_records.get(records.OPTIMIZER_KEY)
    if carried is not None:  # carry-optimizer: the previous child's Adam moments
        import_moments(
            state.trainer.optimizer,
            dict(state.model.named_parameters()),
            state.shared_names,
            records.record_to_params(carried, "master"),
        )
    refresh_rows(state.trainer)  # placement b: the federation table moved since last round
    epochs = state.trainer.config.epochs
    t0 = time.perf_counter()
    losses: list[float] = []
    trained = 0
    # A cost-balanced round sets this round's examples per epoch (fedenc.planner.balance).
    work = config.get(records.WORK)
    cap = state.trainer.config.max_examples_per_epoch
    if isinstance(work, int) and work > 0:
        state.trainer.config.max_examples_per_epoch = work
    # A deliberately slowed child (node_config "slowdown", e.g. 3.0 = three times slower) idles
    # in proportion to its work: a straggler for scenarios, without burning shared cores.
    slowdown = get_float(context.node_config, "slowdown", 1.0, source="node config")
    elastic_metrics: dict[str, float | int] = {}
    try:
        # Global torch RNG (dropout) seeded per child and round, so results do not depend on the
        # order in which a runtime schedules the children.
        # Only dropout draws from it while training, so without dropout children train in
        # parallel.
        site = _elastic_site(context, state)
        if site is not None:  # N computing-server processes train the round's epochs
            elastic = site.train(state.trainer, state.train_examples, epochs)
            losses.extend(elastic.pop("epoch_losses"))
            trained = int(elastic.pop("pairs"))
            elastic_metrics.update(elastic)
        elif state.trainer.plan is None and state.trainer.config.plan != "default":
            # Chosen once, on this machine, before the first round; logged with the reason.
            state.trainer.prepare_plan(
                state.train_examples, lambda line: log.info("%s: %s", state.name, line)
            )
        with _global_rng(_mix(state.seed, round_), needed=state.model.config.dropout > 0):
            for _ in range(0 if site is not None else epochs):
                epoch = state.trainer.train_epoch(state.train_examples)
                losses.append(epoch["loss"])
                trained += int(epoch["pairs"])
                if slowdown > 1.0:
                    time.sleep((slowdown - 1.0) * epoch["seconds"])
    finally:
        state.trainer.config.max_examples_per_epoch = cap
    ps_metrics = end_round(state.trainer)  # the two-level PS flushes its last window
    state.rounds_trained += 1
    state.version += 1
    _persist(state, context)
    _leave_in_context(state, context)
    seconds = time.perf_counter() - t0
    # A line per round in the child's own log (an operator at the site sees what it did).
    log.info("%s: round %d of job %s: %d examples, %d epoch(s), loss %.4f, %.1f s", state.name,
             round_, state.key[2], trained, epochs, losses[-1], seconds)  # fmt: skip
    metrics = {
        records.NUM_EXAMPLES: state.num_samples,
        "train_loss": losses[-1],
        "first_epoch_loss": losses[0],
        "local_epochs": epochs,
        "seconds": seconds,
        "trained_examples": trained,
        **ps_metrics,
        **elastic_metrics,
    }
    sparse = take_rows(state.trainer)  # placement b: the round's item rows
    if sparse is not None:
        metrics[records.PS_ROWS_PULLED] = sparse[1]
    arrays = records.params_to_record(state.shared())
    rows = records.params_to_record(state.row_weights) if state.row_weights else None
    moments = None
    if config.get(records.CARRY_OPTIMIZER):
        moments = records.params_to_record(
            export_moments(
                state.trainer.optimizer, dict(state.model.named_parameters()), state.shared_names
            )
        )
    content = records.metrics_content(metrics, arrays, rows, moments)
    if sparse is not None:
        content[records.ROWS_KEY] = sparse[0].to_record()
    return Message(content, reply_to=message)


_sites: dict[tuple[Any, ...], Any] = {}


def _elastic_site(context: Context, state: ChildState) -> Any:
    """The child's elastic site (node_config ``elastic-workers`` = N computing-server processes,
    ``fedenc child --workers N``; ``elastic-listen`` / ``elastic-advertise`` / ``elastic-certs``
    / ``elastic-insecure`` open it to computing servers on other machines), started on first use
    and kept for the process's lifetime; None for ordinary in-process training."""
    config = context.node_config
    workers = get_int(config, "elastic-workers", 0)
    if workers <= 0:
        return None
    if type(state.trainer) is not Trainer:  # (_build_state already set its plan to default)
        raise ValueError("elastic training (--workers) needs the plain trainer: no PS")
    from fedenc.elastic.site import ElasticSite

    listen = get_str(config, "elastic-listen", "127.0.0.1:0")
    advertise = get_str(config, "elastic-advertise", "") or None
    certs = get_str(config, "elastic-certs", "")
    insecure = get_bool(config, "elastic-insecure", False)
    key = (workers, listen, advertise, certs, insecure)
    with _lock:
        site = _sites.get(key)
        if site is None:
            import atexit
            from pathlib import Path

            site = _sites[key] = ElasticSite(
                workers,
                name=state.name,
                listen=listen,
                advertise=advertise,
                certs=Path(certs) if certs else None,
                insecure=insecure,
            )
            atexit.register(site.close)
            if listen != "127.0.0.1:0":
                log.info("elastic site open to computing servers at %s", site.task_address)
    return site


def handle_evaluate(message: Message, context: Context) -> Message:
    """Recall@K / MRR@K of the received shared parameters (with the local head) on held-out data."""
    config: Mapping[str, Any] = message.content.config_records.get(records.CONFIG_KEY) or {}
    state = _state_for(context, config)
    if records.ARRAYS_KEY in message.content.array_records:
        _load_shared(state, message.content)
    split = config.get(records.SPLIT, "valid")
    if split not in records.SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; use {', '.join(records.SPLITS)}")
    examples = state.data.examples(str(split))
    metrics: dict[str, float | int] = {records.NUM_EXAMPLES: len(examples)}
    if len(examples):
        refresh_rows(state.trainer)  # placement b: score against the current federation table
        result = state.trainer.evaluate(examples)
        metrics.update({k: v for k, v in result.items() if "@" in k})
        pulled = take_pulled(state.trainer)
        if pulled:
            metrics[records.PS_ROWS_PULLED] = pulled
    return Message(records.metrics_content(metrics), reply_to=message)


def handle_notice(message: Message, context: Context) -> Message:
    """The master left this child's answer out (a refused update or confirmation): say why in
    this child's log, where its operator looks; out of the whole job, drop its state."""
    config: Mapping[str, Any] = message.content.config_records.get(records.CONFIG_KEY) or {}
    job_id = str(config.get(records.JOB_ID, ""))
    name = child_name(context, _key(context, job_id)[1])
    reason = clip(str(config.get(records.REASON, "no reason given")))
    if config.get(records.DROP):
        log.warning("%s: the master left this child out of job %s: %s", name, job_id, reason)
        _drop_job(context, job_id)
    else:
        log.warning("%s: the master left this child out of round %s of job %s: %s", name,
                    config.get(records.ROUND, "?"), job_id, reason)  # fmt: skip
    return Message(records.metrics_content({}), reply_to=message)


def handle_finish(message: Message, context: Context) -> Message:
    """The job is over: drop its state (the data cache stays for the next job)."""
    config: Mapping[str, Any] = message.content.config_records.get(records.CONFIG_KEY) or {}
    dropped = _drop_job(context, str(config.get(records.JOB_ID, "")))
    return Message(records.metrics_content({"dropped": int(dropped)}), reply_to=message)


def _drop_job(context: Context, job_id: str) -> bool:
    """Forget job ``job_id``'s state here (process, node context, saved file); whether it had
    one."""
    key = _key(context, job_id)
    with _lock:
        state = _states.pop(key, None)
        _travelled.pop(key, None)
    if _recorded_version(context, job_id) is not None:
        _forget_in_context(context)
    if state is None:
        return False
    state.close()  # the job is over for this child: nothing to resume
    path = _persist_path(state, context)
    if path is not None:
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # the job's folder, once its last child is done
            path.parent.rmdir()
    return True


def live_states() -> list[StateKey]:
    """The jobs this process holds state for (tests, diagnostics)."""
    with _lock:
        return list(_states)


def close_sites() -> None:
    """Stop every elastic site of this process (its computing-server processes and its gRPC
    services). A process that ends calls it before the interpreter shuts down: from the
    ``atexit`` hook, the services' threads already fail ("cannot schedule new futures after
    shutdown") and the process never exits."""
    with _lock:
        sites = list(_sites.values())
        _sites.clear()
    for site in sites:
        try:
            site.close()
        except Exception as err:  # the others must close all the same
            log.warning("closing an elastic site: %s", err)


def forget(run_id: int | None = None) -> None:
    """Drop the state of ``run_id`` (all runs when None)."""
    with _lock:
        dropped = [_states.pop(k) for k in list(_states) if run_id is None or k[0] == run_id]
        for key in [k for k in _travelled if run_id is None or k[0] == run_id]:
            del _travelled[key]
    for state in dropped:
        state.close()
