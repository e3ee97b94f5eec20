"""Damage a file the way a disk or a copy would, for the tests that it is refused."""

from __future__ import annotations

import zipfile
from pathlib import Path


def flip_a_data_byte(path: Path) -> None:
    """Change one byte inside the largest member's data of a ``torch.save`` archive (not the zip's
    own records, which torch would notice by itself)."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # The local header's own name and extra lengths (torch pads the extra field to align data).
    name_len = int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
