"""What a node does with one message: Flower's node-side contract, shared by fedenc's runtimes.

A ClientApp call either returns a reply to the message or fails; a failure becomes Flower's error
reply (code 2, ``CLIENT_APP_RAISED_EXCEPTION``), as a SuperNode and Flower's simulation do, so the
master sees the same thing whichever runtime hosts the child.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedenc.runtime import flower_compat as fc

log = logging.getLogger(__name__)

ClientCallable = Callable[[Message, Context], Message]


def handle_message(app: ClientApp | ClientCallable, message: Message, context: Context) -> Message:
    """``app``'s reply to ``message``, or an error reply naming what went wrong."""
    try:
        reply = app(message, context)
    except Exception as err:
        log.warning(
            "node %d: ClientApp raised on %s: %s\n%s",
            context.node_id,
            message.metadata.message_type,
            err,
            traceback.format_exc(),
        )
        reason = f"{type(err).__name__}: {err}"
        return fc.error_reply(message, fc.CLIENT_APP_RAISED_EXCEPTION, reason)
    if (
        not isinstance(reply, Message)
        or reply.metadata.reply_to_message_id != message.metadata.message_id
    ):
        reason = "the ClientApp did not return a reply to the message"
        return fc.error_reply(message, fc.CLIENT_APP_RAISED_EXCEPTION, reason)
    return reply


def load_app(reference: str) -> Any:
    """The object named by ``"package.module:attribute"`` (how Flower names its apps)."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(
            f"an app reference looks like 'package.module:attribute', not {reference!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import {module_name!r} for app {reference!r}: {err}") from err
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attribute!r}") from None
    if not callable(target):
        raise ValueError(f"{reference!r} is not a ClientApp or a callable")
    return target
