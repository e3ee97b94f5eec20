"""Every non-public Flower (``flwr`` 1.42) touch-point fedenc's runtimes need, in one place.

Flower's public Message API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``) is enough for the
apps; a runtime that hosts them needs a few more things that Flower keeps internal
(../shared/notes/custom-grid.md):

- ``Message(content, dst, type)`` reads the process-global ``TaskIdentity`` (run id, source node);
  a runtime must set it before the ServerApp builds messages (:func:`task_identity`);
- ``Metadata.message_id`` has no setter: grids write ``metadata.__dict__["_message_id"]``
  (:func:`set_message_id`);
- ``Grid.run`` is a :class:`flwr.supercore.run.Run` (:func:`empty_run`);
- ``ErrorCode`` lives in ``flwr.common.constant`` and serde in ``flwr.common.serde``
  (:func:`message_to_bytes` / :func:`message_from_bytes`, :func:`error_reply`);
- the gRPC runtime ships a message as Flower's own proto with its ArrayRecords emptied (their
  tensors are streamed apart): :func:`message_without_arrays`, which needs serde's
  ``metadata_to_proto`` / ``error_to_proto`` from ``flwr.common.serde_utils``.

When Flower moves one of these, only this module changes; ``tests/runtime/test_flower_compat.py``
pins each of them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

from flwr.app import ArrayRecord, Error, Message, RecordDict
from flwr.serverapp import Grid

#: The Flower release these touch-points were written and tested against.
SUPPORTED_FLWR: Final = "1.42."


def _installed_flwr() -> str:
    try:
        return version("flwr")
    except PackageNotFoundError:  # (a source checkout without metadata)
        return "unknown"


try:
    from flwr.common.constant import SUPERLINK_NODE_ID as _SUPERLINK_NODE_ID
    from flwr.common.constant import ErrorCode
    from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto
    from flwr.common.serde_utils import error_to_proto, metadata_to_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
except ImportError as err:  # another Flower moved an internal: say which release fits
    raise ImportError(
        f"fedenc's runtimes need flwr {SUPPORTED_FLWR}* (installed: {_installed_flwr()}); "
        f"pip install 'flwr=={SUPPORTED_FLWR}*'. ({err})"
    ) from err

if not _installed_flwr().startswith(SUPPORTED_FLWR):
    logging.getLogger(__name__).warning(
        "flwr %s is installed; fedenc's runtimes are tested with %s*", _installed_flwr(),
        SUPPORTED_FLWR,
    )  # fmt: skip

__all__ = [
    "CLIENT_APP_RAISED_EXCEPTION",
    "NODE_UNAVAILABLE",
    "SUPERLINK_NODE_ID",
    "UNKNOWN_ERROR",
    "Run",
    "RunGrid",
    "empty_run",
    "error_reply",
    "message_from_bytes",
    "message_to_bytes",
    "message_without_arrays",
    "set_message_id",
    "task_identity",
]

SUPERLINK_NODE_ID: Final[int] = int(_SUPERLINK_NODE_ID)
"""The node id Flower gives the ServerApp side (the source of instruction messages)."""
UNKNOWN_ERROR: Final[int] = int(ErrorCode.UNKNOWN)
CLIENT_APP_RAISED_EXCEPTION: Final[int] = int(ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
"""Error code of a reply whose ClientApp handler raised (what SuperNode and simulation use)."""
NODE_UNAVAILABLE: Final[int] = int(ErrorCode.NODE_UNAVAILABLE)
"""Error code of a reply to a message for a node that is gone or unknown."""


@contextmanager
def task_identity(
    run_id: int, node_id: int = SUPERLINK_NODE_ID, task_id: int = 1
) -> Iterator[None]:
    """Set the process-global identity that ``Message(...)`` stamps into new messages, and restore
    the previous one on exit. It is global: run one ServerApp per process at a time."""
    saved: tuple[Any, Any, Any] = (
        TaskIdentity._task_id,
        TaskIdentity._run_id,
        TaskIdentity._node_id,
    )
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def set_message_id(message: Message, message_id: str) -> None:
    """Give ``message`` its id (Flower's grids do the same; ``Metadata`` has no setter)."""
    message.metadata.__dict__["_message_id"] = message_id
    if message.metadata.message_id != message_id:  # Flower renamed the field: replies would
        raise RuntimeError(  # go unmatched, silently
            f"cannot set a message id on this Flower ({_installed_flwr()}): fedenc needs "
            f"flwr {SUPPORTED_FLWR}*"
        )


def empty_run(run_id: int) -> Run:
    """A bare :class:`Run` for ``Grid.set_run`` / ``Grid.run``."""
    return Run.create_empty(run_id)


def error_reply(message: Message, code: int, reason: str) -> Message:
    """An error reply to ``message`` (Flower's convention for a failed ClientApp or node)."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def message_to_bytes(message: Message) -> bytes:
    """``message`` (metadata, content or error) in Flower's wire format."""
    data: bytes = message_to_proto(message).SerializeToString()
    return data


def message_from_bytes(data: bytes) -> Message:
    """The inverse of :func:`message_to_bytes`; needs no ``TaskIdentity``."""
    proto = ProtoMessage.FromString(data)
    if proto.HasField("content") and proto.HasField("error"):
        # Flower's own refusal would quote its constructor's signature at the peer.
        raise ValueError("a message carries content or an error, not both")
    if not proto.HasField("content") and not proto.HasField("error"):
        # proto3 drops an empty RecordDict from the bytes: a reply with no records (what a
        # "query.finish" acknowledgement carries) reads back as one with empty content.
        proto.content.SetInParent()
    message: Message = message_from_proto(proto)
    return message


def message_without_arrays(message: Message) -> tuple[bytes, list[tuple[str, ArrayRecord]]]:
    """``message`` in Flower's wire format with every ArrayRecord left empty (same keys, same
    order), and the ArrayRecords it had, in content order. No tensor data is copied."""
    arrays: list[tuple[str, ArrayRecord]] = []
    content = None
    if message.has_content():
        skeleton = RecordDict()
        for key, record in message.content.items():
            if isinstance(record, ArrayRecord):
                arrays.append((key, record))
                skeleton[key] = ArrayRecord()
            else:
                skeleton[key] = record
        content = recorddict_to_proto(skeleton)
    proto = ProtoMessage(
        metadata=metadata_to_proto(message.metadata),
        content=content,
        error=error_to_proto(message.error) if message.has_error() else None,
    )
    data: bytes = proto.SerializeToString()
    return data, arrays


class RunGrid(Grid):
    """The part of a Flower ``Grid`` that is the same for fedenc's grids: one run, fixed at
    construction (``self._run``, a :class:`Run`), and the deprecated-but-abstract
    ``create_message``. Subclasses provide the nodes and the message exchange."""

    _run: Run

    def set_run(self, run: Run) -> None:
        if run.run_id != self._run.run_id:
            raise ValueError(f"this grid serves run {self._run.run_id}, not {run.run_id}")
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)
