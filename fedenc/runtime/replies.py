"""Replies handed over one by one as they arrive: the ``receive`` of fedenc's grids.

Both grids keep replies in a dict under a ``threading.Condition`` that is notified on every
delivery; :func:`stream_replies` waits on it (no polling) and yields each reply to the wanted
message ids as soon as it is there, outside the lock, so the master folds one reply while the
children still train. What has not come when ``timeout`` runs out is forgotten through the grid's
own ``forget`` (a late reply is then dropped on delivery, as with ``send_and_receive``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from flwr.app import Message

log = logging.getLogger(__name__)

#: Seconds between two calls of a ``stop`` check while a wait goes on.
STOP_CHECK_S = 0.5


def stream_replies(
    lock: threading.Condition,
    replies: dict[str, Message],
    message_ids: Sequence[str],
    timeout: float | None,
    forget: Callable[[list[str]], None],
    stop: Callable[[], None] | None = None,
) -> Iterator[Message]:
    """Yield the replies to ``message_ids`` from ``replies`` as they are delivered (see above);
    ``forget`` runs under ``lock`` with the ids still missing at the end. ``stop`` is called at
    least every :data:`STOP_CHECK_S` while waiting; it ends the wait by raising."""
    deadline = None if timeout is None else time.monotonic() + timeout
    pending = list(message_ids)
    try:
        while pending:
            with lock:
                ready = [mid for mid in pending if mid in replies]
                while not ready:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return
                    if stop is not None:
                        stop()
                        left = STOP_CHECK_S if left is None else min(left, STOP_CHECK_S)
                    lock.wait(left)
                    ready = [mid for mid in pending if mid in replies]
                out = [replies.pop(mid) for mid in ready]
                forget(ready)
            pending = [mid for mid in pending if mid not in ready]
            yield from out
    finally:
        with lock:
            for mid in pending:
                replies.pop(mid, None)
            forget(pending)
        if pending:
            within = "before the wait ended" if timeout is None else f"within {timeout:g} s"
            log.info("%d of %d replies did not come %s", len(pending), len(message_ids), within)
