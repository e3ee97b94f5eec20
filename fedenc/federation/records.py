"""What the master and the children put into Flower messages, in one place.

The apps speak Flower's Message API, so the payload is Flower records; the contract of
``proto/fedenc/v1`` rides inside them where it fits (the instruction and the confirmation travel
as serialised ``TrainingInstruction`` / ``Confirmation`` bytes in a ``ConfigRecord``, so a child in
any language reads the same fields as the gRPC runtime). Tensors travel as an ``ArrayRecord`` in
the encoder's ordered shared-parameter names; metrics follow Flower's convention
(``"num-examples"`` in a ``MetricRecord``). Flower's own strategies drive the ClientApp only with
the instruction bytes in their train/evaluate config and ``share = "encoder"`` (with ``"all"`` a
train reply carries a second ArrayRecord, ``row-weights``, which FedAvg refuses); they skip the
confirmation step (docs/runtime.md).

======================  ===============================================================
message                 content
======================  ===============================================================
``query``               ``fedenc``: ConfigRecord{``instruction``: TrainingInstruction bytes}
reply                   ``fedenc``: ConfigRecord{``confirmation``: Confirmation bytes,
                        ``name``: the child's label}; ``metrics``: {``num-examples``}
``train``               ``arrays``: the target's shared tensors; ``config``: {``job-id``,
                        ``server-round``, ``instruction``}
reply                   ``arrays``: the child's updated shared tensors; ``metrics``:
                        {``num-examples``, ``train_loss``, ``seconds``, ...};
                        ``row-weights`` (when the item table is shared): one weight
                        per item row, the samples of the child's data touching it; with the
                        federation-level PS (``ps = "federation"``) also ``rows``: the round's
                        sparse item rows {``keys`` int32 [n], ``deltas`` float32 [n, d],
                        ``counts`` int32 [n]} (fedenc.ps.sparse) and ``ps-rows-pulled`` (rows
                        read from the federation PS this round) in ``metrics``
``evaluate``            ``arrays``: the target; ``config``: {..., ``split``: valid | test}
reply                   ``metrics``: {``num-examples``, ``recall@20``, ``mrr@20``, ...,
                        ``ps-rows-pulled`` with the federation-level PS}
``query.finish``        ``config``: {``job-id``}: the job is over, the child may drop its state
======================  ===============================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Final

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from fedenc.encoders.base import EncoderConfig
from fedenc.federation.parameters import BadUpdateError, Parameters
from fedenc.proto.fedenc.v1 import federation_pb2 as fpb
from fedenc.protocol.flower_arrays import array_to_tensor
from fedenc.protocol.tensors import tensor_spec
from fedenc.training.config import TrainConfig

FEDENC_KEY: Final = "fedenc"
ARRAYS_KEY: Final = "arrays"
CONFIG_KEY: Final = "config"
METRICS_KEY: Final = "metrics"
ROW_WEIGHTS_KEY: Final = "row-weights"
INSTRUCTION: Final = "instruction"
CONFIRMATION: Final = "confirmation"
NAME: Final = "name"
JOB_ID: Final = "job-id"
ROUND: Final = "server-round"
SPLIT: Final = "split"
WORK: Final = "work-examples"  # per-child local work of a cost-balanced round (examples/epoch)
NUM_EXAMPLES: Final = "num-examples"
OPTIMIZER_KEY: Final = "optimizer"  # carry-optimizer: the Adam moments travelling with the encoder
CARRY_OPTIMIZER: Final = "carry-optimizer"  # train config flag: send your moments back
ROWS_KEY: Final = "rows"  # placement b: a train reply's sparse item rows (fedenc.ps.sparse)
PS_ROWS_PULLED: Final = "ps-rows-pulled"  # placement b: rows a child read from the federation PS
FINISH_ACTION: Final = "query.finish"
#: Master -> a child whose answer it refused: why (config {job-id, server-round, reason}).
NOTICE_ACTION: Final = "query.notice"
REASON: Final = "reason"
DROP: Final = "drop"  # in a notice: the child is out of the whole job (drop its state)
SPLITS: Final = ("valid", "test")


# -- tensors -----------------------------------------------------------------------------------


def params_to_record(params: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``params`` as an ArrayRecord, names in their order (CPU copies; the input is untouched)."""
    return ArrayRecord({name: Array(t.detach().cpu().numpy()) for name, t in params.items()})


