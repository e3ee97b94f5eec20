"""A Control ``JobSpec`` as the master's flat run config, and round reports on the wire.

A job submitted through the Control API runs ``nodes/master.py``'s ServerApp like any other run,
so a spec becomes the run-config keys that :meth:`~fedenc.federation.master.MasterConfig.
from_run_config` reads (kebab-case), on top of the master's defaults (its scenario). Each field
that is set replaces one key; unset fields keep the default. :func:`check_job` then builds
everything a job builds before it runs (master config, encoder config, fusion and stop rules),
so a bad spec is refused at submission with the reason rather than failing in the queue.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from fedenc.encoders.registry import UnknownEncoderError, encoder_class, encoder_config
from fedenc.federation.fusion import UnknownFusionRuleError, build_fusion_rule
from fedenc.federation.master import MasterConfig, RoundResult
from fedenc.federation.runconfig import RUN_CONFIG_KEYS, get_json, unknown_key_message
from fedenc.proto.fedenc.v1 import control_pb2 as cpb

RunConfig = dict[str, bool | int | float | str]

#: EncoderConfig fields with a run-config key of their own.
ENCODER_KEYS: Final = {
    "num_items": "num-items",
    "hidden": "hidden",
    "steps": "steps",
    "use_positions": "use-positions",
    "normalize": "normalize",
    "scale": "scale",
    "dropout": "dropout",
}
#: EncoderConfig fields that travel in the ``encoder-options`` JSON.
ENCODER_OPTIONS: Final = frozenset({"max_position", "extra"})
#: TrainingConfig fields a job sets, and their run-config keys.
TRAINING_KEYS: Final = {
    "local_epochs": "local-epochs",
    "batch_size": "batch-size",
    "lr": "lr",
    "lr_decay_step": "lr-decay-step",
    "lr_decay_rate": "lr-decay-rate",
    "l2": "l2",
    "seed": "seed",
    "max_examples_per_epoch": "max-examples-per-epoch",
}
#: TrainingConfig fields the master does not pass on to the children's jobs.
UNSUPPORTED_TRAINING: Final = ("eval_batch_size", "patience", "ks", "select_metric")
PARTICIPATION_KEYS: Final = {
    "min_children": "min-children",
    "fraction": "fraction",
    "expect_children": "expect-children",
    "wait_timeout_s": "wait-timeout",
    "round_timeout_s": "round-timeout",
    "query_timeout_s": "query-timeout",
}
#: Run-config keys the master sets for every job itself, or that name its own files and
#: restarts (a client must not choose where the master writes), or the data the job reads: that
#: is the master's and the children's own (a client must not make them read a path of its
#: choosing, nor make the master draw a synthetic data set of its size inside the call).
RESERVED_KEYS: Final = (
    "job-id", "out-dir", "state-dir", "resume", "replay-round",
    "data", "synthetic-sessions", "synthetic-items",
)  # fmt: skip


class JobSpecError(ValueError):
    """A job spec the master cannot run (INVALID_ARGUMENT on the wire)."""


def _plain(value: Any) -> Any:
    """JSON numbers come as doubles: integral ones back to int, recursively."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(struct: Struct) -> dict[str, Any]:
    """A Struct as a plain dict, integral numbers as ints."""
    out: dict[str, Any] = _plain(json_format.MessageToDict(struct))
    return out


def dict_to_struct(values: Mapping[str, Any]) -> Struct:
    struct = Struct()
    struct.update(dict(values))
    return struct


def has(message: Message, name: str) -> bool:
    """``HasField`` by a computed name (the typed stubs only take literals)."""
    return message.HasField(name)


def _scalar(key: str, value: Any) -> bool | int | float | str:
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict | list):  # nested options travel as JSON text, as in scenarios
        return json.dumps(value)
    raise JobSpecError(f"{key}: null is not a value (leave the field out for the default)")


