"""Flower's node-side contract for calling a ClientApp, shared by fedenc's runtimes, and how
runtimes find an app by reference (``"nodes.child:app"``).

A ClientApp that raises, or returns something other than a reply to the message, yields Flower's
error reply (code 2, ``CLIENT_APP_RAISED_EXCEPTION``), as SuperNode and simulation do; the
exception is logged with its traceback on the node.
"""

from __future__ import annotations

import importlib
import logging
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedenc.runtime import flower_compat as fc

log = logging.getLogger(__name__)

ClientCallable = Callable[[Message, Context], Message]

persistent_host: ContextVar[bool] = ContextVar("persistent_host", default=False)
"""True while fedenc's own runtimes (in-process grid, worker pool, ``fedenc child``) call a
ClientApp: they run every message of a node in the same process, so a ClientApp may keep state
in memory between them. Flower's deployment runtime starts a new process per message (and its
simulation may hand a node's messages to different actors): there, only ``Context.state``
carries anything from one message to the next."""


def call_client_app(
    client_app: ClientApp | ClientCallable, message: Message, context: Context, label: str
) -> Message:
    """A reply to ``message`` from ``client_app``, or an error reply; ``label`` names the node in
    logs."""
    token = persistent_host.set(True)
    try:
        reply = client_app(message, context)
    except Exception as err:  # the app's failure becomes the reply, as in Flower's runtimes
        log.warning(
            "%s: ClientApp raised on %s: %s\n%s",
            label,
            message.metadata.message_type,
            err,
            traceback.format_exc(),
        )
        reason = f"{type(err).__name__}: {err}"
        return fc.error_reply(message, fc.CLIENT_APP_RAISED_EXCEPTION, reason)
    finally:
        persistent_host.reset(token)
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
