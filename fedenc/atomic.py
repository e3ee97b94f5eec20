"""Files replaced all at once: every file fedenc writes for others to read goes through here.
Tensor files are checked against their checksums when read back (:func:`torch_load`).

The bytes go to a fresh temporary file beside the target (``O_EXCL``: never an existing file, nor
a link planted in its place), are flushed and fsynced, and the file is renamed over the target;
the directory is fsynced so that the rename survives a power cut too. A reader, or a process
restarted after a crash, sees the old file or the new one, never half of one; two writers never
share a temporary file; a failed write leaves the old file and no temporary behind.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch


@contextlib.contextmanager
def atomic_file(target: Path, mode: int | None = None, durable: bool = True) -> Iterator[IO[bytes]]:
    """A binary handle whose content replaces ``target`` when the block ends without error.

    ``mode``: the file's permissions, set before any byte is written (a private key or a
    training state is never readable by others, not even for a moment); None: what the umask
    leaves of 0666, as for any new file. ``durable=False`` skips the fsyncs, for files that are
    cheap to lose (a cache)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        if mode is not None:
            os.fchmod(fd, mode)  # exactly this: the umask may have narrowed it
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_bytes(target: Path, data: bytes, mode: int | None = None, durable: bool = True) -> None:
    """Replace ``target`` with ``data`` (see :func:`atomic_file`)."""
    with atomic_file(target, mode, durable) as handle:
        handle.write(data)


def write_text(target: Path, text: str, durable: bool = True) -> None:
    """Replace ``target`` with ``text`` in UTF-8 (see :func:`atomic_file`)."""
    write_bytes(target, text.encode("utf-8"), durable=durable)


def torch_save(payload: Any, target: Path, mode: int | None = None) -> None:
    """``torch.save(payload)`` replacing ``target`` (see :func:`atomic_file`)."""
    with atomic_file(target, mode) as handle:
        torch.save(payload, handle)


class DamagedFileError(ValueError):
    """A ``torch.save`` archive whose bytes fail their checksums: changed on disk or on their
    way here. Reading it would have given wrong tensors without an error."""


def torch_load(source: str | Path | io.BytesIO, **kwargs: Any) -> Any:
    """``torch.load(source, **kwargs)`` once every member of the archive matches its CRC-32.

    torch reads a zip archive's members without checking them, so a flipped byte became a
    wrong weight, silently (a resumed job went on from it, an encoder scored worse). A file that
    is not a readable archive at all is left to torch.load to describe."""
    try:
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError):  # (OSError, e.g. missing: torch's)
        bad = None
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)
    if bad is not None:
        name = "the buffer" if isinstance(source, io.BytesIO) else str(source)
        raise DamagedFileError(
            f"{name} is damaged: {bad!r} fails its checksum (the file changed after it was written)"
        )
    return torch.load(source, **kwargs)


#: Training state (models, optimizer moments, a site's local head): its owner's only.
PRIVATE: int = 0o600

__all__ = [
    "PRIVATE",
    "DamagedFileError",
    "atomic_file",
    "torch_load",
    "torch_save",
    "write_bytes",
    "write_text",
]
