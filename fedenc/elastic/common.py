"""What the elastic services share: gRPC options, errors, and the tensor helpers of a batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import grpc
import torch
from torch import Tensor

from fedenc.data.batching import SessionBatch, graph_batch
from fedenc.proto.fedenc.v1 import tensor_pb2 as tpb
from fedenc.protocol.tensors import tensor_from_proto, tensor_to_proto
from fedenc.runtime.grpc.transport import EXCLUSIVE_PORT

#: A WorkItem carries every parameter inline; 256 MiB leaves room for an encoder with a
#: 40k x 100 item table many times over. Bigger models would need the chunked stream of the
#: federation runtime (not implemented here).
MAX_MESSAGE_BYTES: Final = 256 * 1024 * 1024
OPTIONS: Final = [
    EXCLUSIVE_PORT,
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
]
DEFAULT_HEARTBEAT_INTERVAL: Final = 1.0
DEFAULT_HEARTBEAT_TIMEOUT: Final = 5.0

T = TypeVar("T")


class ElasticError(RuntimeError):
    """A refused request or an impossible setting; the message says what is wrong."""


def retry_unavailable(call: Callable[[], T], give_up_s: float, what: str) -> T:
    """``call()`` retried with backoff while its peer is UNAVAILABLE (restarting), for at most
    ``give_up_s`` seconds; other gRPC errors propagate at once."""
    deadline = time.monotonic() + give_up_s
    delay = 0.05
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            if time.monotonic() + delay > deadline:
                raise ElasticError(f"{what}: peer unavailable for {give_up_s:.0f} s") from err
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def batch_to_proto(
    items: Tensor, lengths: Tensor, targets: Tensor
) -> tuple[tpb.Tensor, tpb.Tensor, tpb.Tensor]:
    return (
        tensor_to_proto("items", items),
        tensor_to_proto("lengths", lengths),
        tensor_to_proto("targets", targets),
    )


def batch_from_proto(items: tpb.Tensor, lengths: tpb.Tensor, targets: tpb.Tensor) -> SessionBatch:
    """The SessionBatch that :func:`fedenc.data.batching.build_batch` builds from the same
    prefixes (the same graph code runs on the padded matrix)."""
    click = tensor_from_proto(items)
    length = tensor_from_proto(lengths)
    target = tensor_from_proto(targets)
    if click.dim() != 2 or length.shape != (click.shape[0],) or target.shape != length.shape:
        raise ElasticError(
            f"malformed batch: items {list(click.shape)}, lengths {list(length.shape)}, "
            f"targets {list(target.shape)}"
        )
    if click.dtype != torch.int64 or length.dtype != torch.int64 or target.dtype != torch.int64:
        raise ElasticError("malformed batch: items, lengths and targets must be int64")
    mask = torch.arange(click.shape[1])[None, :] < length[:, None]
    return graph_batch(click, mask, length, target)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """``context.abort`` typed as never returning (it raises to end the RPC)."""
    context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")


def server_security_of(certs: Path | None, insecure: bool) -> Any:
    """A service's ``ServerSecurity``: mutual TLS with the master certificate of ``certs``
    (clients need child certificates of the same CA), or explicit plaintext (with a warning)."""
    from fedenc.ps.tls import shard_credentials
    from fedenc.runtime.grpc.transport import ServerSecurity

    credentials = shard_credentials(
        certs, insecure, what="elastic service sends training batches and parameters"
    )
    return ServerSecurity(credentials=credentials, insecure=credentials is None)
