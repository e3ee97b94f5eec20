"""Send turns (fedenc.runtime.grpc.send_turns): large messages start one at a time,
work-conserving, and a stream waiting for its turn keeps its child hearing from the master."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.runtime.grpc.connection import ChildConnection, _Item
from fedenc.runtime.grpc.send_turns import SendTurns


def _send(turns: SendTurns, name: str, frames: int, gap: float, log: list[str]) -> None:
    """A stream sending one message of ``frames`` frames, one every ``gap`` seconds."""
    with turns.turn() as turn:
        turn.wait()
        for i in range(frames):
            turn.progress()
            log.append(f"{name}{i}")
            time.sleep(gap)


def _start(*args: object) -> threading.Thread:
    thread = threading.Thread(target=_send, args=args)
    thread.start()
    return thread


def test_messages_start_one_after_the_other_while_each_makes_progress() -> None:
    turns = SendTurns(patience=1.0)
    log: list[str] = []
    a = _start(turns, "a", 5, 0.01, log)
    while len(turns) == 0:
        time.sleep(0.001)
    b = _start(turns, "b", 3, 0.0, log)
    a.join(5)
    b.join(5)
    assert log == ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
    assert len(turns) == 0


def test_a_stalled_message_lets_the_next_start_and_a_started_one_is_never_held() -> None:
    turns = SendTurns(patience=0.05)
    stalled, release = threading.Event(), threading.Event()
    log: list[str] = []

    def slow() -> None:  # one frame, then held (gRPC's flow control) until released
        with turns.turn() as turn:
            turn.wait()
            turn.progress()
            log.append("slow0")
            stalled.set()
            release.wait(5)
            turn.progress()
            log.append("slow1")

    a = threading.Thread(target=slow)
    a.start()
    stalled.wait(5)
    t0 = time.monotonic()
    with turns.turn() as turn:
        assert turn.wait(timeout=2.0)  # the first in line is stalled: start anyway
        waited = time.monotonic() - t0
        log.append("b0")
        release.set()  # the first goes on; the started message is not held again
        a.join(5)
        turn.progress()
        log.append("b1")
    assert log == ["slow0", "b0", "slow1", "b1"]
    assert 0.04 <= waited < 2.0


def test_waiting_times_out_while_the_first_makes_progress() -> None:
    turns = SendTurns(patience=0.2)
    stop = threading.Event()

    def busy() -> None:
        with turns.turn() as turn:
            turn.wait()
            while not stop.is_set():
                turn.progress()
                time.sleep(0.01)

    a = threading.Thread(target=busy)
    a.start()
    while len(turns) == 0:
        time.sleep(0.001)
    with turns.turn() as turn:
        assert not turn.wait(timeout=0.3)
        stop.set()
        assert turn.wait(timeout=5.0)
    a.join(5)


def test_the_next_in_line_gets_a_fresh_turn_however_long_it_waited() -> None:
    # The second message took its place long ago and is busy (not waiting) when its turn comes:
    # it must not count as stalled at once, or a third one arriving then would overtake it.
    turns = SendTurns(patience=0.5)
    log: list[str] = []
    b_in_line = threading.Event()

    def second() -> None:
        with turns.turn() as turn:
            b_in_line.set()
            time.sleep(0.8)  # serializing, say; the first leaves meanwhile
            turn.wait()
            for i in range(3):
                turn.progress()
                log.append(f"b{i}")
                time.sleep(0.05)

    with turns.turn() as first:
        first.wait()
        b = threading.Thread(target=second)
        b.start()
        b_in_line.wait(5)
        time.sleep(0.6)  # longer than the patience
        first.progress()
    c = _start(turns, "c", 1, 0.0, log)
    b.join(5)
    c.join(5)
    assert log == ["b0", "b1", "b2", "c0"]


def test_leaving_mid_message_gives_the_turn_on() -> None:
    turns = SendTurns(patience=5.0)
    log: list[str] = []

    def frames() -> Iterator[int]:
        with turns.turn() as turn:
            turn.wait()
            for i in range(10):
                turn.progress()
                yield i

    gen = frames()
    assert next(gen) == 0  # (the generator gRPC iterates) holds the turn...
    b = _start(turns, "b", 1, 0.0, log)
    time.sleep(0.05)
    assert log == []
    gen.close()  # ...until the stream ends mid-message
    b.join(5)
    assert log == ["b0"] and len(turns) == 0


@pytest.mark.parametrize("bad", [0, -1.0])
def test_patience_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="patience"):
        SendTurns(bad)


class _Owner:
    def welcome(self, conn: object, hello: object) -> None:
        return None

    def reply(self, conn: object, message: object, sent: object) -> None:
        pass

    def gone(self, conn: object, reason: str) -> None:
        pass

    def count(self, sent: int, received: int) -> None:
        pass


def test_a_stream_waiting_for_its_turn_sends_heartbeats_then_its_message() -> None:
    turns = SendTurns(patience=5.0)
    conn = ChildConnection(
        _Owner(), "test", {}, max_chunk_bytes=1024, max_array_bytes=None, turns=turns, keepalive=0.1
    )
    message = [spb.MasterMessage(close=spb.Close(detail=f"frame {i}")) for i in range(3)]
    conn._put(_Item(message, queued=True))
    out: list[str] = []
    stop = threading.Event()

    def drain() -> None:  # what gRPC does with ChildConnection.frames()
        for data in conn.frames():
            frame = spb.MasterMessage.FromString(data)
            kind = frame.WhichOneof("body")
            out.append(frame.close.detail if kind == "close" else str(kind))
            if len(out) > 100 or frame.close.detail == "frame 2":
                stop.set()
                return

    with turns.turn() as other:  # another stream is sending a large message
        other.wait()
        reader = threading.Thread(target=drain)
        reader.start()
        deadline = time.monotonic() + 0.55
        while time.monotonic() < deadline:
            other.progress()
            time.sleep(0.01)
        assert out and set(out) == {"heartbeat"}  # nothing of the message yet, but not silent
    assert stop.wait(5)
    reader.join(5)
    assert out[-3:] == ["frame 0", "frame 1", "frame 2"]
    assert 3 <= out.count("heartbeat") <= 7
