"""Pull responses written and read in the wire format agree with the generated classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedenc.proto.fedenc.v1 import parameter_server_pb2 as pspb
from fedenc.proto.fedenc.v1 import tensor_pb2 as tpb
from fedenc.protocol.tensors import tensor_to_proto
from fedenc.ps.table import PSError
from fedenc.ps.wire import (
    keys_to_proto,
    pull_response_bytes,
    push_request_bytes,
    read_pull_response,
    read_push_request,
    rows_from_proto,
    rows_to_proto,
)


@pytest.mark.parametrize(("n", "width", "version"), [(0, 4, 0), (1, 1, 1), (37, 100, 2**40)])
def test_written_responses_parse_with_the_generated_class(n: int, width: int, version: int) -> None:
    rows = torch.randn(n, width)
    reply = pspb.PullResponse.FromString(pull_response_bytes(rows, version))
    assert reply.version == version
    assert torch.equal(rows_from_proto(reply.rows), rows)


@pytest.mark.parametrize("version", [0, 7])
def test_generated_responses_read_alike(version: int) -> None:
    rows = torch.randn(5, 3)
    data = pspb.PullResponse(rows=rows_to_proto(rows), version=version).SerializeToString()
    got, got_version = read_pull_response(data, 5, 3)
    assert got_version == version and np.array_equal(got, rows.numpy())


def test_the_fast_path_reads_a_view_of_the_response() -> None:
    data = pull_response_bytes(torch.ones(4, 2), 3)
    got, _ = read_pull_response(data, 4, 2)
    assert not got.flags.writeable and np.array_equal(got, np.ones((4, 2), np.float32))


def test_compressed_rows_go_through_the_full_decoder() -> None:
    rows = torch.tensor([[1.5, -2.0], [0.25, 8.0]])
    msg = pspb.PullResponse(
        rows=tensor_to_proto("rows", rows, compression=tpb.COMPRESSION_FLOAT16), version=1
    )
    got, _ = read_pull_response(msg.SerializeToString(), 2, 2)
    assert np.array_equal(got, rows.numpy())  # float16 holds these exactly


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (pull_response_bytes(torch.ones(4, 2), 1), r"expected float32 \[3, 2\]"),
        (pull_response_bytes(torch.ones(3, 2, dtype=torch.float64), 1), "float64"),
        (b"\xff\xff\xff", "bad pull response"),
    ],
)
def test_unexpected_responses_are_refused(data: bytes, match: str) -> None:
    with pytest.raises(PSError, match=match):
        read_pull_response(data, 3, 2)


@pytest.mark.parametrize(("client_id", "sequence"), [("", 0), ("trainer-é", 2**40)])
def test_push_requests_round_trip_both_ways(client_id: str, sequence: int) -> None:
    keys = np.array([3, 1, 7], dtype=np.int64)
    rows = torch.randn(3, 4)
    mode = pspb.PUSH_MODE_DELTA
    written = push_request_bytes(keys, rows, mode, client_id, sequence)
    msg = pspb.PushRequest.FromString(written)
    assert (msg.mode, msg.client_id, msg.sequence) == (mode, client_id, sequence)
    assert torch.equal(rows_from_proto(msg.rows), rows)
    generated = pspb.PushRequest(
        keys=keys_to_proto(keys), rows=rows_to_proto(rows), mode=mode, client_id=client_id,
        sequence=sequence,
    ).SerializeToString()  # fmt: skip
    for data in (written, generated):
        got = read_push_request(data)
        assert np.array_equal(got.keys, keys) and torch.equal(got.rows, rows)
        assert (got.mode, got.client_id, got.sequence) == (mode, client_id, sequence)


def test_malformed_push_requests_are_refused() -> None:
    with pytest.raises(PSError, match="bad push request"):
        read_push_request(b"\xff\xff")
    no_rows = pspb.PushRequest(keys=keys_to_proto(np.array([1], dtype=np.int64)), mode=1)
    with pytest.raises(PSError, match="bad push request"):
        read_push_request(no_rows.SerializeToString())
