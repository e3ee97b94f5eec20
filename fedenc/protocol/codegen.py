"""Regenerates the committed protobuf code in ``fedenc/proto`` from ``proto/`` (``make proto``).

``protoc -I proto`` compiles ``proto/fedenc/v1/tensor.proto`` into ``fedenc/v1/tensor_pb2.py``,
whose cross-file imports read ``from fedenc.v1 import tensor_pb2``. Inside this repository that
module path would collide with the ``fedenc`` package itself, so the code is generated under
``fedenc/proto`` (giving ``fedenc.proto.fedenc.v1.tensor_pb2``) and two kinds of lines are
rewritten to that location:

* ``from fedenc.<pkg> import x_pb2`` (in ``.py`` and ``.pyi``) becomes
  ``from fedenc.proto.fedenc.<pkg> import x_pb2``;
* the module name given to protobuf's builder (``'fedenc.v1.tensor_pb2'``), which becomes the
  message classes' ``__module__``, gets the same prefix, so that messages pickle correctly.

Nothing else is touched, and importing the generated modules has no side effect beyond
registering their descriptors in protobuf's default pool (``sys.path`` is left alone). The
``.proto`` files stay usable on their own: ``protoc -I proto`` in any language needs no fedenc.

Outputs: ``*_pb2.py`` (grpcio-tools), ``*_pb2.pyi`` (mypy-protobuf), and ``*_pb2_grpc.py`` /
``*_pb2_grpc.pyi`` for the files that declare services, plus ``__init__.py`` files. The output
depends on the generator versions (grpcio-tools pinned below 1.80 emits protobuf-6 code).

Usage: ``python -m fedenc.protocol.codegen`` rewrites ``fedenc/proto``; ``--check`` only reports
whether the committed code is stale (exit status 1).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
OUTPUT_ROOT = REPO_ROOT / "fedenc" / "proto"
#: Python package that the generated tree lives in.
PACKAGE_PREFIX = "fedenc.proto"

_TOP_INIT = (
    '"""Generated protobuf code for the ``fedenc.v1`` wire contract in ``proto/``.\n\n'
    "Do not edit: ``make proto`` regenerates it (:mod:`fedenc.protocol.codegen`), and a test\n"
    "fails when it is stale. Import messages as\n"
    "``from fedenc.proto.fedenc.v1 import tensor_pb2``.\n"
    '"""\n'
)
_SUB_INIT = '"""Generated protobuf code (``make proto``); do not edit."""\n'

_SERVICE = re.compile(r"^\s*service\s+\w+", re.MULTILINE)
_STAMP_SUFFIXES = (".py", ".pyi")


class CodegenError(RuntimeError):
    """protoc or one of its plugins failed, or is missing."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every ``.proto`` file under ``proto_root``, relative to it, sorted."""
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def _plugin(name: str) -> str:
    """Path of a protoc plugin installed next to this interpreter (or on ``PATH``)."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise CodegenError(f"{name} not found (pip install mypy-protobuf)")
    return found


def _protoc(proto_root: Path, out_dir: Path, files: Sequence[Path], grpc: bool) -> None:
    args = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",  # adds grpc_tools' include dir for google/protobuf/*.proto
        "-I.",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--python_out={out_dir}",
        f"--mypy_out=quiet:{out_dir}",
    ]
    if grpc:
        args += [
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_grpc_out=quiet:{out_dir}",
        ]
    args += [f.as_posix() for f in files]
    done = subprocess.run(args, cwd=proto_root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CodegenError(f"protoc failed ({done.returncode}):\n{done.stderr}{done.stdout}")


def _top_packages(files: Sequence[Path]) -> list[str]:
    return sorted({f.parts[0] for f in files if len(f.parts) > 1})


def _rewrite(text: str, packages: Sequence[str]) -> str:
    """Points the generated imports and module names at ``PACKAGE_PREFIX``."""
    for pkg in packages:
        p = re.escape(pkg)
        text = re.sub(
            rf"^from ({p}(?:\.\w+)*) import ",
            rf"from {PACKAGE_PREFIX}.\1 import ",
            text,
            flags=re.MULTILINE,
        )
        text = re.sub(
            rf"^import ({p}\.\S+)",
            rf"import {PACKAGE_PREFIX}.\1",
            text,
            flags=re.MULTILINE,
        )
        text = re.sub(
            rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')({p}\.)",
            rf"\g<1>{PACKAGE_PREFIX}.\2",
            text,
        )
    return text


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Generates the package tree into ``out_dir`` (created); returns the files, relative."""
    files = proto_files(proto_root)
    if not files:
        raise CodegenError(f"no .proto files under {proto_root}")
    out_dir.mkdir(parents=True, exist_ok=True)
    _protoc(proto_root, out_dir, files, grpc=False)
    with_services = [f for f in files if _SERVICE.search((proto_root / f).read_text("utf-8"))]
    if with_services:
        _protoc(proto_root, out_dir, with_services, grpc=True)

    packages = _top_packages(files)
    for path in sorted(out_dir.rglob("*")):
        if path.suffix in _STAMP_SUFFIXES:
            text = path.read_text("utf-8")
            path.write_text(_rewrite(text, packages), "utf-8")
    (out_dir / "__init__.py").write_text(_TOP_INIT, "utf-8")
    for directory in sorted({p.parent for p in out_dir.rglob("*_pb2.py")}):
        while directory != out_dir:
            init = directory / "__init__.py"
            if not init.exists():
                init.write_text(_SUB_INIT, "utf-8")
            directory = directory.parent
    return tree(out_dir)


def tree(root: Path) -> list[Path]:
    """The source files of a generated tree, relative to ``root`` (caches ignored)."""
    return sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and p.suffix in _STAMP_SUFFIXES and "__pycache__" not in p.parts
    )


def differences(expected_root: Path, actual_root: Path) -> list[str]:
    """What differs between two generated trees: missing, extra and changed files."""
    expected, actual = set(tree(expected_root)), set(tree(actual_root))
    problems = [f"missing: {p}" for p in sorted(expected - actual)]
    problems += [f"extra (stale): {p}" for p in sorted(actual - expected)]
    for rel in sorted(expected & actual):
        if (expected_root / rel).read_bytes() != (actual_root / rel).read_bytes():
            problems.append(f"changed: {rel}")
    return problems


def generator_versions() -> dict[str, str]:
    """Versions of the tools whose output is committed (they appear in the generated code)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for dist in ("grpcio-tools", "mypy-protobuf", "protobuf"):
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = "missing"
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedenc.protocol.codegen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only report stale generated code")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedenc-proto-") as tmp:
        fresh = Path(tmp)
        generate(fresh)
        problems = differences(fresh, OUTPUT_ROOT)
        if args.check:
            for line in problems:
                print(line)
            if problems:
                print("generated code is stale: run `make proto`", file=sys.stderr)
            return 1 if problems else 0
        new = set(tree(fresh))
        for rel in tree(OUTPUT_ROOT):
            if rel not in new:
                (OUTPUT_ROOT / rel).unlink()
        for rel in sorted(new):
            target = OUTPUT_ROOT / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fresh / rel, target)
        for directory in sorted(OUTPUT_ROOT.rglob("*"), reverse=True):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
    print(f"{len(new)} files in {OUTPUT_ROOT.relative_to(REPO_ROOT)} ({len(problems)} changed)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
