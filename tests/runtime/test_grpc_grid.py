"""The gRPC master's Grid over real loopback streams (children as threads of this process, or a
hand-written raw client for bad input): Flower's Grid contract as the in-process grid has it,
persistent Context, error replies, timeouts, lost children, handshake refusals, bad frames
refused with a reason while the master keeps serving, heartbeat timeouts, the identity seam."""

from __future__ import annotations

import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.proto.fedenc.v1 import tensor_pb2 as tpb
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.grpc.child import GrpcChild
from fedenc.runtime.grpc.frames import encode_message
from fedenc.runtime.grpc.master import FederationServer, GrpcGrid
from fedenc.runtime.grpc.transport import (
    CAPABILITIES,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    SERVICE_METHOD,
    ChannelSecurity,
    InsecureTransportError,
    ServerSecurity,
    channel_options,
)

RUN = 4242
INSECURE = ChannelSecurity(insecure=True)


def counter_app(msg: Message, ctx: Context) -> Message:
    """Counts its calls in context.state; echoes arrays; raises on 'query.boom'; sleeps on
    'query.sleep' for config['s'] seconds."""
    if msg.metadata.message_type == "query.boom":
        raise ValueError("kaput")
    if msg.metadata.message_type == "query.sleep":
        time.sleep(float(msg.content["config"]["s"]))
    record = ctx.state.config_records.get("c", ConfigRecord({"n": 0}))
    record["n"] = int(record["n"]) + 1
    ctx.state["c"] = record
    out = RecordDict(
        {"metrics": MetricRecord({"n": record["n"], "pid": int(ctx.node_config["partition-id"])})}
    )
    if "arrays" in msg.content.array_records:
        out["arrays"] = msg.content["arrays"]
    out["run"] = ConfigRecord({"x": ctx.run_config.get("x", "missing")})
    return Message(out, reply_to=msg)


@pytest.fixture
def server() -> Iterator[FederationServer]:
    srv = FederationServer(
        "127.0.0.1:0",
        ServerSecurity(insecure=True),
        heartbeat_interval=0.2,
        heartbeat_timeout=1.5,
        hello_timeout=1.0,
    ).start()
    try:
        yield srv
    finally:
        srv.stop(grace=0.5)


class Children:
    """GrpcChild threads, always stopped."""

    def __init__(self) -> None:
        self.items: list[tuple[GrpcChild, threading.Thread, list[int]]] = []

    def start(self, address: str, name: str, pid: int = 0, app: Any = counter_app) -> GrpcChild:
        child = GrpcChild(address, name, app, {"partition-id": pid}, INSECURE, connect_timeout=5)
        codes: list[int] = []
        thread = threading.Thread(target=lambda: codes.append(child.run()), daemon=True)
        thread.start()
        self.items.append((child, thread, codes))
        return child

    def stop_all(self) -> None:
        for child, _, _ in self.items:
            child.stop()
        for _, thread, _ in self.items:
            thread.join(10)


@pytest.fixture
def children() -> Iterator[Children]:
    c = Children()
    try:
        yield c
    finally:
        c.stop_all()


def msg(dst: int, kind: str = "query", content: RecordDict | None = None) -> Message:
    with fc.task_identity(RUN):
        return Message(content or RecordDict({"config": ConfigRecord({"a": 1})}), dst, kind)


