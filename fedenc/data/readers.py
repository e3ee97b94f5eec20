"""Readers for the session logs in ``../shared/data`` and the raw click logs they come from.

Two kinds of input exist. *Prepared* files (SR-GNN's protocol already applied) hold one session
per line as space-separated item ids; they become a :class:`~fedenc.data.sessions.Sessions`
directly. *Raw* click logs (Diginetica ``train-item-views.csv``, Yoochoose ``yoochoose-clicks.dat``
or session-rec's tab-separated samples) become a :class:`Clicks` table that
:mod:`fedenc.data.preprocess` turns into sessions.

Parsing is vectorised (one ``numpy`` cast per column); only when a cast fails do we walk the
column again in Python, to name the first bad line. Every problem is a :class:`DataFormatError`
whose message says which file, which 1-based line and what is wrong, because "invalid literal for
int()" on a million-line file is not an answer.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedenc.data.sessions import IntArray, Sessions

FloatArray = npt.NDArray[np.float64]
PathArg = str | PathLike[str]


class DataFormatError(ValueError):
    """A data file that cannot be read as the expected format; names the file and line."""

    def __init__(self, path: PathArg, line: int | None, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}" if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}")


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """A data file that does not exist (both a :class:`DataFormatError` and a FileNotFoundError)."""

    def __init__(self, path: PathArg, problem: str = "no such file") -> None:
        super().__init__(path, None, problem)


@dataclass(frozen=True)
class Clicks:
    """A raw click log, one row per click, in file order.

    ``time`` dates the click in seconds since the epoch (at the resolution the file has: whole days
    for Diginetica); ``order`` sorts clicks within a session (Diginetica's ``timeframe``; file
    order for the Yoochoose readers). Ids are the file's own, not yet renumbered.
    """

    session: IntArray
    item: IntArray
    time: FloatArray
    order: FloatArray

    def __post_init__(self) -> None:
        n = self.session.shape
        if self.item.shape != n or self.time.shape != n or self.order.shape != n:
            raise ValueError("all click columns must have the same length")

    def __len__(self) -> int:
        return int(self.session.size)

    @property
    def num_sessions(self) -> int:
        return int(np.unique(self.session).size)

    @property
    def num_items(self) -> int:
        return int(np.unique(self.item).size)


# --------------------------------------------------------------------------------------------
# Shared helpers


def _read_lines(path: PathArg) -> tuple[Path, list[str]]:
    """The file's lines (trailing blank lines dropped), with missing/undecodable files reported."""
    p, text = _read_text(path)
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataFormatError(p, None, "file is empty")
    return p, lines


def _read_text(path: PathArg) -> tuple[Path, str]:
    p = Path(path)
    if not p.exists():
        raise DataFileNotFoundError(p)
    if p.is_dir():
        raise DataFormatError(p, None, "is a directory, expected a file")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip: logs are often shipped compressed
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataFormatError(p, None, f"gzip data that does not decompress ({exc})") from None
    try:
        text = raw.decode("utf-8-sig")  # (a byte-order mark is not part of the first field)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataFormatError(p, line, f"not UTF-8 text ({exc.reason})") from None
    return p, text


def _cast(
    values: Sequence[str],
    dtype: Any,
    check: Callable[[str], object],
    path: Path,
    first_line: int,
    what: str,
) -> npt.NDArray[Any]:
    """Cast a column at C speed; on failure find and name the first value ``check`` rejects."""
    try:
        return np.array(values, dtype=dtype)
    except ValueError as exc:
        for j, v in enumerate(values):
            try:
                check(v)
            except ValueError:
                raise DataFormatError(
                    path, first_line + j, f"{what} {v!r} is {_kind(dtype)}"
                ) from None
        raise DataFormatError(path, None, f"cannot read {what} column: {exc}") from None


def _kind(dtype: Any) -> str:
    if np.issubdtype(dtype, np.integer):
        return "not an integer"
    if np.issubdtype(dtype, np.datetime64):
        return "not a date/time"
    return "not a number"


def _positive(values: IntArray, path: Path, first_line: int, what: str) -> None:
    bad = np.flatnonzero(values <= 0)
    if bad.size:
        j = int(bad[0])
        raise DataFormatError(path, first_line + j, f"{what} {int(values[j])} is not positive")


def _split_fields(
    lines: Sequence[str], first_line: int, delim: str, ncols: int, path: Path
) -> list[list[str]]:
    """Split delimited lines, insisting on ``ncols`` fields per line (blank lines are errors)."""
    rows = [ln.split(delim) for ln in lines]
    counts = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    bad = np.flatnonzero(counts != ncols)
    if bad.size:
        j = int(bad[0])
        line = lines[j]
        name = _DELIM_NAMES.get(delim, repr(delim))
        if not line.strip():
            problem = f"blank line (expected {ncols} {name}-separated fields)"
        else:
            problem = f"expected {ncols} {name}-separated fields, found {len(rows[j])}"
            other = [d for d in _DELIM_NAMES if d != delim and d in line]
            if len(rows[j]) == 1 and other:
                problem += f"; the line contains {_DELIM_NAMES[other[0]]}s: wrong delimiter?"
        raise DataFormatError(path, first_line + j, problem)
    return rows


