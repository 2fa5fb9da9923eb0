"""The runtime's crash reporter against the real endpoint store, in one process: Python errors from log events become
reports, uploads resume where the endpoint stopped, an oversized minidump is skipped, a refused report is given up."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

from pyagent.endpoint._crashes import CrashStore
from pyagent.protocol import RemoteError
from pyagent.runtime._crash import CrashCapture, collect_pending
from pyagent.runtime._crashreport import CrashReporter
from pyagent.runtime._log import log_event


class Endpoint:
    """`request(method, params, timeout)` served by a CrashStore; `fail_after` chunks raise once (a lost session)."""

    def __init__(self, root: Path, max_report_bytes: int = 16 << 20) -> None:
        self.store = CrashStore(sqlite3.connect(":memory:", isolation_level=None), root,
                                max_report_bytes=max_report_bytes)
        self.calls: list[str] = []
        self.fail_after: int | None = None

    async def request(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        self.calls.append(method)
        if method == "crash.begin":
            return self.store.begin("agent-1", params)
        if method == "crash.chunk":
            if self.fail_after is not None and self.calls.count("crash.chunk") > self.fail_after:
                self.fail_after = None
                raise RemoteError(-32003, "session lost")
            return self.store.chunk("agent-1", params)
        return await self.store.end("agent-1", params)


def capture(tmp_path: Path) -> CrashCapture:
    c = CrashCapture(tmp_path / "crash", handler=None, annotations={"agent_id": "agent-1", "host_version": "9.9"})
    c.proc_dir.mkdir(parents=True)
    return c


async def run_until(reporter: CrashReporter, endpoint: Endpoint, done: Any) -> None:
    task = asyncio.get_running_loop().create_task(reporter.run(endpoint.request, lambda: True))
    try:
        for _ in range(500):
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the reporter did not finish in 5 s")
    finally:
        task.cancel()
        await asyncio.wait({task})


def test_method_error_log_becomes_an_uploaded_report(tmp_path: Path) -> None:
    async def main() -> None:
        c = capture(tmp_path)
        reporter = CrashReporter(c)
        reporter.install()
        try:
            log_event(logging.getLogger("pyagent.runtime"), logging.ERROR, "call.failed",
                      "faulty.fail raised ValueError: boom", method="faulty.fail", session=0,
                      traceback='Traceback (most recent call last):\n  File "/b/f.py", line 3, in fail\nValueError: boom')
        finally:
            reporter.uninstall()
        assert [r.kind for r in collect_pending(c.crash_dir, exclude=c.proc_dir)] == ["python_exception"]
        endpoint = Endpoint(tmp_path / "ep")
        await run_until(reporter, endpoint, lambda: reporter.uploaded == 1)
        row = endpoint.store.list_reports()[0]
        assert row["kind"] == "python_exception" and row["host_version"] == "9.9"
        full = endpoint.store.get(row["id"])
        assert full is not None and full["summary"]["method"] == "fail" and full["summary"]["type"] == "ValueError"
        assert collect_pending(c.crash_dir, exclude=c.proc_dir) == []

    asyncio.run(main())


def test_upload_resumes_and_skips_oversized_dump(tmp_path: Path) -> None:
    async def main() -> None:
        c = capture(tmp_path)
        old = c.crash_dir / "100-42"
        (old / "crashpad" / "pending").mkdir(parents=True)
        (old / "record.txt").write_text("signal: 11 SIGSEGV\ntime_ns: 100000000000\nannotation: host_version=1.0\n"
                                        + "x" * 600_000 + "\n")
        (old / "crashpad" / "pending" / "d.dmp").write_bytes(b"MDMP" + bytes(900_000))
        endpoint = Endpoint(tmp_path / "ep", max_report_bytes=700_000)
        endpoint.fail_after = 1  # the session is lost after the first chunk
        reporter = CrashReporter(c, frame_bytes=64 * 1024)
        await run_until(reporter, endpoint, lambda: reporter.uploaded == 1)
        row = endpoint.store.list_reports()[0]
        assert row["signal_name"] == "SIGSEGV" and row["host_version"] == "1.0" and row["time"] == 100_000
        full = endpoint.store.get(row["id"])
        assert full is not None and full["summary"]["skipped"] == {"crashpad/pending/d.dmp": 900_004}
        assert endpoint.calls.count("crash.begin") == 2  # asked again after the failure, resumed at the offset
        assert reporter.uploaded_bytes < 700_000  # the resumed upload did not resend what the endpoint had
        assert (c.crash_dir / "completed" / "100-42").is_dir()

    asyncio.run(main())


def test_refused_report_is_given_up(tmp_path: Path) -> None:
    async def main() -> None:
        c = capture(tmp_path)
        (c.crash_dir / "bad name!").mkdir()
        (c.crash_dir / "bad name!" / "record.txt").write_text("signal: 11\n")
        reporter = CrashReporter(c)
        endpoint = Endpoint(tmp_path / "ep")
        await run_until(reporter, endpoint, lambda: reporter.given_up == 1)
        assert endpoint.store.list_reports() == []
        assert collect_pending(c.crash_dir, exclude=c.proc_dir) == []

    asyncio.run(main())


def test_too_many_waiting_error_reports_are_dropped(tmp_path: Path) -> None:
    reporter = CrashReporter(capture(tmp_path), max_pending_errors=2)
    for i in range(4):
        reporter.record_python_error(agent="a", method="m", where="method", type="E", message=str(i), traceback="")
    assert reporter.dropped == 2