def test_grid_contract_persistent_context_and_run_config(
    server: FederationServer, children: Children
) -> None:
    for i in range(2):
        children.start(server.address, f"c{i}", pid=i)
    assert server.wait_for_children(2, 10)
    grid = GrpcGrid(server, RUN, {"x": "from-the-run"})
    arrays = ArrayRecord({"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3))})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"a": 1})})
    nodes = grid.get_node_ids()
    assert len(nodes) == 2 and fc.SUPERLINK_NODE_ID not in nodes
    for round_ in (1, 2, 3):
        sent = [msg(nid, "train", content) for nid in nodes]  # one RecordDict for all
        replies = grid.send_and_receive(sent, timeout=10)
        assert len(replies) == 2
        ids = {m.metadata.message_id for m in sent}
        assert len(ids) == 2 and "" not in ids
        assert {r.metadata.reply_to_message_id for r in replies} == ids
        for reply in replies:
            assert reply.metadata.src_node_id in nodes
            assert reply.metadata.dst_node_id == fc.SUPERLINK_NODE_ID
            assert reply.metadata.run_id == RUN
            assert reply.content["metrics"]["n"] == round_  # one Context per run, kept
            assert reply.content["run"]["x"] == "from-the-run"
            np.testing.assert_array_equal(reply.content["arrays"]["w"].numpy(), arrays["w"].numpy())
    assert grid.bytes_sent > 6 * 24 and grid.bytes_received > 6 * 24
    assert sorted(server.children()) == ["c0", "c1"]


def test_error_replies_unknown_node_and_timeout(
    server: FederationServer, children: Children
) -> None:
    children.start(server.address, "c0")
    assert server.wait_for_children(1, 10)
    grid = GrpcGrid(server, RUN)
    (nid,) = grid.get_node_ids()
    raised, unknown = sorted(
        grid.send_and_receive([msg(nid, "query.boom"), msg(999)], timeout=10),
        key=lambda r: r.metadata.src_node_id,
    )
    assert raised.error.code == fc.CLIENT_APP_RAISED_EXCEPTION and "kaput" in raised.error.reason
    assert unknown.error.code == fc.NODE_UNAVAILABLE and "999" in unknown.error.reason
    # A reply 3 s late against a 0.3 s timeout: margins a loaded CI machine cannot blur.
    slow = msg(nid, "query.sleep", RecordDict({"config": ConfigRecord({"s": 3.0})}))
    t0 = time.monotonic()
    assert grid.send_and_receive([slow], timeout=0.3) == []  # not in time: left out
    assert time.monotonic() - t0 < 2.0
    # The late reply arrives and is dropped; the next exchange gets only its own reply.
    (ok,) = grid.send_and_receive([msg(nid)], timeout=10)
    assert ok.metadata.reply_to_message_id != slow.metadata.message_id and not ok.has_error()


def test_a_child_that_leaves_mid_message_gives_an_immediate_error_reply(
    server: FederationServer, children: Children
) -> None:
    child = children.start(server.address, "c0")
    assert server.wait_for_children(1, 10)
    grid = GrpcGrid(server, RUN)
    (nid,) = grid.get_node_ids()
    threading.Timer(0.5, child.stop, args=("test says goodbye",)).start()
    slow = msg(nid, "query.sleep", RecordDict({"config": ConfigRecord({"s": 5.0})}))
    t0 = time.monotonic()
    (reply,) = grid.send_and_receive([slow], timeout=30)
    assert time.monotonic() - t0 < 3.0  # not the 5 s of the ClientApp nor the timeout
    assert reply.error.code == fc.NODE_UNAVAILABLE and "goodbye" in reply.error.reason
    assert grid.get_node_ids() == []


def test_a_second_server_on_a_taken_port_fails_naming_it(server: FederationServer) -> None:
    # gRPC's default SO_REUSEPORT would let it bind too and take part of the children.
    with pytest.raises(OSError, match=re.escape(f"cannot listen on {server.address}: the port is")):
        FederationServer(server.address, ServerSecurity(insecure=True))
    with socket.socket() as other:  # a port another program holds
        other.bind(("127.0.0.1", 0))
        other.listen()
        taken = f"127.0.0.1:{other.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot listen on {taken}"):
            FederationServer(taken, ServerSecurity(insecure=True))


def test_plaintext_needs_an_explicit_flag() -> None:
    with pytest.raises(InsecureTransportError, match="insecure"):
        FederationServer("127.0.0.1:0", ServerSecurity())
    with pytest.raises(InsecureTransportError, match="insecure"):
        GrpcChild("127.0.0.1:1", "c", counter_app, {}, ChannelSecurity())


# -- raw clients: handshake refusals and bad frames ------------------------------------------------


class RawChild:
    """A hand-written peer that sends whatever frames it is given."""

    def __init__(self, address: str) -> None:
        # A peer that may send more than the master accepts (the limits are the master's).
        options = [
            *(o for o in channel_options() if o[0] != "grpc.max_send_message_length"),
            ("grpc.max_send_message_length", 4 * MAX_FRAME_BYTES),
        ]
        self.channel = grpc.insecure_channel(address, options=options)
        self.out: queue.Queue[bytes | None] = queue.Queue()
        self.inbox: queue.Queue[spb.MasterMessage | Exception] = queue.Queue()
        self.call = self.channel.stream_stream(SERVICE_METHOD)(iter(self.out.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for data in self.call:
                self.inbox.put(spb.MasterMessage.FromString(data))
        except Exception as err:
            self.inbox.put(err)

    def send(self, frame: spb.ChildMessage | bytes) -> None:
        self.out.put(frame if isinstance(frame, bytes) else frame.SerializeToString())

    def hello(self, name: str, version: int = PROTOCOL_VERSION) -> spb.MasterMessage:
        self.send(
            spb.ChildMessage(
                hello=spb.Hello(
                    name=name, protocol_version=version, capabilities=list(CAPABILITIES)
                )
            )
        )
        return self.next("welcome", "close")

    def next(self, *kinds: str, timeout: float = 5.0) -> spb.MasterMessage:
        deadline = time.monotonic() + timeout
        while True:
            item = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, Exception):
                raise AssertionError(f"stream ended without {kinds}: {item}")
            if item.WhichOneof("body") in kinds:
                return item

    def close(self) -> None:
        self.out.put(None)
        self.call.cancel()
        self.channel.close()


@pytest.fixture
def raw(server: FederationServer) -> Iterator[Callable[[], RawChild]]:
    made: list[RawChild] = []

    def make() -> RawChild:
        made.append(RawChild(server.address))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_handshake_refusals(server: FederationServer, raw: Callable[[], RawChild]) -> None:
    first = raw()
    assert first.hello("alice").welcome.node_id > fc.SUPERLINK_NODE_ID
    twin = raw().hello("alice")  # a second stream claiming a connected identity
    assert twin.close.reason == spb.CLOSE_REASON_DUPLICATE_IDENTITY and "alice" in twin.close.detail
    old = raw().hello("bob", version=99)
    assert old.close.reason == spb.CLOSE_REASON_INCOMPATIBLE and "99" in old.close.detail
    mute = raw()
    mute.send(spb.ChildMessage(heartbeat=spb.Heartbeat()))
    closed = mute.next("close")
    assert closed.close.reason == spb.CLOSE_REASON_PROTOCOL_ERROR
    assert "first frame must be a Hello" in closed.close.detail
    silent = raw()  # never says hello
    closed = silent.next("close", timeout=5)
    assert "no Hello within" in closed.close.detail
    chatty = raw()  # an agent string the master would log and list for every Control client
    chatty.send(
        spb.ChildMessage(
            hello=spb.Hello(
                name="carol",
                protocol_version=PROTOCOL_VERSION,
                capabilities=list(CAPABILITIES),
                agent="x" * 5000,
            )
        )
    )
    closed = chatty.next("close")
    assert "Hello.agent has 5000 characters, at most 256" in closed.close.detail
    unnamed = raw().hello("")
    assert "1 to 256 printable characters" in unnamed.close.detail
    assert list(server.children()) == ["alice"]


def test_a_child_whose_name_is_taken_says_so_when_it_gives_up(
    server: FederationServer, children: Children, caplog: pytest.LogCaptureFixture
) -> None:
    children.start(server.address, "alice")  # heartbeats: it keeps its stream
    assert server.wait_for_children(1, 10)
    twin = GrpcChild(server.address, "alice", counter_app, {}, INSECURE, connect_timeout=1)
    assert twin.run() == 1
    assert "the master still has a child named 'alice'" in caplog.text


def _instruction(
    server: FederationServer, name: str, raw: Callable[[], RawChild]
) -> tuple[RawChild, GrpcGrid, Message, spb.MasterMessage]:
    """A raw child named ``name`` receiving one 'train' message with a 2x3 float32 array."""
    peer = raw()
    node = peer.hello(name).welcome.node_id
    grid = GrpcGrid(server, RUN)
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones((2, 3), dtype=np.float32))})})
    instruction = msg(node, "train", content)
    result: list[list[Message]] = []
    threading.Thread(
        target=lambda: result.append(grid.send_and_receive([instruction], timeout=5)), daemon=True
    ).start()
    frame = peer.next("flower")
    return peer, grid, instruction, frame


