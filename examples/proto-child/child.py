"""A fedenc child written from ``proto/`` alone, for an organisation whose own stack trains.

It speaks the Federation stream (docs/wire-protocol.md) with stubs generated from ``proto/`` and
Flower's wire message, and nothing of fedenc. Generate the stubs first:

    python -m grpc_tools.protoc -I proto --python_out=STUBS --grpc_python_out=STUBS \\
        proto/fedenc/v1/*.proto
    python examples/proto-child/child.py --stubs STUBS --master HOST:9092 --name site-x \\
        --samples 1200

Needs ``grpcio``, ``protobuf`` and ``numpy``, and Flower's ``flwr.proto.message_pb2`` (from
``pip install flwr==1.42.*``; in another language, generate it from Flower 1.42's
``framework/proto/flwr/proto/message.proto`` and the files it imports).

Your training goes into :func:`local_update` (here it scales every floating-point tensor by
``--scale``, so that a test can check the master's weighted fusion exactly) and your evaluation
into :func:`local_evaluate` (here None: the child answers evaluations with an error reply and
the master leaves it out of the metrics, which is what a child that cannot evaluate does).
Plaintext only; for TLS pass ``grpc.ssl_channel_credentials(...)`` to ``secure_channel``.
"""

from __future__ import annotations

import argparse
import importlib
import queue
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

PROTOCOL_VERSION = 1
CAPABILITIES = ["flower-message/1", "heartbeat/1"]
CHUNK = 4 * 1024 * 1024 - 64 * 1024  # the largest TensorChunk data either side sends
# The record layout inside Flower messages (docs/wire-protocol.md, "Content").
FEDENC, INSTRUCTION, CONFIRMATION, NAME, METRICS = (
    "fedenc",
    "instruction",
    "confirmation",
    "name",
    "metrics",
)


