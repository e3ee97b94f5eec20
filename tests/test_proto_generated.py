"""The committed protobuf code in fedenc/proto is exactly what `make proto` generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedenc.protocol import codegen


def test_generated_code_is_current(tmp_path: Path) -> None:
    files = codegen.generate(tmp_path / "proto")
    assert any(f.name == "tensor_pb2.py" for f in files)
    problems = codegen.differences(tmp_path / "proto", codegen.OUTPUT_ROOT)
    assert not problems, (
        "fedenc/proto is stale; run `make proto` and commit the result.\n"
        + "\n".join(problems)
        + f"\ngenerator versions here: {codegen.generator_versions()}"
    )


def test_generated_modules_import_cleanly() -> None:
    """Importable as fedenc.proto.fedenc.v1.*; no sys.path change, no top-level fedenc.v1."""
    script = (
        "import sys; before = list(sys.path)\n"
        "from fedenc.proto.fedenc.v1 import tensor_pb2, federation_pb2, federation_service_pb2\n"
        "from fedenc.proto.fedenc.v1 import federation_service_pb2_grpc\n"
        "assert sys.path == before, 'sys.path changed'\n"
        "assert 'fedenc.v1' not in sys.modules\n"
        "assert tensor_pb2.Tensor.__module__ == 'fedenc.proto.fedenc.v1.tensor_pb2'\n"
        "assert federation_pb2.EncoderSpec.DESCRIPTOR.fields_by_name['shared_parameters']"
        ".message_type.full_name == 'fedenc.v1.TensorSpec'\n"
        "assert hasattr(federation_service_pb2_grpc, 'FederationServicer')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