_DELIM_NAMES = {";": "';'", ",": "','", "\t": "tab"}


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _norm(name: str) -> str:
    return name.strip().strip('"').lower().replace("_", "").replace(" ", "")


def _header_columns(
    header: Sequence[str], wanted: Mapping[str, tuple[str, ...]], path: Path
) -> dict[str, int]:
    """Map each wanted column to its index in ``header`` (accepting any of its aliases)."""
    names = [_norm(h) for h in header]
    found: dict[str, int] = {}
    for key, aliases in wanted.items():
        for alias in aliases:
            if alias in names:
                found[key] = names.index(alias)
                break
    missing = [k for k in wanted if k not in found]
    if missing:
        raise DataFormatError(
            path, 1, f"header {list(header)} lacks column(s) {', '.join(missing)}"
        )
    return found


# --------------------------------------------------------------------------------------------
# Prepared sessions: one session per line


def read_session_text(path: PathArg, num_items: int | None = None) -> Sessions:
    """Sessions from a one-session-per-line file of space-separated positive item ids.

    Ids are kept as they are (the prepared files already number items ``1..N``). ``num_items``
    defaults to the largest id; pass a larger one to share a catalog between train and test.
    Blank lines are errors, not empty sessions: an empty session has no example and usually means
    a broken conversion.
    """
    p, text = _read_text(path)
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataFormatError(p, None, "file is empty")
    lengths = np.fromiter(map(len, map(str.split, lines)), dtype=np.int64, count=len(lines))
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise DataFormatError(p, int(empty[0]) + 1, "blank line (empty session)")
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = text.split()  # same tokens as the lines' (line breaks are whitespace), far faster
    try:
        items = np.array(tokens, dtype=np.int64)
    except ValueError:
        for j, line in enumerate(lines):
            for t in line.split():
                if not _is_int(t):
                    hint = next(
                        (
                            f" (items must be separated by spaces, found {_DELIM_NAMES[d]})"
                            for d in (",", ";")
                            if d in t
                        ),
                        "",
                    )
                    raise DataFormatError(
                        p, j + 1, f"item id {t!r} is not an integer{hint}"
                    ) from None
        raise
    if items.size != offsets[-1]:  # only odd Unicode line breaks inside a line could do this
        raise DataFormatError(p, None, "line breaks and item tokens do not line up")
    line_of = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    bad = np.flatnonzero(items <= 0)
    if bad.size:
        j = int(bad[0])
        raise DataFormatError(p, int(line_of[j]) + 1, f"item id {int(items[j])} is not positive")
    top = int(items.max())
    if num_items is None:
        num_items = top
    elif top > num_items:
        j = int(np.argmax(items))
        raise DataFormatError(
            p, int(line_of[j]) + 1, f"item id {top} exceeds num_items={num_items}"
        )
    return Sessions(items=items, offsets=offsets, num_items=num_items)


# --------------------------------------------------------------------------------------------
# Raw click logs


_DIGINETICA_COLUMNS = {
    "session": ("sessionid",),
    "item": ("itemid",),
    "timeframe": ("timeframe",),
    "date": ("eventdate", "date"),
}


def read_diginetica_clicks(path: PathArg) -> Clicks:
    """Diginetica ``train-item-views.csv``: ``sessionId;userId;itemId;timeframe;eventdate``.

    The header is optional (columns are found by name when present, so both the CIKM Cup
    ``sessionId`` and SR-GNN's sample ``session_id`` spellings work). ``time`` is the event date at
    midnight UTC (the file has nothing finer); ``order`` is ``timeframe``, the within-session offset
    SR-GNN sorts clicks by.
    """
    p, lines = _read_lines(path)
    first = lines[0].split(";")
    if len(first) == 1:
        other = [d for d in (",", "\t") if d in lines[0]]
        hint = f"; found {_DELIM_NAMES[other[0]]}s instead: wrong delimiter?" if other else ""
        raise DataFormatError(p, 1, f"expected ';'-separated Diginetica columns{hint}")
    if _is_int(first[0]):
        cols = {"session": 0, "item": 2, "timeframe": 3, "date": 4}
        ncols, body, start = 5, lines, 1
    else:
        cols = _header_columns(first, _DIGINETICA_COLUMNS, p)
        ncols, body, start = len(first), lines[1:], 2
    if not body:
        raise DataFormatError(p, None, "no click rows after the header")
    rows = _split_fields(body, start, ";", ncols, p)
    session = _cast([r[cols["session"]] for r in rows], np.int64, int, p, start, "session id")
    item = _cast([r[cols["item"]] for r in rows], np.int64, int, p, start, "item id")
    _positive(session, p, start, "session id")
    _positive(item, p, start, "item id")
    frame = _cast([r[cols["timeframe"]] for r in rows], np.int64, int, p, start, "timeframe")
    day = _cast(
        [r[cols["date"]].strip() for r in rows],
        "datetime64[D]",
        _check_date,
        p,
        start,
        "eventdate",
    )
    _no_nat(day, p, start, "eventdate")
    seconds = day.astype("datetime64[s]").astype(np.int64).astype(np.float64)
    return Clicks(session=session, item=item, time=seconds, order=frame.astype(np.float64))