def _reply_frames(
    instruction: Message, node: int, array: np.ndarray, reply_to: int
) -> list[spb.ChildMessage]:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(array)})})
    reply = Message(content, reply_to=instruction)
    encoded = encode_message(reply)
    return [spb.ChildMessage(reply_to=reply_to, flower=encoded.frame)] + [
        spb.ChildMessage(chunk=c.to_proto()) for c in encoded.chunks
    ]


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("garbage", "undecodable frame"),
        ("never_sent", "no message the master sent"),
        ("wrong_shape", r"shape \[3, 2\], expected \[2, 3\]"),
        ("wrong_dtype", "dtype float64, expected float32"),
        ("wrong_name", "missing"),
        ("missing_chunk", "FlowerMessage frame while the chunks"),
        ("stray_chunk", "without a FlowerMessage"),
        ("error_and_content", "carries content or an error, not both"),
        ("out_of_order", "out of order|overlaps|leaves bytes"),
        ("huge_extra_record", r"'junk': header declares 3221225472 bytes, more than \d+"),
    ],
)
def test_bad_frames_are_refused_and_the_master_keeps_serving(
    server: FederationServer,
    raw: Callable[[], RawChild],
    children: Children,
    case: str,
    match: str,
) -> None:
    good = children.start(server.address, "good")
    peer, grid, instruction, frame = _instruction(server, "rogue", raw)
    node, wire = instruction.metadata.dst_node_id, frame.message_id
    ok = np.ones((2, 3), dtype=np.float32)
    frames: list[spb.ChildMessage | bytes]
    if case == "garbage":
        frames = [b"\x0a\xff\xff\xff\xff"]
    elif case == "never_sent":
        frames = list(_reply_frames(instruction, node, ok, wire + 1000))
    elif case == "wrong_shape":
        frames = list(_reply_frames(instruction, node, ok.reshape(3, 2), wire))
    elif case == "wrong_dtype":
        frames = list(_reply_frames(instruction, node, ok.astype(np.float64), wire))
    elif case == "wrong_name":
        reply = Message(RecordDict({"arrays": ArrayRecord({"v": Array(ok)})}), reply_to=instruction)
        encoded = encode_message(reply)
        frames = [spb.ChildMessage(reply_to=wire, flower=encoded.frame)]
    elif case == "missing_chunk":
        big = np.ones((2, 3), dtype=np.float32)
        first = _reply_frames(instruction, node, big, wire)
        frames = [first[0], first[0]]  # the chunks never come, another message does
    elif case == "huge_extra_record":
        # A record the instruction did not have is not checked tensor by tensor; announcing
        # 3 GiB in it is refused from the header, before any buffer exists.
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(ok)}),
                "junk": ArrayRecord({"x": Array(np.zeros(4, dtype=np.uint8))}),
            }
        )
        encoded = encode_message(Message(content, reply_to=instruction))
        (junk,) = [h for h in encoded.frame.array_records if h.key == "junk"]
        junk.tensors.tensors[0].spec.shape[:] = [3 * 2**30]
        junk.tensors.tensors[0].byte_length = 3 * 2**30
        frames = [spb.ChildMessage(reply_to=wire, flower=encoded.frame)]
    elif case == "error_and_content":
        first = _reply_frames(instruction, node, ok, wire)
        skeleton = ProtoMessage.FromString(first[0].flower.message)
        skeleton.error.code, skeleton.error.reason = 1, "and content too"
        first[0].flower.message = skeleton.SerializeToString()
        frames = first
    elif case == "stray_chunk":
        frames = [spb.ChildMessage(chunk=tpb.TensorChunk(name="w", offset=0, data=b"x"))]
    else:
        first = _reply_frames(instruction, node, ok, wire)
        chunk = first[1].chunk
        chunk.offset, chunk.data, chunk.last = 4, chunk.data[4:8], False  # skips bytes [0, 4)
        frames = first
    for f in frames:
        peer.send(f)
    closed = peer.next("close")
    assert closed.close.reason == spb.CLOSE_REASON_PROTOCOL_ERROR
    assert re.search(match, closed.close.detail), closed.close.detail
    # The rogue is gone; the master still serves the good child.
    deadline = time.monotonic() + 5
    while "rogue" in server.children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "rogue" not in server.children()
    assert server.wait_for_children(1, 10)
    good_node = server.children()["good"]
    (reply,) = grid.send_and_receive([msg(good_node)], timeout=10)
    assert not reply.has_error() and reply.content["metrics"]["n"] == 1
    assert good.sessions == 1