def spec_to_run_config(spec: cpb.JobSpec, base: Mapping[str, Any]) -> RunConfig:
    """The run config of ``spec`` on top of ``base`` (the master's defaults)."""
    rc: RunConfig = dict(base)
    for key, value in struct_to_dict(spec.run_config).items():  # first: typed fields win
        name = key.replace("_", "-")  # one spelling: the base's would shadow another
        if name in RESERVED_KEYS:
            raise JobSpecError(f"run_config {key!r} is set by the master, not by a job spec")
        if name not in RUN_CONFIG_KEYS:
            raise JobSpecError(f"run_config: {unknown_key_message(key)}")
        rc[name] = _scalar(f"run_config {key!r}", value)
    if spec.encoder_type:
        rc["encoder"] = spec.encoder_type
    options: dict[str, Any] = {}
    for name, value in struct_to_dict(spec.encoder_config).items():
        if name in ENCODER_KEYS:
            rc[ENCODER_KEYS[name]] = _scalar(f"encoder_config {name!r}", value)
        elif name in ENCODER_OPTIONS:
            options[name] = value
        else:
            known = sorted([*ENCODER_KEYS, *ENCODER_OPTIONS])
            raise JobSpecError(
                f"encoder_config has an unknown field {name!r}; known: {', '.join(known)}"
            )
    if options:
        try:
            merged = {**get_json(rc, "encoder-options"), **options}
        except ValueError as err:
            raise JobSpecError(str(err)) from None
        rc["encoder-options"] = json.dumps(merged)
    training = spec.training
    for name in UNSUPPORTED_TRAINING:
        present = len(training.ks) > 0 if name == "ks" else has(training, name)
        if present:
            raise JobSpecError(
                f"training.{name} is not a job setting (the children use their defaults); "
                "leave it unset"
            )
    for name, key in TRAINING_KEYS.items():
        if has(training, name):
            rc[key] = getattr(training, name)
    if spec.rule:
        rc["rule"] = spec.rule
    if spec.HasField("rule_options"):
        rc["rule-options"] = json.dumps(struct_to_dict(spec.rule_options))
    if spec.stop:
        rc["stop"] = spec.stop
    if spec.HasField("rounds"):
        rc["num-server-rounds"] = spec.rounds
        rc.pop("rounds", None)  # the alias would be shadowed anyway; keep one spelling
    for name, key in PARTICIPATION_KEYS.items():
        if has(spec.participation, name):
            rc[key] = getattr(spec.participation, name)
    if spec.share:
        rc["share"] = spec.share
    if spec.HasField("evaluate_every"):
        rc["evaluate-every"] = spec.evaluate_every
    if spec.HasField("final_test"):
        rc["final-test"] = spec.final_test
    return rc


def check_job(run_config: RunConfig) -> MasterConfig:
    """Builds what the job will build, so that a bad setting fails now with its reason.

    Reads the master's data source once to count the catalog when ``num-items`` is not given
    (cached per process), and writes that count back into ``run_config``."""
    encoder = run_config.get("encoder", "srgnn")
    try:
        encoder_class(str(encoder))
    except UnknownEncoderError as err:
        raise JobSpecError(str(err)) from None
    try:
        config = MasterConfig.from_run_config(run_config)
        config.stop_rule()
        build_fusion_rule(config.rule, **config.rule_options)
        encoder_config(config.encoder, config.num_items, **config.encoder_options)
    except (ValueError, TypeError, UnknownFusionRuleError, FileNotFoundError) as err:
        raise JobSpecError(str(err)) from None
    if config.train.epochs < 1 or config.train.batch_size < 1 or not config.train.lr > 0:
        raise JobSpecError(
            "training needs local_epochs >= 1, batch_size >= 1 and lr > 0 "
            f"(got {config.train.epochs}, {config.train.batch_size}, {config.train.lr})"
        )
    run_config["num-items"] = config.num_items
    return config


def encoder_view(config: MasterConfig) -> dict[str, Any]:
    """The encoder settings a job trains with (what RequestEncoder matches on)."""
    return {"num_items": config.num_items, **config.encoder_options}


def matches(have: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Every field of ``wanted`` equals ``have``'s (numbers compared as numbers)."""
    for key, value in wanted.items():
        if key not in have:
            return False
        mine = have[key]
        if isinstance(value, int | float) and isinstance(mine, int | float):
            if not math.isclose(float(value), float(mine), rel_tol=1e-9, abs_tol=0.0):
                return False
        elif value != mine:
            return False
    return True


def round_report(job_id: str, result: RoundResult) -> cpb.RoundReport:
    """A :class:`~fedenc.federation.master.RoundResult` on the wire."""
    report = cpb.RoundReport(
        job_id=job_id,
        round=result.round,
        sampled=result.sampled,
        participants=result.participants,
        excluded=result.excluded,
        num_samples=result.num_samples,
        weights=result.weights,
        metrics={k: float(v) for k, v in result.metrics.items()},
        bytes_sent=result.bytes_sent,
        bytes_received=result.bytes_received,
        seconds=result.seconds,
        skipped=result.skipped or "",
        stop_reason=result.stop_reason or "",
    )
    for name in ("loss", "recall_at_20", "mrr_at_20", "param_change"):
        value = getattr(result, name)
        if value is not None:
            setattr(report, name, float(value))
    return report


def report_to_row(report: cpb.RoundReport) -> dict[str, Any]:
    """A RoundReport as the row dict that :func:`~fedenc.federation.report.round_table` reads."""

    def opt(name: str) -> float | None:
        return float(getattr(report, name)) if has(report, name) else None

    return {
        "round": report.round,
        "sampled": list(report.sampled),
        "participants": list(report.participants),
        "skipped": report.skipped or None,
        "loss": opt("loss"),
        "recall_at_20": opt("recall_at_20"),
        "mrr_at_20": opt("mrr_at_20"),
        "bytes_moved": report.bytes_sent + report.bytes_received,
        "seconds": report.seconds,
        "stop_reason": report.stop_reason or None,
    }
