"""Instructions pushed to fedenc's grids (in-process and gRPC): what both refuse, and the ids
both give them."""

from __future__ import annotations

from collections.abc import Iterator

from flwr.app import Message

from fedenc.runtime import flower_compat as fc


def stamp_instruction(message: Message, run_id: int, ids: Iterator[int]) -> str:
    """Check that ``message`` is an instruction of run ``run_id`` and give it the next id
    (``ins-NNNNNNNN``) from ``ids``; ``ValueError`` names what is wrong."""
    meta = message.metadata
    if meta.run_id != run_id:
        raise ValueError(f"message for run {meta.run_id} pushed to the grid of run {run_id}")
    if meta.reply_to_message_id:
        raise ValueError("cannot push a reply message as an instruction")
    message_id = f"ins-{next(ids):08d}"
    fc.set_message_id(message, message_id)
    return message_id