@pytest.mark.parametrize("excess", [1024, 3 * MAX_FRAME_BYTES])
def test_an_oversized_frame_ends_that_stream_only(
    server: FederationServer, raw: Callable[[], RawChild], children: Children, excess: int
) -> None:
    children.start(server.address, "good")
    peer = raw()
    peer.hello("big")
    peer.send(b"\x00" * (MAX_FRAME_BYTES + excess))
    if excess < MAX_FRAME_BYTES:  # read, and refused by name: the child is told its size
        closed = peer.next("close", timeout=5)
        assert closed.close.reason == spb.CLOSE_REASON_PROTOCOL_ERROR
        assert f"a frame of {MAX_FRAME_BYTES + excess:,} bytes, over the" in closed.close.detail
    deadline = time.monotonic() + 5  # (far larger: gRPC ends the stream before any parsing)
    while "big" in server.children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "big" not in server.children() and "good" in server.children()


def test_a_silent_child_is_dropped_after_the_heartbeat_timeout(
    server: FederationServer, raw: Callable[[], RawChild]
) -> None:
    peer = raw()
    peer.hello("quiet")  # then never sends a frame again
    assert peer.next("heartbeat").heartbeat.sent_at_unix_ms > 0
    closed = peer.next("close", timeout=5)
    assert closed.close.reason == spb.CLOSE_REASON_TIMEOUT
    assert "quiet" not in server.children()


