"""fedenc.protocol.peer_text: short text is kept whole, long text clipped with a count."""

from __future__ import annotations

from fedenc.protocol.peer_text import PEER_TEXT_LIMIT, clip


def test_short_text_is_kept_and_long_text_clipped_with_a_count() -> None:
    assert clip("goodbye") == "goodbye"
    long = "x" * (PEER_TEXT_LIMIT + 1234)
    assert clip(long) == "x" * PEER_TEXT_LIMIT + "... (1,234 more characters)"
