"""FrameSplitter: the line limit is exact and splitting does not depend on how the bytes are chunked."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyagent.endpoint._framing import FrameSplitter


def feed_all(splitter: FrameSplitter, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames += splitter.feed(chunk)
    return frames


def test_splits_lines_and_skips_empty_ones() -> None:
    s = FrameSplitter(100)
    assert s.feed(b'{"a":1}\n\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert s.buffered == 4
    assert s.feed(b":3}\n") == [b'{"c":3}']
    assert not s.overflow and s.buffered == 0


def test_carriage_return_is_kept() -> None:
    assert FrameSplitter(100).feed(b"{}\r\n") == [b"{}\r"]


def test_exactly_the_limit_is_accepted() -> None:
    s = FrameSplitter(10)
    assert s.feed(b"x" * 10 + b"\n") == [b"x" * 10]
    assert not s.overflow


def test_one_byte_over_the_limit_is_refused_with_a_newline() -> None:
    s = FrameSplitter(10)
    assert s.feed(b"ok\n" + b"x" * 11 + b"\nlater\n") == [b"ok"]
    assert s.overflow
    assert s.feed(b"more\n") == []


def test_one_byte_over_the_limit_is_refused_before_the_newline_arrives() -> None:
    s = FrameSplitter(10)
    assert s.feed(b"x" * 10) == []
    assert not s.overflow  # still exactly at the limit: may be a whole frame
    assert s.feed(b"x") == []
    assert s.overflow


def test_partial_line_over_the_limit_after_complete_lines() -> None:
    s = FrameSplitter(4)
    assert s.feed(b"ab\ncdefg") == [b"ab"]
    assert s.overflow


@given(st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")), max_size=20),
       st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30))
def test_chunking_does_not_matter(lines: list[bytes], cuts: list[int]) -> None:
    data = b"".join(line + b"\n" for line in lines)
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = cuts[i % len(cuts)]
        chunks.append(data[pos:pos + size])
        pos += size
        i += 1
    s = FrameSplitter(30)
    assert feed_all(s, chunks) == [line for line in lines if line]
    assert not s.overflow and s.buffered == 0


@given(st.integers(min_value=1, max_value=64), st.integers(min_value=0, max_value=80),
       st.integers(min_value=1, max_value=17))
def test_limit_is_exact_whatever_the_chunking(limit: int, length: int, chunk: int) -> None:
    data = b"y" * length + b"\n"
    s = FrameSplitter(limit)
    frames = feed_all(s, [data[i:i + chunk] for i in range(0, len(data), chunk)])
    if length > limit:
        assert s.overflow and frames == []
    else:
        assert not s.overflow and frames == ([data[:-1]] if length else [])