def test_a_busy_child_keeps_its_stream_through_long_work_by_heartbeats(
    server: FederationServer, children: Children
) -> None:
    children.start(server.address, "worker")
    assert server.wait_for_children(1, 10)
    grid = GrpcGrid(server, RUN)
    (nid,) = grid.get_node_ids()
    # 2.5 s of "training": longer than the 1.5 s heartbeat timeout.
    slow = msg(nid, "query.sleep", RecordDict({"config": ConfigRecord({"s": 2.5})}))
    conn = server.connection(nid)
    assert conn is not None
    busy: list[bool] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            busy.append(conn.busy)

    threading.Thread(target=sample, daemon=True).start()
    (reply,) = grid.send_and_receive([slow], timeout=10)
    done.set()
    assert not reply.has_error()
    assert server.connection(nid) is conn  # the same stream, never dropped
    assert True in busy  # the child's heartbeats said it was busy


def test_identity_callback_refuses_unknown_or_mismatched_children() -> None:
    seen: list[dict[str, list[bytes]]] = []

    def identify(auth: Any) -> str | None:
        seen.append(dict(auth))
        return "allowed" if seen and len(seen) > 1 else None

    srv = FederationServer(
        "127.0.0.1:0", ServerSecurity(insecure=True, identify=identify), hello_timeout=1.0
    ).start()
    peers: list[RawChild] = []
    try:
        # Refused when the stream opens: aborted with PERMISSION_DENIED, before any Hello.
        peers.append(RawChild(srv.address))
        with pytest.raises(AssertionError, match=r"PERMISSION_DENIED.*name no child"):
            peers[-1].hello("allowed")
        peers.append(RawChild(srv.address))
        mismatch = peers[-1].hello("mallory")
        assert mismatch.close.reason == spb.CLOSE_REASON_UNAUTHORIZED
        assert "'allowed'" in mismatch.close.detail and "'mallory'" in mismatch.close.detail
        assert seen and all("transport_security_type" in a for a in seen)
        peers.append(RawChild(srv.address))
        assert peers[-1].hello("allowed").HasField("welcome")
    finally:
        for p in peers:
            p.close()
        srv.stop(grace=0.5)


