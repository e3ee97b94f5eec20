"""Readers: the prepared session text and the raw Diginetica / Yoochoose click logs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedenc.data.readers import (
    DataFileNotFoundError,
    DataFormatError,
    read_diginetica_clicks,
    read_session_text,
    read_yoochoose_clicks,
)


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- session text


def test_session_text_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, "s.txt", "1 2\n3 4 5\n6 7\n")
    s = read_session_text(path)
    assert s.to_lists() == [[1, 2], [3, 4, 5], [6, 7]]
    assert s.num_items == 7
    assert s.timestamps is None


def test_session_text_accepts_crlf_and_trailing_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "s.txt", "1 2\r\n3  4\t5\r\n\n\n")
    assert read_session_text(path).to_lists() == [[1, 2], [3, 4, 5]]


def test_session_text_num_items(tmp_path: Path) -> None:
    path = write(tmp_path, "s.txt", "1 2\n3 9\n")
    assert read_session_text(path, num_items=20).num_items == 20
    with pytest.raises(DataFormatError, match=r"line 2: item id 9 exceeds num_items=5"):
        read_session_text(path, num_items=5)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("1 2\n\n3 4\n", r"line 2: blank line \(empty session\)"),
        ("1 2\n   \n3 4\n", r"line 2: blank line"),
        ("1 2\n3 x 4\n", r"line 2: item id 'x' is not an integer"),
        ("1 2\n3 4\n5 2.5\n", r"line 3: item id '2.5' is not an integer"),
        (
            "1,2,3\n",
            r"line 1: item id '1,2,3' is not an integer \(items must be separated by spaces",
        ),
        ("1 2\n3 0\n", r"line 2: item id 0 is not positive"),
        ("1 2\n3 4\n5 -6\n", r"line 3: item id -6 is not positive"),
    ],
)
def test_session_text_errors_name_file_and_line(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, "bad.txt", text)
    with pytest.raises(DataFormatError, match=pattern) as info:
        read_session_text(path)
    assert str(path) in str(info.value)
    assert info.value.path == path


def test_a_byte_order_mark_and_gzip_are_read_through(tmp_path: Path) -> None:
    import gzip

    plain = read_session_text(write(tmp_path, "a.txt", "1 2 3\n4 5\n"))
    bom = tmp_path / "b.txt"
    bom.write_bytes(b"\xef\xbb\xbf1 2 3\n4 5\n")
    packed = tmp_path / "c.txt"
    packed.write_bytes(gzip.compress(b"1 2 3\n4 5\n"))
    for path in (bom, packed):
        assert read_session_text(path).to_lists() == plain.to_lists()
    broken = tmp_path / "d.txt"
    broken.write_bytes(gzip.compress(b"1 2 3\n")[:12])
    with pytest.raises(DataFormatError, match=r"d\.txt: gzip data that does not decompress"):
        read_session_text(broken)


def test_missing_file_is_both_data_and_file_not_found_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    for reader in (read_session_text, read_diginetica_clicks, read_yoochoose_clicks):
        with pytest.raises(FileNotFoundError, match=r"nope\.txt: no such file"):
            reader(path)
        with pytest.raises(DataFormatError):
            reader(path)
    assert issubclass(DataFileNotFoundError, ValueError)


def test_empty_file_directory_and_binary(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="file is empty"):
        read_session_text(write(tmp_path, "e.txt", "\n\n"))
    with pytest.raises(DataFormatError, match="is a directory"):
        read_session_text(tmp_path)
    path = tmp_path / "b.txt"
    path.write_bytes(b"1 2\n3 \xff\n")
    with pytest.raises(DataFormatError, match=r"line 2: not UTF-8"):
        read_session_text(path)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(st.integers(1, 10**6), min_size=1, max_size=6), min_size=1, max_size=30))
def test_session_text_property(tmp_path: Path, sessions: list[list[int]]) -> None:
    path = write(tmp_path, "p.txt", "".join(" ".join(map(str, s)) + "\n" for s in sessions))
    got = read_session_text(path)
    assert got.to_lists() == sessions
    assert got.num_items == max(max(s) for s in sessions)


# ---------------------------------------------------------------------------- Diginetica

DIGI = """session_id;user_id;item_id;timeframe;eventdate
1;NA;81766;526309;2016-05-09
1;NA;31331;1031018;2016-05-09
1;NA;32118;243569;2016-05-09
2;7;9654;75848;2016-05-10
"""


def test_diginetica_columns(tmp_path: Path) -> None:
    c = read_diginetica_clicks(write(tmp_path, "d.csv", DIGI))
    assert len(c) == 4
    assert c.session.tolist() == [1, 1, 1, 2]
    assert c.item.tolist() == [81766, 31331, 32118, 9654]
    assert c.order.tolist() == [526309, 1031018, 243569, 75848]
    assert c.time[0] == c.time[2] == 1462752000.0  # 2016-05-09 00:00 UTC
    assert c.time[3] - c.time[0] == 86400.0
    assert c.num_sessions == 2 and c.num_items == 4


def test_diginetica_header_spellings_and_headerless(tmp_path: Path) -> None:
    cikm = DIGI.replace("session_id;user_id;item_id", "sessionId;userId;itemId")
    a = read_diginetica_clicks(write(tmp_path, "a.csv", cikm))
    b = read_diginetica_clicks(write(tmp_path, "b.csv", DIGI.split("\n", 1)[1]))
    ref = read_diginetica_clicks(write(tmp_path, "r.csv", DIGI))
    for c in (a, b):
        assert np.array_equal(c.item, ref.item) and np.array_equal(c.time, ref.time)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            DIGI.replace(";", ","),
            r"line 1: expected ';'-separated .* found ','s instead: wrong deli",
        ),
        (DIGI.replace(";", "\t"), r"line 1: expected ';'-separated .* found tabs instead"),
        (DIGI.replace(";timeframe", ";frame"), r"line 1: header .* lacks column\(s\) timeframe"),
        (DIGI.replace("2;7;9654;75848;", "2;7;9654;"), r"line 5: expected 5 ';'-separated fields"),
        (
            DIGI.replace("1;NA;31331;", "1,NA,31331,").replace("1031018;", "1031018,"),
            r"line 3: expected 5 ';'-separated fields, found 1; the line contains ','s",
        ),
        (DIGI.replace(";32118;", ";32x18;"), r"line 4: item id '32x18' is not an integer"),
        (DIGI.replace("1;NA;31331", "one;NA;31331"), r"line 3: session id 'one' is not an integer"),
        (DIGI.replace(";32118;", ";0;"), r"line 4: item id 0 is not positive"),
        (DIGI.replace("2;7;", "-2;7;"), r"line 5: session id -2 is not positive"),
        (DIGI.replace(";243569;", ";soon;"), r"line 4: timeframe 'soon' is not an integer"),
        (DIGI.replace("2016-05-10", "2016-13-10"), r"line 5: eventdate '2016-13-10' is not a date"),
        (DIGI.replace("2016-05-10", ""), r"line 5: eventdate is missing"),
        (DIGI.replace("1;NA;31331;1031018;2016-05-09\n", "\n"), r"line 3: blank line"),
        (DIGI.split("\n", 1)[0] + "\n", r"no click rows after the header"),
    ],
)
def test_diginetica_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, "bad.csv", text)
    with pytest.raises(DataFormatError, match=pattern) as info:
        read_diginetica_clicks(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------- Yoochoose

DAT = """1,2014-04-07T10:51:09.277Z,214536502,0
1,2014-04-07T10:54:09.868Z,214536500,0
2,2014-04-07T13:56:37.614Z,214662742,S
"""
TAB = "SessionId\tItemId\tTime\n1\t214536502\t1396867869.277\n1\t214536500\t1396868049.868\n"


def test_yoochoose_recsys_format(tmp_path: Path) -> None:
    c = read_yoochoose_clicks(write(tmp_path, "y.dat", DAT))
    assert c.session.tolist() == [1, 1, 2]
    assert c.item.tolist() == [214536502, 214536500, 214662742]
    # Whole seconds (SR-GNN's timestamp[:19]); clicks keep file order within a session.
    assert c.time[0] == 1396867869.0
    assert c.order.tolist() == [0.0, 1.0, 2.0]
    with_header = write(tmp_path, "h.dat", "session_id,timestamp,item_id,category\n" + DAT)
    assert np.array_equal(read_yoochoose_clicks(with_header).time, c.time)


def test_yoochoose_tab_format_matches_recsys(tmp_path: Path) -> None:
    tab = read_yoochoose_clicks(write(tmp_path, "t.txt", TAB))
    dat = read_yoochoose_clicks(write(tmp_path, "y.dat", DAT))
    assert tab.item.tolist() == dat.item.tolist()[:2]
    assert tab.time == pytest.approx(dat.time[:2], abs=1.0)
    headerless = read_yoochoose_clicks(write(tmp_path, "n.txt", TAB.split("\n", 1)[1]))
    assert headerless.item.tolist() == tab.item.tolist()


@pytest.mark.parametrize(
    ("name", "text", "pattern"),
    [
        ("a.dat", DAT.replace(",", ";"), r"line 1: .*found ';'s: a Diginetica file\?"),
        ("b.txt", "12345\n", r"line 1: .*found a single column"),
        ("c.dat", DAT.replace(",214536500,0", ",214536500"), r"line 2: expected 4 ','-separated"),
        ("d.dat", DAT.replace("T13:56", "X13:56"), r"line 3: timestamp .* is not a date/time"),
        ("e.dat", DAT.replace("214662742", "abc"), r"line 3: item id 'abc' is not an integer"),
        ("f.txt", TAB.replace("\t1396868049.868", ""), r"line 3: expected 3 tab-separated"),
        ("g.txt", TAB.replace("1396868049.868", "noon"), r"line 3: time 'noon' is not a number"),
        ("h.txt", TAB.replace("214536500", "0"), r"line 3: item id 0 is not positive"),
        ("i.txt", TAB.replace("ItemId", "Product"), r"line 1: header .* lacks column\(s\) item"),
        ("j.txt", TAB.replace("1396868049.868", "inf"), r"line 3: time is not a finite number"),
    ],
)
def test_yoochoose_errors(tmp_path: Path, name: str, text: str, pattern: str) -> None:
    path = write(tmp_path, name, text)
    with pytest.raises(DataFormatError, match=pattern) as info:
        read_yoochoose_clicks(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------- real files


def test_real_srgnn_sample(real_file: Callable[[str], Path]) -> None:
    c = read_diginetica_clicks(real_file("srgnn_sample/sample_train-item-views.csv"))
    assert len(c) == 12391
    assert c.num_sessions == 2986
    assert c.num_items == 7139
    days = c.time.astype("datetime64[s]").astype("datetime64[D]")
    assert str(days.min()) == "2016-01-03" and str(days.max()) == "2016-06-01"


def test_real_yoochoose_sample(real_file: Callable[[str], Path]) -> None:
    c = read_yoochoose_clicks(real_file("yoochoose_clicks_100k/yoochoose-clicks-100k_test.txt"))
    assert len(c) == 13568
    assert c.num_sessions == 3416
    assert c.num_items == 1771


def test_real_session_text(real_file: Callable[[str], Path]) -> None:
    s = read_session_text(real_file("yoochoose1_64/test_sessions.txt"))
    assert len(s) == 15324
    assert s.num_clicks == 71222
    assert s.num_examples == 55898
