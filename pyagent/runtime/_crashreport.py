"""Sending crash reports to the endpoint, and turning Python errors and hangs into reports.

Every report is a directory under the crash directory (`_crash.py`): those a crashed or hung worker left behind, and
those this worker writes itself when a bundle method or a periodic task raises (`python-exception.json`) or the hang
watchdog fires (`hang.txt`). Writing them to disk first means an error seen while the endpoint is unreachable, or just
before a crash, is still reported later.

`CrashReporter.run` is one background task (concurrency 1): whenever a session is up and reports are pending it
uploads the oldest with `crash.begin` → `crash.chunk`… → `crash.end` (docs/protocol.md, "Crash reports"), resuming at
the offsets the endpoint already has, then moves it to `<crash dir>/completed/`. Chunks are small (256 KiB frames) so
that calls on the same session never wait long behind an upload.

Python errors are taken from the runtime's own `call.failed` and `periodic.failed` log events (a logging handler), so
the dispatcher and the periodic scheduler need not know about crash reporting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from pyagent._files import write_atomic
from pyagent.protocol import INVALID_PARAMS, METHOD_NOT_FOUND, RemoteError
from pyagent.runtime._crash import (
    COMPLETED,
    PYTHON_EXCEPTION,
    CrashCapture,
    CrashReport,
    collect_pending,
    iter_chunks,
    mark_completed,
)
from pyagent.runtime._errors import PyagentRuntimeError
from pyagent.runtime._log import log_event

UPLOAD_FRAME_BYTES = 256 * 1024
MAX_PENDING_ERRORS = 50  # Python-error and hang reports waiting for upload; more are dropped (and counted)
MAX_TRACEBACK_CHARS = 64 * 1024
RETRY_MIN = 1.0
RETRY_MAX = 60.0
POLL_DISCONNECTED = 0.2  # seconds between checks for a session while reports wait
REQUEST_TIMEOUT = 30.0
END_TIMEOUT = 120.0  # the endpoint hashes and parses the report before it answers

_log = logging.getLogger("pyagent.runtime")
_ERROR_EVENTS = {"call.failed": "method", "periodic.failed": "periodic"}
_OWN_TAGS = ("-py-", "-hang-")

Request = Callable[..., Awaitable[Any]]


class ErrorLogHandler(logging.Handler):
    """Turns the runtime's `call.failed` / `periodic.failed` records into Python error reports."""

    def __init__(self, reporter: CrashReporter) -> None:
        super().__init__(logging.ERROR)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        where_kind = _ERROR_EVENTS.get(str(getattr(record, "event", "")))
        if where_kind is None:
            return
        try:
            fields = getattr(record, "fields", None) or {}
            # Both events log "<object>.<method> raised <Type>: <message>".
            where, _, rest = record.getMessage().partition(" raised ")
            etype, _, message = rest.partition(": ")
            if where_kind == "method":
                text = str(fields.get("traceback", ""))
            else:
                exc = record.exc_info[1] if record.exc_info else None
                text = "".join(traceback.format_exception(exc)) if exc is not None else ""
            agent, _, method = where.partition(".")
            self.reporter.record_python_error(agent=str(fields.get("agent", agent)), method=method,
                                              where=where_kind, type=etype, message=message, traceback=text)
        except Exception:
            self.handleError(record)