def test_a_refused_child_exits_with_code_3() -> None:
    srv = FederationServer(
        "127.0.0.1:0", ServerSecurity(insecure=True, identify=lambda auth: None)
    ).start()
    try:
        child = GrpcChild(srv.address, "x", counter_app, {}, INSECURE, connect_timeout=5)
        assert child.run() == 3
    finally:
        srv.stop(grace=0.5)


def test_an_unreachable_master_exits_with_code_1_after_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every failed dial was a WARNING, every 5 s for as long as the master was down.
    child = GrpcChild("127.0.0.1:1", "x", counter_app, {}, INSECURE, connect_timeout=2.5)
    t0 = time.monotonic()
    with caplog.at_level("DEBUG", logger="fedenc"):
        assert child.run() == 1
    assert time.monotonic() - t0 < 15
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "x:" in r.getMessage()]
    assert len(warnings) == 1 and "stream lost" in warnings[0].getMessage()
    assert any("no connection:" in r.getMessage() for r in caplog.records)  # the rest: debug


def test_the_grid_hands_replies_over_as_they_arrive(
    server: FederationServer, children: Children
) -> None:
    """``receive`` (what the master folds from) yields each reply when its child delivers it,
    not when the slowest child is done; what misses the timeout is dropped."""
    for i in range(2):
        children.start(server.address, f"c{i}", pid=i)
    assert server.wait_for_children(2, 10)
    grid = GrpcGrid(server, RUN)
    fast_node, slow_node = grid.get_node_ids()
    slow = msg(slow_node, "query.sleep", RecordDict({"config": ConfigRecord({"s": 3.0})}))
    ids = grid.push_messages([msg(fast_node), slow])
    t0 = time.monotonic()
    stream = grid.receive(ids, timeout=10)
    first = next(stream)
    assert first.metadata.src_node_id == fast_node and time.monotonic() - t0 < 2.5
    second = next(stream)
    assert second.metadata.src_node_id == slow_node and time.monotonic() - t0 >= 2.9
    assert list(stream) == []
    late = msg(slow_node, "query.sleep", RecordDict({"config": ConfigRecord({"s": 1.0})}))
    assert list(grid.receive(grid.push_messages([late]), timeout=0.2)) == []


# -- inbound admission: replies' tensors are assembled one at a time -------------------------------


