"""The endpoint's crash store on synthetic reports: resumable uploads, digests, the size limit, duplicates, grouping,
crash loops, crash counts, and refusals of bad input (real minidumps: tests/python/integration/test_crash_reports.py)."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from pyagent.endpoint._crashes import CrashStore, report_id, traceback_frames
from pyagent.protocol import INVALID_PARAMS, RemoteError

T0 = 1_700_000_000


def record(t: int = T0, sig: str = "11 SIGSEGV", frame: str = "+0x8fa5") -> bytes:
    return (f"pyagent crash record 1\nsignal: {sig}\ncode: 1\naddress: 0x10\npid: 1\ntid: 2\nthread: main\n"
            f"time_ns: {t * 10**9}\nhost_version: 0.1.0\nannotation: agent_id=A\nannotation: host_version=0.1.0\n"
            "annotation: bundles=crasher=1.2.3,hello=1.0.0\nbacktrace:\n/usr/lib/libc.so.6(+0x3bfd0)[0x7f0e5ce3bfd0]\n"
            f"/usr/bin/pyagent-host({frame})[0x55d0c0e08fa5]\nend backtrace\nend\n").encode()


@pytest.fixture
def store(tmp_path: Path) -> CrashStore:
    return CrashStore(sqlite3.connect(":memory:", isolation_level=None), tmp_path / "crashes",
                      max_report_bytes=64 * 1024)


class Session:
    agent_id = "A"

    def __init__(self) -> None:
        self.replies: list[tuple[int, Any]] = []

    def send_response(self, msg_id: int, result: Any) -> None:
        self.replies.append((msg_id, {"result": result}))

    def send_error(self, msg_id: int, code: int, message: str, data: Any = None) -> None:
        self.replies.append((msg_id, {"error": {"code": code, "message": message, "data": data}}))


def chunks(name: str, data: bytes, report: str, step: int = 1000, start: int = 0) -> list[dict[str, Any]]:
    return [{"report": report, "file": name, "offset": off, "size": len(data),
             "data": base64.b64encode(data[off:off + step]).decode(), "last": off + step >= len(data)}
            for off in range(start, len(data), step)]


async def upload(store: CrashStore, files: dict[str, bytes], report: str = f"{T0}-100", kind: str = "crash",
                 agent: str = "A") -> dict[str, Any]:
    begin = store.begin(agent, {"report": report, "kind": kind, "annotations": {"host_version": "0.1.0"},
                                "files": [{"name": n, "size": len(d)} for n, d in files.items()]})
    assert begin["done"] is False
    for name, data in files.items():
        if name in begin["skip"]:
            continue
        for c in chunks(name, data, report, start=begin["offsets"][name]):
            store.chunk(agent, c)
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in files.items() if n not in begin["skip"]}
    return await store.end(agent, {"report": report, "sha256": digests})


async def test_record_only_report_is_parsed_and_stored(store: CrashStore) -> None:
    tb = b'Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n  File "/b/c.py", line 3 in crash_here\n'
    out = await upload(store, {"record.txt": record(), "python-traceback.txt": tb})
    assert out["id"] == report_id("A", f"{T0}-100") and out["group_count"] == 1 and out["crash_loop"] is False
    row = store.get(out["id"][:6])
    assert row is not None
    assert row["signal"] == 11 and row["signal_name"] == "SIGSEGV" and row["time"] == T0 * 1000
    assert row["bundles"] == {"crasher": "1.2.3", "hello": "1.0.0"} and row["host_version"] == "0.1.0"
    assert "crash_here" in row["python_traceback"]
    assert row["summary"]["dump_error"] == "no minidump in the report"
    assert row["summary"]["frames"] == ["pyagent-host(+0x8fa5)"]
    assert (store.root / out["id"] / "record.txt").read_bytes() == record()
    # Uploading it again: the endpoint already has it.
    assert store.begin("A", {"report": f"{T0}-100", "kind": "crash", "files": [{"name": "record.txt", "size": 1}]}) \
        == {"id": out["id"], "done": True}


async def test_upload_resumes_at_the_offset_the_endpoint_has(store: CrashStore) -> None:
    data = record() * 20
    report = f"{T0}-7"
    params = {"report": report, "kind": "crash", "files": [{"name": "record.txt", "size": len(data)}]}
    store.begin("A", params)
    first = chunks("record.txt", data, report)
    store.chunk("A", first[0])
    store.chunk("A", first[1])
    assert store.begin("A", params)["offsets"] == {"record.txt": 2000}  # a new session asks again
    with pytest.raises(RemoteError) as bad:
        store.chunk("A", first[0])  # already there: no overlap
    assert bad.value.code == INVALID_PARAMS and bad.value.data["offset"] == 2000
    with pytest.raises(RemoteError, match="incomplete"):
        await store.end("A", {"report": report, "sha256": {"record.txt": "00"}})
    for c in first[2:]:
        store.chunk("A", c)
    out = await store.end("A", {"report": report, "sha256": {"record.txt": hashlib.sha256(data).hexdigest()}})
    assert store.get(out["id"]) is not None


async def test_digest_mismatch_restarts_the_upload(store: CrashStore) -> None:
    report = f"{T0}-8"
    store.begin("A", {"report": report, "kind": "crash", "files": [{"name": "record.txt", "size": len(record())}]})
    for c in chunks("record.txt", record(), report):
        store.chunk("A", c)
    with pytest.raises(RemoteError) as bad:
        await store.end("A", {"report": report, "sha256": {"record.txt": "ab" * 32}})
    assert bad.value.data["restart"] is True and "SHA-256 mismatch" in bad.value.message
    with pytest.raises(RemoteError, match="send crash.begin first"):
        store.chunk("A", chunks("record.txt", record(), report)[0])


async def test_oversized_minidump_is_left_out_by_design(store: CrashStore) -> None:
    big = b"MDMP" + bytes(100 * 1024)
    out = await upload(store, {"record.txt": record(), "crashpad/pending/x.dmp": big})
    row = store.get(out["id"])
    assert row is not None and row["signal_name"] == "SIGSEGV"
    assert row["summary"]["skipped"] == {"crashpad/pending/x.dmp": len(big)}
    assert "over the report size limit" in row["summary"]["dump_error"]
    assert row["size"] == len(record())
    with pytest.raises(RemoteError, match="over the report size limit"):
        store.begin("A", {"report": "9-9", "kind": "crash", "files": [{"name": "a.dmp", "size": len(big)}]})
        store.chunk("A", chunks("a.dmp", big, "9-9")[0])


async def test_grouping_counts_and_crash_loop(store: CrashStore) -> None:
    ids = []
    for i, t in enumerate((T0, T0 + 60, T0 + 3600, T0 + 3700)):
        out = await upload(store, {"record.txt": record(t)}, report=f"{t}-{i}")
        ids.append(out)
    assert [o["group_count"] for o in ids] == [1, 2, 3, 4]
    assert [o["crash_loop"] for o in ids] == [False, False, False, False]  # never 3 within 5 minutes
    other = await upload(store, {"record.txt": record(T0 + 3710, sig="6 SIGABRT")}, report=f"{T0 + 3710}-9")
    assert other["signature"] != ids[0]["signature"] and other["crash_loop"] is True  # 3 crashes in 110 s
    assert store.loops()[0]["agent_id"] == "A" and store.loops()[0]["crashes"] == 3
    groups = store.groups()
    assert [(g["signature"], g["count"]) for g in groups] == [(ids[0]["signature"], 4), (other["signature"], 1)]
    counts = store.crash_counts(T0 * 1000 + 1)
    assert counts["total"] == 4 and counts["host_versions"] == {"0.1.0": 4}
    assert counts["bundles"] == {"crasher@1.2.3": 4, "hello@1.0.0": 4}
    assert store.crash_counts(0, "crasher@1.2.3")["total"] == 5
    assert store.crash_counts(0, "crasher@9")["total"] == 0
    assert store.crash_counts(0, "0.1.0")["total"] == 5
    # Another agent's crashes do not count towards A's loop and list apart.
    await upload(store, {"record.txt": record(T0)}, report=f"{T0}-1", agent="B")
    assert len(store.list_reports("B")) == 1 and len(store.list_reports()) == 6


async def test_python_exception_and_hang_reports(store: CrashStore) -> None:
    tb = ('Traceback (most recent call last):\n  File "/x/dispatch.py", line 5, in run\n    f()\n'
          '  File "/b/faulty.py", line 9, in fail_deep\n    raise ValueError(m)\nValueError: boom\n')
    doc = {"agent": "faulty", "method": "fail", "where": "method", "type": "ValueError", "message": "boom",
           "traceback": tb, "time": T0 * 1000 + 5}
    out = await upload(store, {"python-exception.json": json.dumps(doc).encode()}, report=f"{T0}-1-py-1",
                       kind="python_exception")
    row = store.get(out["id"])
    assert row is not None and row["kind"] == "python_exception" and row["time"] == T0 * 1000 + 5
    assert row["summary"]["python_frames"] == ["faulty.py:fail_deep", "dispatch.py:run"]
    assert row["host_version"] == "0.1.0" and row["python_traceback"] == tb
    same = await upload(store, {"python-exception.json": json.dumps(doc).encode()}, report=f"{T0}-1-py-2",
                        kind="python_exception")
    assert same["signature"] == out["signature"] and same["group_count"] == 2 and same["crash_loop"] is False
    hang = b"Timeout (0:00:00.500000)!\nThread 0x1 (most recent call first):\n  File \"/b/c.py\", line 40 in block\n"
    out = await upload(store, {"hang.txt": hang}, report=f"{T0}-1-hang-3", kind="hang")
    row = store.get(out["id"])
    assert row is not None and row["summary"]["python_frames"] == ["c.py:block"] and row["time"] == T0 * 1000
    assert store.crash_counts(0)["total"] == 0  # errors and hangs are not crashes


async def test_garbage_report_is_stored_not_fatal(store: CrashStore) -> None:
    bad_record = b"signal: \xc2\xb9 SIGSEGV\ntime_ns: \xc2\xb9\ncode: x\n"
    out = await upload(store, {"record.txt": bad_record, "crashpad/pending/x.dmp": b"MDMP" + bytes(64)},
                       report="1-1")
    row = store.get(out["id"])
    assert row is not None and row["signal"] is None and row["summary"]["dump_error"]
    assert row["time"] == 1000  # from the report name when the record has no readable time


def test_traceback_frames() -> None:
    assert traceback_frames("") == []


@pytest.mark.parametrize("params, problem", [
    ({"report": "../x", "kind": "crash", "files": [{"name": "a", "size": 1}]}, "bad report name"),
    ({"report": "1-2", "kind": "boom", "files": [{"name": "a", "size": 1}]}, "'kind' must be one of"),
    ({"report": "1-2", "kind": "crash", "files": []}, "'files' must be a list"),
    ({"report": "1-2", "kind": "crash", "files": [{"name": "../etc/passwd", "size": 1}]}, "bad file name"),
    ({"report": "1-2", "kind": "crash", "files": [{"name": "/abs", "size": 1}]}, "bad file name"),
    ({"report": "1-2", "kind": "crash", "files": [{"name": "a", "size": -1}]}, "'size' must be an integer"),
    ({"report": "1-2", "kind": "crash", "files": [{"name": "a", "size": 1}, {"name": "a", "size": 1}]}, "twice"),
    ({"report": "1-2", "kind": "crash", "files": [{"name": "a", "size": 1}], "extra": 1}, "unknown parameter"),
    ({"report": "1-2", "kind": "crash", "files": [{"name": "a", "size": 1}], "annotations": {"k": 1}},
     "'annotations'"),
])
def test_bad_begin_is_refused_naming_the_problem(store: CrashStore, params: dict[str, Any], problem: str) -> None:
    with pytest.raises(RemoteError) as bad:
        store.begin("A", params)
    assert bad.value.code == INVALID_PARAMS and problem in bad.value.message


def test_bad_chunks_are_refused(store: CrashStore) -> None:
    store.begin("A", {"report": "1-2", "kind": "crash", "files": [{"name": "a", "size": 4}]})
    base = {"report": "1-2", "file": "a", "offset": 0, "size": 4, "last": True}
    for change, problem in (({"data": "!!!"}, "not valid base64"), ({"data": base64.b64encode(b"12345").decode()},
                                                                     "run past"),
                            ({"file": "b", "data": ""}, "was not declared"), ({"size": 5, "data": ""}, "has size 4"),
                            ({"data": 5}, "base64 string")):
        with pytest.raises(RemoteError, match=problem):
            store.chunk("A", {**base, **change})
    assert store.chunk("A", {**base, "data": base64.b64encode(b"1234").decode()}) == {"offset": 4}


async def test_protocol_handler_replies(store: CrashStore) -> None:
    import asyncio

    session = Session()
    store.handle(session, 1, "crash.begin", {"report": "1-2", "kind": "crash",
                                             "files": [{"name": "record.txt", "size": len(record())}]})
    store.handle(session, 2, "crash.chunk", chunks("record.txt", record(), "1-2", step=10_000)[0])
    store.handle(session, 3, "crash.end", {"report": "1-2", "sha256": {"record.txt": hashlib.sha256(record())
                                                                      .hexdigest()}})
    store.handle(session, 4, "crash.nope", {})
    store.handle(session, None, "crash.begin", {})  # a notification: ignored
    store.handle(session, 5, "crash.begin", {"report": 5})
    for _ in range(200):
        if len(session.replies) == 5:
            break
        await asyncio.sleep(0.01)
    replies = dict(session.replies)
    assert replies[1]["result"]["offsets"] == {"record.txt": 0}
    assert replies[2]["result"] == {"offset": len(record())}
    assert replies[3]["result"]["group_count"] == 1
    assert replies[4]["error"]["code"] == -32601
    assert replies[5]["error"]["code"] == INVALID_PARAMS


async def test_crash_loop_flag_on_records_and_operator_clear(store: CrashStore) -> None:
    now = int(time.time())
    assert store.loop_fields(["A"]) == {"A": {"crash_loop": False, "crash_loop_since": None, "crash_loop_crashes": 0}}
    assert store.clear_loop("A") is None  # not flagged: nothing to clear
    for i, t in enumerate((now - 200, now - 100, now - 50)):
        out = await upload(store, {"record.txt": record(t)}, report=f"{t}-{i}")
    assert out["crash_loop"] is True
    fields = store.loop_fields(["A", "B"])
    assert fields["A"]["crash_loop"] is True and fields["A"]["crash_loop_crashes"] == 3
    assert abs(fields["A"]["crash_loop_since"] - now * 1000) < 60_000
    assert fields["B"]["crash_loop"] is False
    cleared = store.clear_loop("A")
    assert cleared is not None and cleared["crashes"] == 3 and cleared["first_crash"] == (now - 200) * 1000
    assert store.loop_fields(["A"])["A"]["crash_loop"] is False and store.loops() == []
    assert store.clear_loop("A") is None
    # A crash from before the clear, uploaded late, does not flag it again; only new crashes count.
    late = await upload(store, {"record.txt": record(now - 10)}, report=f"{now - 10}-late")
    assert late["crash_loop"] is False
    flags = [(await upload(store, {"record.txt": record(now + i)}, report=f"{now + i}-new"))["crash_loop"]
             for i in (5, 6, 7)]
    assert flags == [False, False, True]
    loop = store.loop_of("A")
    assert loop is not None and loop["crashes"] == 3 and loop["first_crash"] == (now + 5) * 1000