def local_update(tensors: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Your local training: the shared tensors in, the updated ones out (same names, shapes
    and dtypes)."""
    return {
        k: (v * scale).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in tensors.items()
    }


def local_evaluate(tensors: dict[str, np.ndarray], split: str) -> dict[str, float] | None:
    """Your evaluation on ``split`` (valid or test): {"num-examples", "recall@20", "mrr@20"}
    with the rates in percent, or None to decline."""
    return None


class Stream:
    """One bidirectional Federation stream: frames out through a queue, frames in by a thread."""

    def __init__(self, stubs: Any, address: str) -> None:
        self.pb = stubs
        self.channel = grpc.insecure_channel(address)
        self.out: queue.Queue[Any] = queue.Queue()
        self.inbox: queue.Queue[Any] = queue.Queue()
        self._ids = 0
        self._lock = threading.Lock()
        connect = self.channel.stream_stream(
            "/fedenc.v1.Federation/Connect",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=stubs.MasterMessage.FromString,
        )
        # wait_for_ready: a master that is not listening yet is waited for, not an error.
        self.call = connect(iter(self.out.get, None), wait_for_ready=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for frame in self.call:
                self.inbox.put(frame)
        except grpc.RpcError as err:
            self.inbox.put(err)
        self.inbox.put(None)

    def send(self, *frames: Any) -> None:
        """Frames in order; every frame but a chunk gets the next message id."""
        with self._lock:  # a heartbeat must not land between a reply and its chunks
            for frame in frames:
                if frame.WhichOneof("body") != "chunk":
                    self._ids += 1
                    frame.message_id = self._ids
                self.out.put(frame)

    def next(self) -> Any:
        return self.inbox.get()

    def close(self) -> None:
        self.out.put(None)
        self.channel.close()


def read_arrays(stream: Stream, frame: Any) -> dict[str, dict[str, np.ndarray]]:
    """The tensors announced by a FlowerMessage frame, from the TensorChunk frames after it."""
    tp = stream.pb.tensor
    dtypes = {tp.DTYPE_FLOAT32: "<f4", tp.DTYPE_FLOAT64: "<f8", tp.DTYPE_INT64: "<i8"}
    dtypes.update({tp.DTYPE_INT32: "<i4", tp.DTYPE_FLOAT16: "<f2"})
    records: dict[str, dict[str, np.ndarray]] = {}
    for header in frame.flower.array_records:
        tensors = {}
        for th in header.tensors.tensors:
            data = bytearray()
            while True:
                chunk = stream.next().chunk
                if chunk.name != th.spec.name or chunk.offset != len(data):
                    raise RuntimeError(f"chunk of {chunk.name!r} at {chunk.offset} out of order")
                data += chunk.data
                if chunk.last:
                    break
            if th.compression == tp.COMPRESSION_ZLIB:
                data = bytearray(zlib.decompress(data))
            dtype = np.dtype(dtypes[th.spec.dtype])
            if th.compression == tp.COMPRESSION_FLOAT16:
                values = np.frombuffer(bytes(data), "<f2").astype(dtype)
            else:
                values = np.frombuffer(bytes(data), dtype)
            tensors[th.spec.name] = values.reshape(tuple(th.spec.shape))
        records[header.key] = tensors
    return records


def array_frames(stream: Stream, key: str, tensors: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """An ArrayRecordHeader for ``tensors`` and the TensorChunk frames of their data."""
    tp = stream.pb.tensor
    codes = {"<f4": tp.DTYPE_FLOAT32, "<f8": tp.DTYPE_FLOAT64, "<i8": tp.DTYPE_INT64}
    codes.update({"<i4": tp.DTYPE_INT32, "<f2": tp.DTYPE_FLOAT16})
    header = stream.pb.service.ArrayRecordHeader(key=key)
    chunks = []
    for name, value in tensors.items():
        data = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        spec = tp.TensorSpec(name=name, dtype=codes[value.dtype.str], shape=list(value.shape))
        header.tensors.tensors.add(
            spec=spec, compression=tp.COMPRESSION_NONE, byte_length=len(data)
        )
        for offset in range(0, max(len(data), 1), CHUNK):
            piece = data[offset : offset + CHUNK]
            last = offset + len(piece) >= len(data)
            chunk = tp.TensorChunk(name=name, offset=offset, data=piece, last=last)
            chunks.append(stream.pb.service.ChildMessage(chunk=chunk))
    return header, chunks


def reply_to(message: Any, node_id: int) -> Any:
    """A Flower Message answering ``message`` (its metadata mirrored, as the master checks)."""
    reply = stream_message_type()
    md, theirs = reply.metadata, message.metadata
    md.run_id, md.src_node_id, md.dst_node_id = theirs.run_id, node_id, theirs.src_node_id
    md.reply_to_message_id, md.group_id = theirs.message_id, theirs.group_id
    md.ttl, md.message_type, md.created_at = theirs.ttl, theirs.message_type, time.time()
    reply.content.SetInParent()  # a reply always carries content, an empty one at least
    return reply


def stream_message_type() -> Any:
    from flwr.proto import message_pb2  # Flower's wire message, not fedenc

    return message_pb2.Message()


def add_metrics(reply: Any, metrics: dict[str, float | int]) -> None:
    item = reply.content.items.add(key=METRICS)
    for key, value in metrics.items():
        entry = item.metric_record.items.add(key=key)
        if isinstance(value, int):
            entry.value.sint64 = value
        else:
            entry.value.double = float(value)


def config_values(message: Any) -> dict[tuple[str, str], Any]:
    """Every (record, key) -> value of the message's ConfigRecords."""
    out = {}
    for item in message.content.items:
        if item.WhichOneof("value") == "config_record":
            for entry in item.config_record.items:
                out[(item.key, entry.key)] = entry.value
    return out


def load_stubs(path: str) -> Any:
    sys.path.insert(0, path)
    names = {"service": "federation_service_pb2", "federation": "federation_pb2"}
    names["tensor"] = "tensor_pb2"
    try:
        mods = {k: importlib.import_module(f"fedenc.v1.{v}") for k, v in names.items()}
    except ModuleNotFoundError as err:
        # The stubs' package is fedenc.v1: an importable fedenc package (a checkout on the path,
        # an installed fedenc) hides them.
        found = sys.modules.get("fedenc")
        where = getattr(found, "__file__", None) if found is not None else None
        hint = f" (the fedenc package at {where} hides them: run without it on the path)"
        raise SystemExit(
            f"cannot import the stubs from {path}: {err}{hint if where else ''}; generate them "
            "with python -m grpc_tools.protoc -I proto --python_out=STUBS --grpc_python_out=STUBS "
            "proto/fedenc/v1/*.proto"
        ) from None
    stubs = argparse.Namespace(**mods)
    stubs.MasterMessage = mods["service"].MasterMessage
    return stubs


def run(args: argparse.Namespace) -> int:
    pb = load_stubs(args.stubs)
    svc = pb.service
    stream = Stream(pb, args.master)
    hello = svc.Hello(
        name=args.name,
        protocol_version=PROTOCOL_VERSION,
        capabilities=CAPABILITIES,
        agent="fedenc examples/proto-child",
    )
    stream.send(svc.ChildMessage(hello=hello))
    node_id = 0
    stop = threading.Event()

    def heartbeats(interval: float) -> None:  # the master drops a child silent past its timeout
        while not stop.wait(interval):
            beat = svc.Heartbeat(sent_at_unix_ms=int(time.time() * 1000))
            stream.send(svc.ChildMessage(heartbeat=beat))

    frames: Iterator[Any] = iter(stream.next, None)
    try:
        for frame in frames:
            if isinstance(frame, grpc.RpcError):
                print(f"{args.name}: stream lost: {frame.details()}", flush=True)
                return 1
            body = frame.WhichOneof("body")
            if body == "welcome":
                node_id = frame.welcome.node_id
                interval = frame.welcome.heartbeat_interval_s
                threading.Thread(target=heartbeats, args=(interval,), daemon=True).start()
                print(f"{args.name}: welcome, node {node_id}", flush=True)
            elif body == "close":
                reason = svc.CloseReason.Name(frame.close.reason)
                print(
                    f"{args.name}: closed by the master: {reason} {frame.close.detail}", flush=True
                )
                return 0 if frame.close.reason == svc.CLOSE_REASON_SHUTDOWN else 1
            elif body == "flower":
                message = stream_message_type()
                message.ParseFromString(frame.flower.message)
                arrays = read_arrays(stream, frame)
                stream.send(*answer(stream, frame, message, arrays, node_id, args))
            # heartbeat and run frames need no answer
    finally:
        stop.set()
        stream.close()
    return 0


def answer(
    stream: Stream,
    frame: Any,
    message: Any,
    arrays: dict[str, dict[str, np.ndarray]],
    node_id: int,
    args: argparse.Namespace,
) -> list[Any]:
    """The frames that answer one Flower message."""
    svc, fed = stream.pb.service, stream.pb.federation
    kind = message.metadata.message_type
    reply = reply_to(message, node_id)
    records: list[Any] = []
    chunks: list[Any] = []
    if kind == "query":  # a TrainingInstruction: confirm with the local sample count
        instruction = fed.TrainingInstruction.FromString(
            config_values(message)[(FEDENC, INSTRUCTION)].bytes
        )
        confirmation = fed.Confirmation(
            job_id=instruction.job_id, accepted=True, num_samples=args.samples
        )
        item = reply.content.items.add(key=FEDENC)
        item.config_record.items.add(
            key=CONFIRMATION
        ).value.bytes = confirmation.SerializeToString()
        item.config_record.items.add(key=NAME).value.string = args.name
        add_metrics(reply, {"num-examples": args.samples})
        print(f"{args.name}: confirmed job {instruction.job_id}", flush=True)
    elif kind == "train":  # the target's shared tensors: train, return them updated
        (key, tensors), *_ = arrays.items()
        updated = local_update(tensors, args.scale)
        reply.content.items.add(key=key).array_record.SetInParent()  # its tensors follow
        header, chunks = array_frames(stream, key, updated)
        records = [header]
        add_metrics(reply, {"num-examples": args.samples, "train_loss": 0.0})
        if args.save_received:
            np.savez(args.save_received, **tensors)
    elif kind == "evaluate":
        split = config_values(message)[("config", "split")].string
        metrics = local_evaluate(next(iter(arrays.values())), split)
        if metrics is None:
            reply.ClearField("content")
            reply.error.code = 0
            reply.error.reason = f"{args.name} does not evaluate"
        else:
            add_metrics(reply, metrics)
    elif kind == "query.notice":  # the master refused this child's answer: say why
        reason = config_values(message).get(("config", "reason"))
        print(
            f"{args.name}: left out by the master: {reason.string if reason else '?'}", flush=True
        )
    # "query.finish" (the job is over) and other notices: an empty reply acknowledges them
    flower = svc.FlowerMessage(message=reply.SerializeToString(), array_records=records)
    return [svc.ChildMessage(reply_to=frame.message_id, flower=flower), *chunks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stubs", required=True, help="folder of the stubs generated from proto/")
    ap.add_argument("--master", required=True, help="HOST:PORT of `fedenc master`")
    ap.add_argument("--name", required=True, help="this child's name (unique)")
    ap.add_argument("--samples", type=int, required=True, help="local training samples")
    ap.add_argument("--scale", type=float, default=1.0, help="the placeholder update's factor")
    ap.add_argument("--save-received", default=None, help="save the last target received (.npz)")
    sys.exit(run(ap.parse_args()))


if __name__ == "__main__":
    main()