@pytest.mark.parametrize("slots", [1, 0])
def test_inbound_slots_hold_a_second_reply_until_the_first_is_assembled(slots: int) -> None:
    srv = FederationServer(
        "127.0.0.1:0",
        ServerSecurity(insecure=True),
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        inbound_slots=slots,
    ).start()
    peers: list[tuple[RawChild, int]] = []
    try:
        for name in ("a", "b"):
            peer = RawChild(srv.address)
            peers.append((peer, peer.hello(name).welcome.node_id))
        grid = GrpcGrid(srv, RUN)
        array = np.arange(6, dtype=np.float32).reshape(2, 3)
        content = RecordDict({"arrays": ArrayRecord({"w": Array(array)})})
        instructions = [msg(node, "train", content) for _, node in peers]
        ids = grid.push_messages(instructions)
        arrived: list[Message] = []
        threading.Thread(target=lambda: arrived.extend(grid.receive(ids, 10)), daemon=True).start()
        wires = [peer.next("flower").message_id for peer, _ in peers]
        replies = [  # the 24-byte array in six 4-byte chunks
            encode_message(
                Message(RecordDict({"arrays": ArrayRecord({"w": Array(array)})}), reply_to=ins),
                max_chunk_bytes=4,
            )
            for ins in instructions
        ]
        (a, node_a), (b, node_b) = peers
        chunks_a = [spb.ChildMessage(chunk=c.to_proto()) for c in replies[0].chunks]
        a.send(spb.ChildMessage(reply_to=wires[0], flower=replies[0].frame))
        a.send(chunks_a[0])  # a holds the slot, its reply partly assembled
        time.sleep(0.1)
        b.send(spb.ChildMessage(reply_to=wires[1], flower=replies[1].frame))
        for c in replies[1].chunks:
            b.send(spb.ChildMessage(chunk=c.to_proto()))
        for c in chunks_a[1:-1]:  # a trickles on for 1.6 s, longer than the heartbeat timeout
            time.sleep(0.4)
            a.send(c)
        got = [m.metadata.src_node_id for m in arrived]
        assert got == ([] if slots else [node_b])  # with a slot, b waits for a
        a.send(chunks_a[-1])
        deadline = time.monotonic() + 5
        while len(arrived) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(m.has_error() for m in arrived)  # b was held back, not timed out
        got = [m.metadata.src_node_id for m in arrived]
        assert got == ([node_a, node_b] if slots else [node_b, node_a])
        if slots:  # (without, b's raw peer has been silent since its reply: dropped, rightly)
            assert sorted(srv.children()) == ["a", "b"]
    finally:
        for peer, _ in peers:
            peer.close()
        srv.stop(grace=0.5)


