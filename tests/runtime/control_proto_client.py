"""A Control API client built from ``proto/`` alone: no fedenc anywhere on its path.

Run by tests/runtime/test_control_proto_only.py as
``python -S control_proto_client.py STUBS_DIR ADDRESS OUT_DIR SITE_DIR...``: ``-S`` skips the
site module, so no ``.pth`` file (such as fedenc's editable install) runs; only the given
site-packages directories (grpc, protobuf, numpy) are added. It first proves that fedenc cannot
be imported, then puts the generated stubs on the path and drives a whole job: SubmitJob,
WatchJob to the end, DownloadEncoder, and decodes the tensors with numpy from the raw
little-endian bytes. It writes ``result.json`` and ``tensors.npz`` to OUT_DIR.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

stubs, address, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
sys.path.extend(sys.argv[4:])

try:  # the framework must not be importable here
    import fedenc  # noqa: F401
except ImportError as err:
    fedenc_error = f"{type(err).__name__}: {err}"
else:
    raise SystemExit("fedenc is importable in the protobuf-only client: the test means nothing")

sys.path.insert(0, str(stubs))
import grpc  # noqa: E402
import numpy as np  # noqa: E402
from fedenc.v1 import control_pb2, control_pb2_grpc, tensor_pb2  # noqa: E402

# `fedenc` is now only the generated stubs' namespace package, nothing of the framework.
import fedenc as stubs_package  # noqa: E402

assert [Path(p).resolve() for p in stubs_package.__path__] == [(stubs / "fedenc").resolve()]
assert importlib.util.find_spec("fedenc.federation") is None

NUMPY = {  # tensor.proto: raw little-endian element bytes
    "DTYPE_FLOAT32": "<f4",
    "DTYPE_FLOAT64": "<f8",
    "DTYPE_FLOAT16": "<f2",
    "DTYPE_INT64": "<i8",
    "DTYPE_INT32": "<i4",
    "DTYPE_INT16": "<i2",
    "DTYPE_INT8": "i1",
    "DTYPE_UINT8": "u1",
    "DTYPE_BOOL": "?",
}

stub = control_pb2_grpc.ControlStub(grpc.insecure_channel(address))
spec = control_pb2.JobSpec(encoder_type="srgnn", rounds=2)
spec.encoder_config.update({"hidden": 8})
job = stub.SubmitJob(control_pb2.SubmitJobRequest(spec=spec, requester="protobuf-only client"))

rounds: list[dict[str, Any]] = []
states: list[str] = []
for event in stub.WatchJob(control_pb2.WatchJobRequest(job_id=job.job_id), timeout=120):
    if event.WhichOneof("event") == "round":
        r = event.round
        rounds.append(
            {"round": r.round, "participants": list(r.participants), "recall": r.recall_at_20}
        )
    else:
        states.append(control_pb2.JobState.Name(event.job.state))
if states[-1] != "JOB_STATE_SUCCEEDED":
    raise SystemExit(f"job {job.job_id} ended {states[-1]}")

info = None
header = None
buffers: dict[str, bytearray] = {}
ended: set[str] = set()
request = control_pb2.DownloadEncoderRequest(job_id=job.job_id)
for part in stub.DownloadEncoder(request, timeout=60):
    kind = part.WhichOneof("part")
    if kind == "info":
        info = part.info
    elif kind == "header":
        header = part.header
        buffers = {t.spec.name: bytearray(t.byte_length) for t in header.tensors}
    else:
        chunk = part.chunk
        assert len(chunk.data) <= 4 * 1024 * 1024 - 64 * 1024
        buffers[chunk.name][chunk.offset : chunk.offset + len(chunk.data)] = chunk.data
        if chunk.last:
            ended.add(chunk.name)
assert info is not None and header is not None and ended == set(buffers)

arrays: dict[str, np.ndarray] = {}
for t in header.tensors:
    assert t.compression in (tensor_pb2.COMPRESSION_UNSPECIFIED, tensor_pb2.COMPRESSION_NONE)
    dtype = NUMPY[tensor_pb2.DType.Name(t.spec.dtype)]
    arrays[t.spec.name] = np.frombuffer(bytes(buffers[t.spec.name]), dtype=dtype).reshape(
        tuple(t.spec.shape)
    )

out.mkdir(parents=True, exist_ok=True)
np.savez(out / "tensors.npz", **arrays)
result = {
    "job_id": job.job_id,
    "states": states,
    "rounds": rounds,
    "encoder_type": info.encoder.type,
    "spec_names": [s.name for s in info.encoder.shared_parameters],
    "names": list(arrays),
    "hidden": info.encoder.config["hidden"],
    "fedenc_import_error": fedenc_error,
    "sys_path": sys.path,
}
(out / "result.json").write_text(json.dumps(result, indent=2))