class CrashReporter:
    """Writes Python-error and hang reports, and uploads every pending report (see the module's docstring)."""

    def __init__(self, capture: CrashCapture, *, frame_bytes: int = UPLOAD_FRAME_BYTES,
                 max_pending_errors: int = MAX_PENDING_ERRORS) -> None:
        self.capture = capture
        self.crash_dir = capture.crash_dir
        self.frame_bytes = frame_bytes
        self.max_pending_errors = max_pending_errors
        self.handler = ErrorLogHandler(self)
        self.uploaded = 0
        self.uploaded_bytes = 0
        self.dropped = 0
        self.given_up = 0
        self._seq = 0
        self._wake = asyncio.Event()
        self._logger = logging.getLogger("pyagent.runtime")

    # --- reports of this worker ---

    def install(self) -> None:
        """Start turning error log events and hangs into reports."""
        self._logger.addHandler(self.handler)
        self.capture.on_hang = self.record_hang

    def uninstall(self) -> None:
        self._logger.removeHandler(self.handler)
        self.capture.on_hang = None

    def _new_dir(self, tag: str) -> Path | None:
        try:
            waiting = sum(1 for p in self.crash_dir.iterdir() if p.is_dir() and any(t in p.name for t in _OWN_TAGS))
        except OSError:
            waiting = 0
        if waiting >= self.max_pending_errors:
            self.dropped += 1
            log_event(_log, logging.WARNING, "crash.report.dropped",
                      f"{waiting} error reports already wait for upload; this one is dropped", dropped=self.dropped)
            return None
        self._seq += 1
        path = self.crash_dir / f"{int(time.time())}-{os.getpid()}{tag}{self._seq}"
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path

    def record_python_error(self, *, agent: str, method: str, where: str, type: str, message: str,
                            traceback: str) -> None:
        """An uncaught exception in a bundle method (`where` = method) or periodic task (periodic)."""
        path = self._new_dir("-py-")
        if path is None:
            return
        doc = {"agent": agent, "method": method, "where": where, "type": type, "message": message[:4096],
               "traceback": traceback[-MAX_TRACEBACK_CHARS:], "time": int(time.time() * 1000)}
        write_atomic(path / PYTHON_EXCEPTION, json.dumps(doc).encode())
        self._wake.set()

    def record_hang(self, text: str) -> None:
        """The Python tracebacks the hang watchdog wrote while the event loop was blocked."""
        path = self._new_dir("-hang-")
        if path is None:
            return
        write_atomic(path / "hang.txt", text[-MAX_TRACEBACK_CHARS:].encode())
        self._wake.set()

    # --- uploads ---

    async def run(self, request: Request, connected: Callable[[], bool]) -> None:
        """Upload pending reports for ever (cancel to stop). `request(method, params, timeout)` sends on the
        healthiest session; `connected()` says whether one is up."""
        delay = RETRY_MIN
        while True:
            reports = collect_pending(self.crash_dir, exclude=self.capture.proc_dir)
            if not reports:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not connected():
                await _wait(self._wake, POLL_DISCONNECTED)
                continue
            report = reports[0]
            try:
                await self.upload(report, request)
                delay = RETRY_MIN
            except RemoteError as exc:
                restart = isinstance(exc.data, dict) and exc.data.get("restart")
                if exc.code == INVALID_PARAMS and not restart:
                    # The endpoint will never take this report: keep it locally (completed), do not retry forever.
                    self.given_up += 1
                    log_event(_log, logging.ERROR, "crash.upload.refused",
                              f"the endpoint refused crash report {report.id}: {exc.message}", report=report.id)
                    mark_completed(report, self.crash_dir)
                    continue
                wait = RETRY_MAX if exc.code == METHOD_NOT_FOUND else delay
                log_event(_log, logging.WARNING, "crash.upload.failed",
                          f"uploading crash report {report.id} failed: {exc.message}; retrying in {wait:g} s",
                          report=report.id, code=exc.code)
                await asyncio.sleep(wait)
                delay = min(delay * 2, RETRY_MAX)
            except (PyagentRuntimeError, OSError) as exc:  # timeout, session lost, runtime stopping, file gone
                log_event(_log, logging.WARNING, "crash.upload.failed",
                          f"uploading crash report {report.id} failed: {exc}; retrying in {delay:g} s",
                          report=report.id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)

    async def upload(self, report: CrashReport, request: Request) -> dict[str, Any]:
        """Upload one report and move it to completed; returns the endpoint's answer to `crash.end`."""
        started = time.monotonic()
        annotations = {k[len("annotation."):]: v for k, v in report.meta.items() if k.startswith("annotation.")}
        begin = await request("crash.begin", {
            "report": report.id, "kind": report.kind, "annotations": annotations or self.capture.annotations,
            "files": [{"name": f.name, "size": f.size} for f in report.files]}, REQUEST_TIMEOUT)
        if not isinstance(begin, dict):
            raise RemoteError(INVALID_PARAMS, f"crash.begin: unexpected answer {begin!r}")
        if begin.get("done"):
            mark_completed(report, self.crash_dir)
            log_event(_log, logging.INFO, "crash.uploaded", f"crash report {report.id} was already at the endpoint",
                      report=report.id, id=begin.get("id"))
            return begin
        skip = set(begin.get("skip") or ())
        resume: dict[str, int] = {f.name: f.size for f in report.files if f.name in skip}
        offsets = begin.get("offsets") or {}
        resume.update({k: v for k, v in offsets.items() if isinstance(v, int) and k not in skip})
        sent = 0
        for chunk in iter_chunks(report, self.frame_bytes, resume):
            await request("crash.chunk", chunk, REQUEST_TIMEOUT)
            sent += len(chunk["data"]) * 3 // 4
        digests = {}
        for f in report.files:
            if f.name not in skip:
                digests[f.name] = await _sha256(f.path)
        end = await request("crash.end", {"report": report.id, "sha256": digests}, END_TIMEOUT)
        mark_completed(report, self.crash_dir)
        self.uploaded += 1
        self.uploaded_bytes += sent
        log_event(_log, logging.INFO, "crash.uploaded", f"crash report {report.id} uploaded", report=report.id,
                  kind=report.kind, id=end.get("id") if isinstance(end, dict) else None, bytes=sent,
                  skipped=",".join(sorted(skip)), ms=round((time.monotonic() - started) * 1000))
        return end if isinstance(end, dict) else {}

    def stats(self) -> Mapping[str, int]:
        return {"uploaded": self.uploaded, "uploaded_bytes": self.uploaded_bytes, "dropped": self.dropped,
                "given_up": self.given_up}


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        pass


async def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            await asyncio.sleep(0)  # a large minidump does not hold the loop
    return h.hexdigest()


__all__ = ["COMPLETED", "CrashReporter", "ErrorLogHandler"]