def record_to_params(record: ArrayRecord, child: str) -> Parameters:
    """The tensors of ``record`` by name; :class:`BadUpdateError` when one cannot be decoded.

    The tensors are read-only views on the record's bytes where the layout allows (no copy of
    a reply the master only folds, or of a target the child only copies into its model): do not
    write to them.
    """
    out: Parameters = {}
    for name in record:
        try:
            out[name] = array_to_tensor(record[name])
        except Exception as err:  # any malformed array is the sender's fault
            raise BadUpdateError(child, f"tensor {name!r} cannot be decoded: {err}") from err
    return out


def record_bytes(content: RecordDict) -> int:
    """Tensor payload bytes of a message's content (what "bytes moved" counts)."""
    return sum(record.count_bytes() for record in content.array_records.values())


# -- the instruction ---------------------------------------------------------------------------


def encoder_spec(
    encoder_type: str, config: EncoderConfig, shared: Mapping[str, torch.Tensor]
) -> fpb.EncoderSpec:
    """The EncoderSpec of an encoder: type, config as JSON, and its shared tensors' specs."""
    struct = Struct()
    struct.update(config.to_dict())
    return fpb.EncoderSpec(
        type=encoder_type,
        config=struct,
        shared_parameters=[tensor_spec(name, t) for name, t in shared.items()],
    )


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def encoder_config_from_spec(spec: fpb.EncoderSpec) -> EncoderConfig:
    """The :class:`EncoderConfig` of a spec; JSON doubles come back as the field's type."""
    raw = json_format.MessageToDict(spec.config)
    known = {f.name: f for f in fields(EncoderConfig)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"encoder config has unknown field(s) {unknown}")
    defaults = EncoderConfig(num_items=1)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "extra":
            values[name] = _integral(dict(value or {}))
            continue
        kind = type(getattr(defaults, name))
        if kind is bool:
            values[name] = bool(value)
        elif kind is int:
            if not float(value).is_integer():
                raise ValueError(f"encoder config {name} must be an integer, got {value!r}")
            values[name] = int(value)
        else:
            values[name] = float(value)
    if "num_items" not in values:
        raise ValueError("encoder config has no num_items")
    return EncoderConfig(**values)


def training_config_to_proto(config: TrainConfig) -> fpb.TrainingConfig:
    """A :class:`TrainConfig` as the wire's TrainingConfig (``epochs`` = local epochs)."""
    return fpb.TrainingConfig(
        local_epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        lr_decay_step=config.lr_decay_step,
        lr_decay_rate=config.lr_decay_rate,
        l2=config.l2,
        seed=config.seed,
        max_examples_per_epoch=config.max_examples_per_epoch,
        eval_batch_size=config.eval_batch_size,
        patience=config.patience,
        ks=list(config.ks),
        select_metric=config.select_metric,
    )


def training_config_from_proto(
    message: fpb.TrainingConfig, base: TrainConfig | None = None
) -> TrainConfig:
    """The :class:`TrainConfig` a child uses: ``base`` (its defaults) overridden by every field the
    master set."""
    values = (base or TrainConfig()).to_dict()
    renames = {"local_epochs": "epochs"}
    for field in message.DESCRIPTOR.fields:
        if field.name == "ks":
            if message.ks:
                values["ks"] = tuple(int(k) for k in message.ks)
        elif message.HasField(field.name):  # type: ignore[arg-type]  # a field of its own
            values[renames.get(field.name, field.name)] = getattr(message, field.name)
    return TrainConfig.from_dict(values)


def instruction_to_config(instruction: fpb.TrainingInstruction) -> ConfigRecord:
    return ConfigRecord({INSTRUCTION: instruction.SerializeToString()})


def instruction_from_bytes(data: object) -> fpb.TrainingInstruction:
    """Parse a serialised TrainingInstruction; ``ValueError`` when it is not one."""
    if not isinstance(data, bytes):
        raise ValueError(f"instruction must be bytes, got {type(data).__name__}")
    message = fpb.TrainingInstruction()
    try:
        message.ParseFromString(data)
    except Exception as err:
        raise ValueError(f"malformed TrainingInstruction: {err}") from err
    if not message.job_id or not message.encoder.type:
        raise ValueError("TrainingInstruction without job_id or encoder type")
    return message


