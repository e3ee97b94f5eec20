"""The .proto files follow the usual protobuf style: every element documented, versioned package,
UNSPECIFIED enum zero values, prefixed enum values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from fedenc.protocol import codegen


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("descriptors") / "set.pb"
    protos = [p.as_posix() for p in codegen.proto_files()]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ],
        cwd=codegen.PROTO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fds = descriptor_pb2.FileDescriptorSet.FromString(Path(out).read_bytes())
    return list(fds.file)


def _walk(fd: descriptor_pb2.FileDescriptorProto) -> list[tuple[str, tuple[int, ...]]]:
    """(element name, source path) of every message, field, enum, value, service and method."""
    items: list[tuple[str, tuple[int, ...]]] = []

    def enum(e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]) -> None:
        items.append((e.name, path))
        for j, v in enumerate(e.value):
            items.append((f"{e.name}.{v.name}", (*path, 2, j)))

    def message(m: descriptor_pb2.DescriptorProto, path: tuple[int, ...]) -> None:
        if m.options.map_entry:
            return
        items.append((m.name, path))
        for j, f in enumerate(m.field):
            items.append((f"{m.name}.{f.name}", (*path, 2, j)))
        synthetic = {f.oneof_index for f in m.field if f.proto3_optional}  # `optional` fields
        for j, o in enumerate(m.oneof_decl):
            if j not in synthetic:
                items.append((f"{m.name}.{o.name}", (*path, 8, j)))
        for j, n in enumerate(m.nested_type):
            message(n, (*path, 3, j))
        for j, e in enumerate(m.enum_type):
            enum(e, (*path, 4, j))

    for i, m in enumerate(fd.message_type):
        message(m, (4, i))
    for i, e in enumerate(fd.enum_type):
        enum(e, (5, i))
    for i, s in enumerate(fd.service):
        items.append((s.name, (6, i)))
        for j, rpc in enumerate(s.method):
            items.append((f"{s.name}.{rpc.name}", (6, i, 2, j)))
    return items


def test_package_is_versioned(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    assert files
    for fd in files:
        assert fd.package == "fedenc.v1", fd.name
        assert fd.syntax == "proto3", fd.name
        assert fd.name.startswith("fedenc/v1/"), fd.name


def test_every_element_is_documented(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    undocumented = []
    for fd in files:
        comments = {
            tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location
        }
        undocumented += [f"{fd.name}: {n}" for n, p in _walk(fd) if not comments.get(p)]
    assert not undocumented, undocumented


def test_enums_have_unspecified_zero_and_prefixed_values(
    files: list[descriptor_pb2.FileDescriptorProto],
) -> None:
    for fd in files:
        for e in fd.enum_type:
            prefix = "".join(f"_{c}" if c.isupper() else c.upper() for c in e.name).lstrip("_")
            prefix = prefix.replace("D_TYPE", "DTYPE")
            assert e.value[0].number == 0
            assert e.value[0].name == f"{prefix}_UNSPECIFIED", e.name
            for v in e.value:
                assert v.name.startswith(prefix + "_"), v.name


def test_field_numbers_are_stable(files: list[descriptor_pb2.FileDescriptorProto]) -> None:
    """A few pinned numbers: changing one breaks deployed peers (add fields, never renumber)."""
    by_name = {m.name: m for fd in files for m in fd.message_type}
    pinned = {
        ("Tensor", "spec"): 1,
        ("Tensor", "data"): 2,
        ("Tensor", "compression"): 3,
        ("TensorChunk", "name"): 1,
        ("TensorChunk", "offset"): 2,
        ("TensorChunk", "data"): 3,
        ("TensorChunk", "last"): 4,
        ("TrainResult", "parameters"): 3,
        ("TrainResult", "num_samples"): 5,
        ("Confirmation", "accepted"): 2,
    }
    for (msg, fld), number in pinned.items():
        numbers = {f.name: f.number for f in by_name[msg].field}
        assert numbers[fld] == number, (msg, fld)
