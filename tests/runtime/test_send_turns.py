"""Send turns (fedenc.runtime.grpc.send_turns): one large message at a time, work-conserving."""

from __future__ import annotations

import threading
import time

import pytest

from fedenc.runtime.grpc.send_turns import SendTurns


def _sender(turns: SendTurns, name: str, frames: int, gap: float, log: list[str]) -> None:
    with turns.turn() as wait:
        for i in range(frames):
            wait()
            log.append(f"{name}{i}")
            time.sleep(gap)


def test_messages_are_sent_one_after_the_other_while_each_makes_progress() -> None:
    turns = SendTurns(patience=1.0)
    log: list[str] = []
    first_in_line = threading.Event()

    def first() -> None:
        with turns.turn() as wait:
            first_in_line.set()
            for i in range(5):
                wait()
                log.append(f"a{i}")
                time.sleep(0.01)

    a = threading.Thread(target=first)
    a.start()
    first_in_line.wait(5)
    b = threading.Thread(target=_sender, args=(turns, "b", 3, 0.0, log))
    b.start()
    a.join(5)
    b.join(5)
    assert log == ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
    assert len(turns) == 0


def test_a_stalled_stream_lets_the_next_send_meanwhile() -> None:
    turns = SendTurns(patience=0.05)
    stalled = threading.Event()
    release = threading.Event()
    log: list[str] = []

    def slow() -> None:  # one frame, then held (gRPC's flow control) until released
        with turns.turn() as wait:
            wait()
            log.append("slow0")
            stalled.set()
            release.wait(5)
            wait()
            log.append("slow1")

    a = threading.Thread(target=slow)
    a.start()
    stalled.wait(5)
    t0 = time.monotonic()
    _sender(turns, "b", 3, 0.0, log)  # must not wait for the stalled stream to finish
    waited = time.monotonic() - t0
    release.set()
    a.join(5)
    assert log == ["slow0", "b0", "b1", "b2", "slow1"]
    assert 0.04 <= waited < 2.0


def test_the_next_in_line_gets_a_fresh_turn_however_long_it_waited() -> None:
    # The second stream took its place long ago and is busy (not in wait()) when its turn comes:
    # it must not count as stalled at once, or a third one arriving then would overtake it.
    turns = SendTurns(patience=0.5)
    log: list[str] = []
    b_in_line = threading.Event()

    def second() -> None:
        with turns.turn() as wait:
            b_in_line.set()
            time.sleep(0.8)  # serializing, say; the first leaves meanwhile
            for i in range(3):
                wait()
                log.append(f"b{i}")
                time.sleep(0.05)

    with turns.turn() as wait_a:
        wait_a()
        b = threading.Thread(target=second)
        b.start()
        b_in_line.wait(5)
        time.sleep(0.6)  # longer than the patience
        wait_a()
    c = threading.Thread(target=_sender, args=(turns, "c", 1, 0.0, log))
    c.start()
    b.join(5)
    c.join(5)
    assert log == ["b0", "b1", "b2", "c0"]


def test_leaving_mid_message_gives_the_turn_on() -> None:
    turns = SendTurns(patience=5.0)
    log: list[str] = []

    def frames() -> object:
        with turns.turn() as wait:
            for i in range(10):
                wait()
                yield i

    gen = frames()
    assert next(gen) == 0  # (the generator gRPC iterates) holds the turn...
    t = threading.Thread(target=_sender, args=(turns, "b", 1, 0.0, log))
    t.start()
    time.sleep(0.05)
    assert log == []
    gen.close()  # ...until the stream ends mid-message
    t.join(5)
    assert log == ["b0"] and len(turns) == 0


@pytest.mark.parametrize("bad", [0, -1.0])
def test_patience_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="patience"):
        SendTurns(bad)
