"""The protobuf wire format, for the few hot messages fedenc writes and reads without message
objects (tensor chunks, PS rows): varints, tags, and a strict field scanner.

The scanner is a fast path only: it accepts a message made of the expected fields, each at most
once, and declines (None) anything else, which callers then parse with the generated class.
"""

from __future__ import annotations

from typing import Final

VARINT: Final = 0
LEN: Final = 2


def field_number(message: type, name: str) -> int:
    """The field number of ``name`` in a generated message class."""
    number: int = message.DESCRIPTOR.fields_by_name[name].number  # type: ignore[attr-defined]
    return number


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def len_prefix(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field whose ``length`` bytes follow."""
    return tag(number, LEN) + varint(length)


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """(value, position after it), or None when truncated or over 64 bits."""
    value = shift = 0
    while pos < end and shift < 64:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (value, pos) if value < 1 << 64 else None
        shift += 7
    return None


def scan(
    buf: memoryview, varints: tuple[int, ...], lengths: tuple[int, ...]
) -> tuple[dict[int, int], dict[int, memoryview]] | None:
    """The fields of the message in ``buf``: the values of the varint fields ``varints`` and
    the bytes (views of ``buf``) of the length-delimited fields ``lengths``; None for any other
    field, a field seen twice, or a truncated one."""
    values: dict[int, int] = {}
    views: dict[int, memoryview] = {}
    pos, end = 0, len(buf)
    while pos < end:
        key = read_varint(buf, pos, end)
        if key is None:
            return None
        number, wire_type = key[0] >> 3, key[0] & 7
        pos = key[1]
        if number in values or number in views:
            return None
        value = read_varint(buf, pos, end)
        if value is None:
            return None
        if wire_type == VARINT and number in varints:
            values[number], pos = value
        elif wire_type == LEN and number in lengths and value[0] <= end - value[1]:
            start, pos = value[1], value[1] + value[0]
            views[number] = buf[start:pos]
        else:
            return None
    return values, views