def _check_date(s: str) -> None:
    if np.isnat(np.datetime64(s, "D")):
        raise ValueError(s)


def _check_time(s: str) -> None:
    if np.isnat(np.datetime64(s, "ms")):
        raise ValueError(s)


def _no_nat(values: npt.NDArray[Any], path: Path, first_line: int, what: str) -> None:
    bad = np.flatnonzero(np.isnat(values))
    if bad.size:
        raise DataFormatError(path, first_line + int(bad[0]), f"{what} is missing (NaT)")


_TAB_COLUMNS = {
    "session": ("sessionid",),
    "item": ("itemid",),
    "time": ("time", "timestamp"),
}
_RECSYS_COLUMNS = {
    "session": ("sessionid", "session"),
    "time": ("timestamp", "time"),
    "item": ("itemid", "item"),
}


def read_yoochoose_clicks(path: PathArg) -> Clicks:
    """Yoochoose clicks in either of the two layouts found in the wild.

    - RecSys'15 ``yoochoose-clicks.dat``: ``session,timestamp,item,category``, ISO timestamps
      (``2014-04-07T10:51:09.277Z``), no header (SR-GNN's copy has one added; both are accepted).
    - session-rec's prepared samples: tab-separated with header ``SessionId\\tItemId\\tTime`` and
      unix seconds.

    The layout is sniffed from the first line. Clicks keep file order within a session, as
    SR-GNN's ``preprocess.py`` keeps them for Yoochoose (``order`` is the row), and ISO times are
    cut to whole seconds, as its ``timestamp[:19]`` does.
    """
    p, lines = _read_lines(path)
    head = lines[0]
    if "\t" in head:
        return _read_tab_clicks(p, lines)
    if "," in head:
        return _read_recsys_clicks(p, lines)
    if ";" in head:
        raise DataFormatError(
            p,
            1,
            "expected tab- or ','-separated Yoochoose clicks, found ';'s: "
            "a Diginetica file? (use read_diginetica_clicks)",
        )
    raise DataFormatError(
        p, 1, "expected tab- or ','-separated Yoochoose clicks, found a single column"
    )


def _click_rows(
    p: Path,
    lines: list[str],
    sep: str,
    default_cols: dict[str, int],
    default_ncols: int,
    known: Mapping[str, tuple[str, ...]],
) -> tuple[list[list[str]], dict[str, int], int, IntArray, IntArray]:
    """Header (optional) and rows of a Yoochoose click file, with validated session/item ids."""
    first = lines[0].split(sep)
    if _is_int(first[0]):
        cols, ncols, body, start = default_cols, default_ncols, lines, 1
    else:
        cols = _header_columns(first, known, p)
        ncols, body, start = len(first), lines[1:], 2
    if not body:
        raise DataFormatError(p, None, "no click rows after the header")
    rows = _split_fields(body, start, sep, ncols, p)
    session = _cast([r[cols["session"]] for r in rows], np.int64, int, p, start, "session id")
    item = _cast([r[cols["item"]] for r in rows], np.int64, int, p, start, "item id")
    _positive(session, p, start, "session id")
    _positive(item, p, start, "item id")
    return rows, cols, start, session, item


def _read_tab_clicks(p: Path, lines: list[str]) -> Clicks:
    rows, cols, start, session, item = _click_rows(
        p, lines, "\t", {"session": 0, "item": 1, "time": 2}, 3, _TAB_COLUMNS
    )
    time = _cast([r[cols["time"]] for r in rows], np.float64, float, p, start, "time")
    nonfinite = np.flatnonzero(~np.isfinite(time))
    if nonfinite.size:
        raise DataFormatError(p, start + int(nonfinite[0]), "time is not a finite number")
    return Clicks(session=session, item=item, time=time, order=_file_order(time.size))


def _file_order(n: int) -> FloatArray:
    return np.arange(n, dtype=np.float64)


def _read_recsys_clicks(p: Path, lines: list[str]) -> Clicks:
    rows, cols, start, session, item = _click_rows(
        p, lines, ",", {"session": 0, "time": 1, "item": 2}, 4, _RECSYS_COLUMNS
    )
    # numpy refuses zone suffixes; Yoochoose times are all UTC ('Z').
    stamps = [r[cols["time"]].strip().removesuffix("Z") for r in rows]
    when = _cast(stamps, "datetime64[ms]", _check_time, p, start, "timestamp")
    _no_nat(when, p, start, "timestamp")
    seconds = when.astype("datetime64[s]").astype(np.int64).astype(np.float64)
    return Clicks(session=session, item=item, time=seconds, order=_file_order(seconds.size))