# -- message contents ---------------------------------------------------------------------------


def query_content(instruction: fpb.TrainingInstruction) -> RecordDict:
    return RecordDict({FEDENC_KEY: instruction_to_config(instruction)})


def round_content(
    arrays: ArrayRecord,
    instruction: fpb.TrainingInstruction,
    round: int,
    split: str | None = None,
    work: int | None = None,
    carry: bool = False,
    optimizer: ArrayRecord | None = None,
) -> RecordDict:
    """The content of a ``train`` (no split) or ``evaluate`` message; ``work`` sets the child's
    examples per local epoch for this round (cost-balanced rounds); ``carry`` asks the child to
    return its optimizer moments and ``optimizer`` gives it the previous child's."""
    config: dict[str, Any] = {
        JOB_ID: instruction.job_id,
        ROUND: round,
        INSTRUCTION: instruction.SerializeToString(),
    }
    if split is not None:
        config[SPLIT] = split
    if work is not None:
        config[WORK] = int(work)
    if carry:
        config[CARRY_OPTIMIZER] = True
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord(config)})
    if optimizer is not None:
        content[OPTIMIZER_KEY] = optimizer
    return content


def notice_content(job_id: str, round_: int, reason: str, drop: bool = False) -> RecordDict:
    return RecordDict(
        {CONFIG_KEY: ConfigRecord({JOB_ID: job_id, ROUND: round_, REASON: reason, DROP: drop})}
    )


def finish_content(job_id: str) -> RecordDict:
    return RecordDict({CONFIG_KEY: ConfigRecord({JOB_ID: job_id})})


def confirmation_content(confirmation: fpb.Confirmation, name: str) -> RecordDict:
    return RecordDict(
        {
            FEDENC_KEY: ConfigRecord({CONFIRMATION: confirmation.SerializeToString(), NAME: name}),
            METRICS_KEY: MetricRecord({NUM_EXAMPLES: int(confirmation.num_samples)}),
        }
    )


def read_confirmation(content: RecordDict) -> tuple[fpb.Confirmation, str]:
    """The Confirmation of a query reply and the child's name ('' when it gave none)."""
    record = content.config_records.get(FEDENC_KEY)
    if record is None or CONFIRMATION not in record:
        raise ValueError("query reply without a fedenc confirmation")
    data = record[CONFIRMATION]
    if not isinstance(data, bytes):
        raise ValueError("confirmation must be bytes")
    confirmation = fpb.Confirmation()
    try:
        confirmation.ParseFromString(data)
    except Exception as err:
        raise ValueError(f"malformed Confirmation: {err}") from err
    name = record.get(NAME, "")
    return confirmation, name if isinstance(name, str) else ""


def metrics_content(
    metrics: Mapping[str, float | int],
    arrays: ArrayRecord | None = None,
    row_weights: ArrayRecord | None = None,
    optimizer: ArrayRecord | None = None,
) -> RecordDict:
    """A reply's content: metrics (Flower's MetricRecord rejects numpy scalars and bools, so every
    value is made a plain int or float) and, for ``train``, the updated tensors."""
    clean: dict[str, int | float | list[int] | list[float]] = {}
    for key, value in metrics.items():
        if isinstance(value, bool | np.bool_):
            clean[key] = int(value)
        elif isinstance(value, int | np.integer):
            clean[key] = int(value)
        else:
            clean[key] = float(value)
    content = RecordDict({METRICS_KEY: MetricRecord(clean)})
    if arrays is not None:
        content[ARRAYS_KEY] = arrays
    if row_weights is not None:
        content[ROW_WEIGHTS_KEY] = row_weights
    if optimizer is not None:
        content[OPTIMIZER_KEY] = optimizer
    return content


def read_metrics(content: RecordDict) -> dict[str, float]:
    """A reply's metrics as floats (lists dropped); ``{}`` when it has none."""
    record = content.metric_records.get(METRICS_KEY)
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, int | float)}


def read_num_examples(content: RecordDict, child: str) -> int:
    """The reply's ``num-examples`` as an int; :class:`BadUpdateError` when absent or fractional."""
    record = content.metric_records.get(METRICS_KEY)
    value = None if record is None else record.get(NUM_EXAMPLES)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadUpdateError(child, f"reply has no integer {NUM_EXAMPLES!r} (got {value!r})")
    return value
