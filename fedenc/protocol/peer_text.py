"""Text a peer sends (a goodbye's detail, a tensor name in a refusal, a requester), clipped before
it is logged, kept or echoed: a remote party must not make the master's memory, logs or replies
grow with the size of its strings (a 7 MB goodbye detail once broke ListChildren for good)."""

from __future__ import annotations

from typing import Final

#: Characters of peer text kept; the rest is replaced by a count.
PEER_TEXT_LIMIT: Final = 500


def clip(text: str, limit: int = PEER_TEXT_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how many were left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


__all__ = ["PEER_TEXT_LIMIT", "clip"]
