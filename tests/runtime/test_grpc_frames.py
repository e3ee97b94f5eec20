"""Flower Message <-> FlowerMessage + TensorChunk frames: round trips keep metadata, records and
tensors (content order too); every malformed input is a FrameError naming the problem; the
decoder never raises anything else (hypothesis fuzz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedenc.proto.fedenc.v1 import federation_service_pb2 as spb
from fedenc.proto.fedenc.v1 import tensor_pb2 as tpb
from fedenc.protocol.tensors import TensorEncodeError
from fedenc.runtime import flower_compat as fc
from fedenc.runtime.grpc.frames import (
    ArraySpecs,
    FrameError,
    FrameReader,
    array_to_tensor,
    encode_message,
    tensor_to_array,
)

RUN = 77


def message(content: RecordDict, dst: int = 5, kind: str = "train") -> Message:
    with fc.task_identity(RUN):
        msg = Message(content, dst, kind, group_id="g1")
    fc.set_message_id(msg, "ins-00000001")
    return msg


def sample_content() -> RecordDict:
    return RecordDict(
        {
            "config": ConfigRecord({"lr": 0.1, "name": "x", "flags": [True, False], "b": b"\x00"}),
            "arrays": ArrayRecord(
                {
                    "w": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
                    "ids": Array(np.array([1, -2, 3], dtype=np.int64)),
                    "empty": Array(np.zeros((0, 5), dtype=np.float64)),
                    "mask": Array(np.array([True, False])),
                }
            ),
            "metrics": MetricRecord({"loss": 1.5, "n": 3}),
            "more": ArrayRecord({"w": Array(np.full(3, 7, dtype=np.int8))}),
        }
    )


def frames_of(
    msg: Message, max_chunk_bytes: int = 16
) -> tuple[spb.FlowerMessage, list[tpb.TensorChunk]]:
    encoded = encode_message(msg, max_chunk_bytes=max_chunk_bytes)
    return encoded.frame, [c.to_proto() for c in encoded.chunks]


def receive(
    frame: spb.FlowerMessage,
    chunks: list[tpb.TensorChunk],
    expected: ArraySpecs | None = None,
    max_array_bytes: int | None = None,
) -> Message:
    reader = FrameReader(max_chunk_bytes=16, max_array_bytes=max_array_bytes)
    out = reader.flower(frame, 1, expected)
    for c in chunks:
        assert out is None
        out = reader.chunk(c)
    assert out is not None and not reader.busy
    return out


def test_round_trip_keeps_metadata_records_order_and_tensors() -> None:
    msg = message(sample_content())
    frame, chunks = frames_of(msg)
    assert len(chunks) > 5  # 16-byte chunks: the 48-byte tensor alone takes three
    assert all(len(c.data) <= 16 for c in chunks)
    back = receive(frame, chunks)
    assert back.metadata == msg.metadata
    assert list(back.content.keys()) == ["config", "arrays", "metrics", "more"]
    assert dict(back.content["config"]) == dict(msg.content["config"])
    assert dict(back.content["metrics"]) == dict(msg.content["metrics"])
    for key in ("arrays", "more"):
        for name, arr in msg.content[key].items():
            got = back.content[key][name].numpy()
            assert got.dtype == arr.numpy().dtype and np.array_equal(got, arr.numpy())
    # The frame itself carries no tensor bytes: they are all in the chunks.
    assert len(frame.message) < 400


def test_error_message_round_trips() -> None:
    reply = fc.error_reply(message(RecordDict()), fc.CLIENT_APP_RAISED_EXCEPTION, "boom")
    frame, chunks = frames_of(reply)
    assert chunks == []
    back = receive(frame, [])
    assert back.has_error() and back.error.code == 2 and back.error.reason == "boom"


def test_array_to_tensor_views_the_npy_bytes_without_a_copy() -> None:
    arr = Array(np.arange(1000, dtype=np.float32))
    t = array_to_tensor(arr)
    assert torch.equal(t, torch.arange(1000, dtype=torch.float32))
    start = np.frombuffer(arr.data, dtype=np.uint8).ctypes.data
    assert start <= t.data_ptr() < start + len(arr.data)  # inside Flower's own bytes
    fortran = Array(np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)))
    assert torch.equal(array_to_tensor(fortran), torch.arange(6, dtype=torch.float64).reshape(2, 3))


def test_a_dtype_the_wire_does_not_carry_is_refused_when_sending() -> None:
    msg = message(RecordDict({"a": ArrayRecord({"u": Array(np.zeros(2, dtype=np.uint16))})}))
    with pytest.raises(TensorEncodeError, match="'a'"):
        encode_message(msg)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("drop_chunk", "missing|incomplete|leaves bytes"),
        ("swap_chunks", "out of order|overlaps|missing"),
        ("rename_chunk", "not in the header"),
        ("oversized_chunk", "exceeds the limit"),
        ("bad_dtype", "unknown dtype"),
        ("bad_length", "header declares"),
        ("garbage_message", "undecodable Flower message"),
        ("unannounced_record", "announced without a header"),
        ("unknown_record", "no empty ArrayRecord"),
        ("twice", "announced twice"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(case: str, match: str) -> None:
    frame, chunks = frames_of(message(sample_content()))
    if case == "drop_chunk":
        del chunks[1]
    elif case == "swap_chunks":
        chunks[0], chunks[1] = chunks[1], chunks[0]
    elif case == "rename_chunk":
        chunks[0].name = "nope"
    elif case == "oversized_chunk":
        chunks[0].data = chunks[0].data * 4
    elif case == "bad_dtype":
        frame.array_records[0].tensors.tensors[0].spec.dtype = 0
    elif case == "bad_length":
        frame.array_records[0].tensors.tensors[0].byte_length += 4
    elif case == "garbage_message":
        frame.message = b"\xff\xff\xff"
    elif case == "unannounced_record":
        del frame.array_records[1]
    elif case == "unknown_record":
        frame.array_records[1].key = "metrics"
    elif case == "twice":
        frame.array_records.append(frame.array_records[0])
    with pytest.raises(FrameError, match=match):
        receive(frame, chunks)


def test_expected_tensors_refuse_other_names_shapes_and_dtypes() -> None:
    msg = message(sample_content())
    encoded = encode_message(msg, max_chunk_bytes=16)
    frame, chunks = encoded.frame, [c.to_proto() for c in encoded.chunks]
    assert receive(frame, chunks, expected=encoded.specs).content["arrays"]["w"].shape == (3, 4)
    specs = dict(encoded.specs)
    specs["arrays"] = {**specs["arrays"], "w": ((4, 3), torch.float32)}
    with pytest.raises(FrameError, match=r"shape \[3, 4\], expected \[4, 3\]"):
        receive(frame, chunks, expected=specs)
    specs["arrays"] = {**encoded.specs["arrays"], "w": ((3, 4), torch.float64)}
    with pytest.raises(FrameError, match="dtype float32, expected float64"):
        receive(frame, chunks, expected=specs)
    specs["arrays"] = {k: v for k, v in encoded.specs["arrays"].items() if k != "ids"}
    with pytest.raises(FrameError, match="unexpected"):
        receive(frame, chunks, expected=specs)


def test_reader_refuses_other_frames_between_chunks_and_stray_chunks() -> None:
    frame, chunks = frames_of(message(sample_content()))
    reader = FrameReader(max_chunk_bytes=16)
    with pytest.raises(FrameError, match="without a FlowerMessage"):
        reader.chunk(chunks[0])
    assert reader.flower(frame, 3) is None and reader.busy and reader.tag == 3
    reader.chunk(chunks[0])
    with pytest.raises(FrameError, match="heartbeat frame while the chunks"):
        reader.other("heartbeat")
    with pytest.raises(FrameError, match="FlowerMessage frame while the chunks"):
        reader.flower(frame, 4)


def test_max_array_bytes_bounds_what_a_message_may_announce() -> None:
    frame, chunks = frames_of(message(sample_content()))
    with pytest.raises(FrameError, match="more than 10"):
        receive(frame, chunks, max_array_bytes=10)


# -- fuzz ------------------------------------------------------------------------------------------

_BASE_FRAME, _BASE_CHUNKS = frames_of(message(sample_content()))
_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decode_stream(raw: list[bytes]) -> None:
    """What a stream reader does with raw frames; only FrameError may escape."""
    reader = FrameReader(max_chunk_bytes=16, max_array_bytes=1 << 20)
    for data in raw:
        try:
            frame = spb.ChildMessage.FromString(data)
        except Exception as err:  # DecodeError: the connection maps it to FrameError
            raise FrameError(str(err)) from None
        kind = frame.WhichOneof("body")
        if kind == "flower":
            reader.flower(frame.flower, frame.reply_to)
        elif kind == "chunk":
            reader.chunk(frame.chunk)
        else:
            reader.other(kind or "empty")


@_FUZZ
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_random_bytes_only_raise_frame_error(raw: list[bytes]) -> None:
    try:
        _decode_stream(raw)
    except FrameError:
        pass


@_FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(_BASE_CHUNKS) - 1), st.integers(0, 6), st.binary(max_size=24)),
        max_size=12,
    ),
    st.integers(0, 3),
    st.integers(0, 12),
)
def test_fuzz_mutated_streams_only_raise_frame_error(
    edits: list[tuple[int, int, bytes]], header_edit: int, value: int
) -> None:
    frame = spb.FlowerMessage()
    frame.CopyFrom(_BASE_FRAME)
    chunks = [tpb.TensorChunk() for _ in _BASE_CHUNKS]
    for c, base in zip(chunks, _BASE_CHUNKS, strict=True):
        c.CopyFrom(base)
    spec = frame.array_records[0].tensors.tensors[0]
    if header_edit == 1:
        spec.spec.dtype = tpb.DType.ValueType(value)
    elif header_edit == 2:
        spec.spec.shape[0] = value
    elif header_edit == 3:
        spec.byte_length = value * 7
    for index, what, data in edits:
        c = chunks[index % len(chunks)]
        if what == 0:
            c.data = data
        elif what == 1:
            c.offset = len(data)
        elif what == 2:
            c.last = not c.last
        elif what == 3:
            c.name = data.decode("latin-1")
        elif what == 4:
            chunks.append(c)
        elif what == 5:
            chunks.remove(c)
            chunks.insert(0, c)
        elif what == 6 and len(chunks) > 1:
            chunks.remove(c)
    raw = [spb.ChildMessage(flower=frame, reply_to=1).SerializeToString()]
    raw += [spb.ChildMessage(chunk=c).SerializeToString() for c in chunks]
    try:
        _decode_stream(raw)
    except FrameError:
        pass


@pytest.mark.parametrize(
    "values",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(3.5, dtype=np.float64),
        np.zeros((0, 2), dtype=np.int16),
        np.array([True, False]),
    ],
)
def test_tensor_to_array_matches_flowers_own_array(values: np.ndarray) -> None:
    ours = tensor_to_array(torch.from_numpy(values.copy()))
    flowers = Array(values)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
        flowers.data,
    )


def test_received_tensors_become_arrays_over_their_receive_buffers() -> None:
    """No copy between the chunks' buffer and the Flower Array: the buffer is received behind
    the .npy header that np.save would write, and handed over as the Array's data."""
    values = np.arange(40, dtype=np.float32).reshape(8, 5)
    back = receive(*frames_of(message(RecordDict({"arrays": ArrayRecord({"w": Array(values)})}))))
    array = back.content["arrays"]["w"]
    assert isinstance(array.data, bytearray)
    assert bytes(array.data) == Array(values).data  # the very bytes Flower would hold
    assert np.array_equal(array.numpy(), values)
    view = array_to_tensor(array)
    start = np.frombuffer(array.data, dtype=np.uint8).ctypes.data
    assert start <= view.data_ptr() < start + len(array.data)
    assert back.content["arrays"].count_bytes() == ArrayRecord({"w": Array(values)}).count_bytes()
