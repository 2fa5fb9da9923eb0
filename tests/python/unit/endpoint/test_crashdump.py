"""The endpoint's crash-report parser on synthetic input (real minidumps are covered by tests/python/integration/
test_crash.py): the record format the host writes, Crashpad's annotation stream, signatures, grouping, bad input."""

from __future__ import annotations

import struct

import pytest

from pyagent.endpoint._crashdump import (CRASHPAD_INFO_STREAM, CrashDumpError, crashpad_annotations, group,
                                         parse_record, parse_report, python_frames)

RECORD = """pyagent crash record 1
signal: 11 SIGSEGV
code: 1
address: 0x0
pid: 100
tid: 101
thread: main
time_ns: 1700000000000000000
host_version: 0.1.0
annotation: agent_id=abc
annotation: bundles=crasher=1.2.3
backtrace:
/usr/bin/pyagent-host(+0x7693)[0x55d0c0e07693]
/usr/bin/pyagent-host(+0x7a00)[0x55d0c0e07a00]
/lib/x86_64-linux-gnu/libc.so.6(+0x3bfd0)[0x7f0e5ce3bfd0]
/usr/bin/pyagent-host(+0x8fa5)[0x55d0c0e08fa5]
/usr/lib/libpython3.11.so.1.0(+0x1234)[0x7f0e5d001234]
end backtrace
minidump_handler: exited_0
handler_ms: 12
end
"""

TRACEBACK = '''Fatal Python error: Segmentation fault

Current thread 0x00007f (most recent call first):
  File "/b/crasher.py", line 13 in crash_here
  File "/usr/lib/python3.11/asyncio/events.py", line 80 in _run

Thread 0x00007e (most recent call first):
  File "/x/other.py", line 1 in elsewhere
'''


def minidump_with_annotations(pairs: dict[str, str]) -> bytes:
    """A minimal MDMP file: header, one directory entry (Crashpad info), the info and its string dictionary."""
    header_size, dir_size, info_size = 32, 12, 56
    info_rva = header_size + dir_size
    dict_rva = info_rva + info_size
    strings = b""
    entries = []
    strings_rva = dict_rva + 4 + 8 * len(pairs)
    for key, value in pairs.items():
        rvas = []
        for text in (key, value):
            rvas.append(strings_rva + len(strings))
            raw = text.encode()
            strings += struct.pack("<I", len(raw)) + raw + b"\0"
        entries.append(struct.pack("<II", *rvas))
    dictionary = struct.pack("<I", len(pairs)) + b"".join(entries)
    info = struct.pack("<I16s16sIIII", 1, b"\0" * 16, b"\0" * 16, len(dictionary), dict_rva, 0, 0).ljust(info_size,
                                                                                                        b"\0")
    header = b"MDMP" + struct.pack("<IIIIIQ", 0xA793, 1, header_size, 0, 0, 0)
    directory = struct.pack("<III", CRASHPAD_INFO_STREAM, info_size, info_rva)
    return header + directory + info + dictionary + strings


def test_record_fields() -> None:
    meta = parse_record(RECORD)
    assert meta["signal"] == "11 SIGSEGV" and meta["thread"] == "main"
    assert meta["annotation.agent_id"] == "abc" and meta["annotation.bundles"] == "crasher=1.2.3"
    assert meta["backtrace"].count("\n") == 4


def test_report_from_record_only() -> None:
    report = parse_report(None, RECORD, TRACEBACK)
    assert report["signal"] == 11 and report["signal_name"] == "SIGSEGV"
    assert report["address"] == 0 and report["crashing_thread"] == 101
    assert report["annotations"] == {"agent_id": "abc", "bundles": "crasher=1.2.3"}
    # frames start after the signal trampoline (libc), i.e. where the fault happened
    assert report["frames"] == ["pyagent-host(+0x8fa5)", "libpython3.11.so.1.0(+0x1234)"]
    assert report["python_frames"] == ["crasher.py:crash_here", "events.py:_run"]


def test_signature_stable_and_grouped() -> None:
    a = parse_report(None, RECORD, TRACEBACK)
    b = parse_report(None, RECORD.replace("pid: 100", "pid: 200").replace("0x55d0c0e0", "0x56aaaaaa"), TRACEBACK)
    c = parse_report(None, RECORD.replace("11 SIGSEGV", "6 SIGABRT"), TRACEBACK)
    assert a["signature"] == b["signature"] != c["signature"]
    groups = group([a, b, c])
    assert [len(v) for v in groups.values()] == [2, 1]


def test_crashpad_annotations() -> None:
    data = minidump_with_annotations({"agent_id": "abc", "host_version": "0.1.0"})
    assert crashpad_annotations(data) == {"agent_id": "abc", "host_version": "0.1.0"}


@pytest.mark.parametrize("data,message", [
    (b"not a dump", "MDMP"),
    (b"MDMP" + b"\0" * 4 + struct.pack("<II", 1, 10_000) + b"\0" * 16, "truncated"),
    (b"MDMP" + b"\0" * 4 + struct.pack("<II", 1, 32) + b"\0" * 16 + struct.pack("<III", 6, 100, 9999), "outside"),
])
def test_bad_dumps_are_errors_not_crashes(data: bytes, message: str) -> None:
    with pytest.raises(CrashDumpError, match=message):
        crashpad_annotations(data)
    # with a record the report still comes out, naming what was wrong with the dump
    report = parse_report(data, RECORD, "")
    assert report["signal"] == 11 and message in report["dump_error"]
    with pytest.raises(CrashDumpError):
        parse_report(data, "", "")


def test_python_frames_of_the_current_thread() -> None:
    assert python_frames("") == []
    assert python_frames(TRACEBACK)[0] == "crasher.py:crash_here"
