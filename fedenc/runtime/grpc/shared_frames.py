"""Serialized chunk frames shared between the master's streams.

A round sends the same encoder to every child, so the chunk frames of their streams are the same
bytes: chunk frames carry no message id of their own (0; they belong to the ``FlowerMessage``
frame before them), and a frame serialized for one stream is reused by the others, which saves
the master one copy of the encoder per child after the first.

Frames are keyed by the identity of the bytes they were cut from (a Flower ``Array``'s immutable
``data``, held by the entry so the identity cannot be reused) and their place in them. The cache
is bounded in bytes, least recently used out: streams that run far apart simply serialize again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Final

from fedenc.protocol.wire_chunks import RawChunk, chunk_frame

#: Enough for a 40 MB encoder to be serialized once per round for any number of children; a
#: bigger one is shared while the streams keep within this much of each other.
DEFAULT_BUDGET_BYTES: Final = 64 * 1024 * 1024


class SharedFrames:
    """Chunk frames (message id 0) by source and position; thread-safe."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._frames: OrderedDict[tuple[int, str, int, int], tuple[object, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def frame(self, chunk: RawChunk) -> bytes:
        """The serialized frame of ``chunk``: the one already made for its source, or a new one
        (kept when ``chunk.source`` is set and it fits the budget)."""
        if chunk.source is None or self.budget_bytes == 0:
            return chunk_frame(0, chunk)
        key = (id(chunk.source), chunk.name, chunk.offset, len(chunk.data))
        with self._lock:
            entry = self._frames.get(key)
            if entry is not None and entry[0] is chunk.source:
                self._frames.move_to_end(key)
                self.hits += 1
                return entry[1]
        data = chunk_frame(0, chunk)
        with self._lock:
            self.misses += 1
            if len(data) <= self.budget_bytes and key not in self._frames:
                self._frames[key] = (chunk.source, data)
                self._bytes += len(data)
                while self._bytes > self.budget_bytes:
                    _, (_, old) = self._frames.popitem(last=False)
                    self._bytes -= len(old)
        return data

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._bytes = 0