def test_a_child_that_finds_no_master_says_why_when_it_gives_up(
    free_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    def app(message: Message, context: Context) -> Message:
        raise AssertionError("no master, no message")

    address = f"127.0.0.1:{free_port}"
    child = GrpcChild(address, "site-a", app, {}, ChannelSecurity(insecure=True), connect_timeout=1)
    assert child.run() == 1
    assert f"no connection to {address} within 1 s" in caplog.text
    assert "connection refused: no master listens there yet" in caplog.text


def test_frames_protocol_1_does_not_use_are_refused_with_what_carries_them(
    raw: Callable[[], RawChild],
) -> None:
    from fedenc.proto.fedenc.v1 import federation_pb2 as fpb

    child = raw()
    assert child.hello("dave").welcome.node_id > 0
    child.send(spb.ChildMessage(encoder_request=fpb.EncoderRequest(encoder_type="srgnn")))
    closed = child.next("close")
    assert closed.close.reason == spb.CLOSE_REASON_PROTOCOL_ERROR
    assert "unexpected encoder_request frame" in closed.close.detail
    assert "use Control.RequestEncoder" in closed.close.detail


def test_the_grid_names_a_node_by_its_hello_also_after_it_left(
    server: FederationServer, raw: Callable[[], RawChild]
) -> None:
    peer = raw()
    node = peer.hello("erin").welcome.node_id
    grid = GrpcGrid(server, RUN)
    assert grid.node_name(node) == "erin"
    assert grid.node_name(node + 1000) is None
    peer.close()  # gone (or revoked): reports still name it "erin", not "node-N"
    deadline = time.monotonic() + 5
    while "erin" in server.children() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "erin" not in server.children() and grid.node_name(node) == "erin"


def test_streams_before_their_hello_count_against_max_children() -> None:
    # A flood of streams that never say Hello had taken every server slot, the Control API's
    # included: beyond max_children open streams, a new one is refused at once.
    srv = FederationServer(
        "127.0.0.1:0", ServerSecurity(insecure=True), max_children=2, hello_timeout=5.0
    ).start()
    peers = [RawChild(srv.address) for _ in range(2)]
    try:
        deadline = time.monotonic() + 5
        while len(srv._all) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        peers.append(RawChild(srv.address))
        item = peers[2].inbox.get(timeout=5)
        assert isinstance(item, grpc.RpcError), item
        assert item.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the master takes at most 2 children" in str(item.details())
    finally:
        for p in peers:
            p.close()
        srv.stop(grace=0.5)


def test_the_master_cuts_its_messages_to_the_chunk_size_a_hello_asks_for(
    server: FederationServer, raw: Callable[[], RawChild]
) -> None:
    # Hello.max_chunk_bytes was read by no one: a child that asked for 64 KiB got 4 MiB chunks.
    def hello(name: str, chunk: int) -> tuple[RawChild, spb.MasterMessage]:
        peer = raw()
        peer.send(
            spb.ChildMessage(
                hello=spb.Hello(
                    name=name,
                    protocol_version=PROTOCOL_VERSION,
                    capabilities=list(CAPABILITIES),
                    max_chunk_bytes=chunk,
                )
            )
        )
        return peer, peer.next("welcome", "close")

    _, tiny = hello("tiny", 1024)
    assert tiny.close.reason == spb.CLOSE_REASON_INCOMPATIBLE
    assert "max_chunk_bytes 1024 is below the 65536 bytes" in tiny.close.detail
    peer, answer = hello("small", 64 * 1024)
    assert answer.welcome.max_chunk_bytes == 64 * 1024
    grid = GrpcGrid(server, RUN)
    big = np.ones((1000, 100), dtype=np.float32)  # 400,000 bytes: 7 chunks of 64 KiB
    content = RecordDict({"arrays": ArrayRecord({"w": Array(big)})})
    train = msg(answer.welcome.node_id, "train", content)
    threading.Thread(target=lambda: grid.send_and_receive([train], timeout=5), daemon=True).start()
    peer.next("flower")
    sizes: list[int] = []
    while True:
        chunk = peer.next("chunk").chunk
        sizes.append(len(chunk.data))
        if chunk.last:
            break
    assert max(sizes) <= 64 * 1024 and sum(sizes) == big.nbytes and len(sizes) == 7


def test_a_child_told_restart_waits_for_the_resume_then_exits_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # RESTART: keep the job's state and dial again; a master that never comes back ends the
    # wait cleanly (exit 0), not as an unreachable master (exit 1).
    server = FederationServer("127.0.0.1:0", ServerSecurity(insecure=True)).start()
    child = GrpcChild(server.address, "r", counter_app, {}, INSECURE, connect_timeout=2)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(child.run()), daemon=True)
    with caplog.at_level("INFO", logger="fedenc"):
        thread.start()
        assert server.wait_for_children(1, 10)
        server.stop("the master was stopped (SIGTERM)", reason=spb.CLOSE_REASON_RESTART)
        thread.join(30)
    assert codes == [0]
    assert "keeping the job's state and dialling again for up to 2 s" in caplog.text
    assert "the master did not resume its job within 2 s: exiting" in caplog.text
