"""Crash reports at the endpoint: resumable uploads (`crash.begin` / `crash.chunk` / `crash.end`), storage, grouping,
crash counts per version, and crash-loop detection.

An agent uploads each report its crashed (or hung, or failing) worker left behind as a set of files (the host's crash
record, the Crashpad minidump, the Python tracebacks; docs/protocol.md, "Crash reports"):

- `crash.begin` declares the files and their sizes. The endpoint answers with the offset it already has of each file
  (an interrupted upload resumes where it stopped) and the files it will not take: a report may hold at most
  `max_report_bytes` (default 16 MiB); files are accepted smallest first, so the record and the tracebacks always fit
  and an oversized minidump is the one left out (the report is still stored, parsed from the record, with
  `dump_error` saying why there is no minidump).
- `crash.chunk` appends base64 data at an offset that must be exactly what the endpoint has (no holes, no overlap).
- `crash.end` checks every file's SHA-256, parses the report (`_crashdump.parse_report` for crashes) in a worker
  thread, moves the files to `STATE_DIR/crashes/<id>/` and records one row in the `crash_reports` table.

Files in flight live in `STATE_DIR/crashes/incoming/<agent id>/<report>/`. The report id at the endpoint is derived
from (agent id, the agent's report name), so uploading the same report twice stores it once.

Crash loops: when one agent has `loop_count` crashes (kind `crash`) within `loop_window` seconds of crash time, it is
flagged in the `crash_loops` table and a warning is logged (`crash.loop`). The flag shows on the agent's record in the
operator API (`crash_loop`, `crash_loop_since`, `crash_loop_crashes`; `loop_fields`) and stays until an operator clears
it (`clear_loop`: `DELETE /api/v1/crash-loops/{agent}`, `pyagent crashes clear-loop AGENT`). Clearing records the
time in `crash_loop_clears`: crashes before it no longer count, so the agent is flagged again only after `loop_count`
new crashes within the window. There is no automatic expiry: a loop nobody looked at stays visible.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import shutil
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pyagent.endpoint._crashdump import CrashDumpError, parse_report, python_frames
from pyagent.endpoint._log import log_event
from pyagent.protocol import INTERNAL_ERROR, INVALID_PARAMS, METHOD_NOT_FOUND, RemoteError

_log = logging.getLogger("pyagent.endpoint.crashes")

DEFAULT_MAX_REPORT_BYTES = 16 << 20
DEFAULT_LOOP_COUNT = 3
DEFAULT_LOOP_WINDOW = 300.0
MAX_FILES = 16
MAX_STAGED_PER_AGENT = 4
MAX_ANNOTATIONS = 64
MAX_ANNOTATION_CHARS = 4096
KINDS = ("crash", "hang", "python_exception")
METHODS = ("crash.begin", "crash.chunk", "crash.end")
PYTHON_EXCEPTION_FILE = "python-exception.json"
HANG_FILE = "hang.txt"
RECORD_FILE = "record.txt"
TRACEBACK_FILE = "python-traceback.txt"
TOP_PY_FRAMES = 3

_REPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_FILE_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")
_TB_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line \d+, in (?P<func>\S+)')
_UPLOAD_META = ".upload.json"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS crash_reports (
    id               TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL,
    report           TEXT NOT NULL,
    kind             TEXT NOT NULL,
    time             INTEGER NOT NULL,
    received         INTEGER NOT NULL,
    signal           INTEGER,
    signal_name      TEXT,
    signature        TEXT NOT NULL,
    host_version     TEXT,
    bundles          TEXT NOT NULL DEFAULT '{}',
    python_traceback TEXT NOT NULL DEFAULT '',
    size             INTEGER NOT NULL,
    summary          TEXT NOT NULL DEFAULT '{}',
    UNIQUE (agent_id, report)
);
CREATE INDEX IF NOT EXISTS crash_reports_time ON crash_reports(time);
CREATE INDEX IF NOT EXISTS crash_reports_signature ON crash_reports(signature);
CREATE INDEX IF NOT EXISTS crash_reports_agent ON crash_reports(agent_id, time);
CREATE TABLE IF NOT EXISTS crash_loops (
    agent_id    TEXT PRIMARY KEY,
    detected_at INTEGER NOT NULL,
    crashes     INTEGER NOT NULL,
    first_crash INTEGER NOT NULL,
    last_crash  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS crash_loop_clears (
    agent_id   TEXT PRIMARY KEY,
    cleared_at INTEGER NOT NULL
);
"""

_LIST_COLUMNS = ("id, agent_id, report, kind, time, received, signal, signal_name, signature, host_version, bundles, "
                 "size")


class CrashSession(Protocol):
    """What the crash handlers need from an agent session."""

    agent_id: str | None

    def send_response(self, msg_id: int, result: Any) -> None: ...
    def send_error(self, msg_id: int, code: int, message: str, data: Any = None) -> None: ...


def report_id(agent_id: str, report: str) -> str:
    """The endpoint's id of an agent's report: stable, so a re-upload is recognised."""
    return hashlib.sha256(f"{agent_id}/{report}".encode()).hexdigest()[:16]


def _bad(message: str, data: Any = None) -> RemoteError:
    return RemoteError(INVALID_PARAMS, message, data)


def _string(params: Mapping[str, Any], key: str, method: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"{method}: parameter '{key}' must be a non-empty string", {"parameter": key})
    return value


def _int(params: Mapping[str, Any], key: str, method: str, low: int = 0, high: int = 1 << 40) -> int:
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise _bad(f"{method}: parameter '{key}' must be an integer from {low} to {high}", {"parameter": key})
    return value


def _check_file_name(name: Any, method: str) -> str:
    if not isinstance(name, str) or len(name) > 200:
        raise _bad(f"{method}: a file name must be a string of at most 200 characters", {"parameter": "files"})
    parts = name.split("/")
    if not all(_FILE_PART.match(p) and p not in (".", "..") for p in parts) or name == _UPLOAD_META:
        raise _bad(f"{method}: bad file name {name!r} (relative path of letters, digits, '.', '_', '-')",
                   {"parameter": "files"})
    return name


def _check_keys(params: Mapping[str, Any], allowed: tuple[str, ...], method: str) -> None:
    for key in params:
        if key not in allowed:
            raise _bad(f"{method}: unknown parameter '{key}'", {"parameter": key})


def _bundles(text: str) -> dict[str, str]:
    """`a=1.0,b=2.0` (the crash annotation) as {name: version}."""
    out: dict[str, str] = {}
    for item in text.split(","):
        name, sep, version = item.partition("=")
        if sep and name:
            out[name.strip()] = version.strip()
    return out


def traceback_frames(text: str) -> list[str]:
    """The innermost frames (file:function) of a `traceback.format_exception` text, innermost first."""
    frames = [f"{m['file'].rsplit('/', 1)[-1]}:{m['func']}" for line in text.splitlines()
              if (m := _TB_FRAME.match(line))]
    return frames[::-1][:TOP_PY_FRAMES]


def _signature(*parts: Any) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:16]


@dataclass
class _Upload:
    agent_id: str
    report: str
    kind: str
    files: dict[str, int]  # accepted files -> declared size
    skipped: dict[str, int]
    annotations: dict[str, str]
    dir: Path


def _time_from_name(report: str) -> int | None:
    head = report.split("-", 1)[0]
    return int(head) * 1000 if _digits(head) and len(head) <= 12 else None


def _digits(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts '¹', which int() refuses)."""
    return text.isascii() and text.isdigit()


def analyse(kind: str, report: str, files: Mapping[str, Path], annotations: Mapping[str, str],
            skipped: Mapping[str, int]) -> dict[str, Any]:
    """Parse one complete report (pure apart from reading its files; runs in a worker thread). Returns the row's
    fields: time, signal, signal_name, signature, host_version, bundles, python_traceback, summary."""
    now = int(time.time() * 1000)

    def text(name: str, limit: int = 4 << 20) -> str:
        path = files.get(name)
        if path is None:
            return ""
        with open(path, "rb") as fh:
            return fh.read(limit).decode("utf-8", errors="replace")

    summary: dict[str, Any] = {"kind": kind}
    signal: int | None = None
    signal_name: str | None = None
    py_tb = ""
    when = _time_from_name(report) or now
    if kind == "crash":
        dumps = sorted(n for n in files if n.endswith(".dmp"))
        dump = files[dumps[0]].read_bytes() if dumps else None
        record = text(RECORD_FILE)
        py_tb = text(TRACEBACK_FILE)
        try:
            parsed = parse_report(dump, record, py_tb)
        except Exception as exc:  # nothing to go on, or a record/dump the parser cannot read: store it anyway
            parsed = {"signal": None, "signal_name": None, "frames": [], "python_frames": python_frames(py_tb),
                      "annotations": {}, "record": {},
                      "dump_error": str(exc) if isinstance(exc, CrashDumpError) else f"{type(exc).__name__}: {exc}",
                      "modules": [],
                      "signature": _signature("crash", "unknown", *python_frames(py_tb))}
        if not dumps:
            why = "no minidump in the report"
            handler = str((parsed.get("record") or {}).get("minidump_handler", ""))
            if handler == "none":
                why = ("none: the host ran without crashpad_handler; reported from the host's crash record alone "
                       "(signal, address, backtrace)")
            elif handler and handler != "exited_0":
                status = (parsed.get("record") or {}).get("minidump_handler_status", "?")
                why = (f"none: crashpad_handler could not write one (minidump_handler: {handler}, status {status};"
                       " e.g. ptrace denied by a seccomp filter or Yama); reported from the host's crash record alone"
                       " (signal, address, backtrace)")
            big = [f"{n} ({s} bytes)" for n, s in skipped.items() if n.endswith(".dmp")]
            if big:
                why = f"minidump not uploaded: {', '.join(big)} over the report size limit"
            parsed["dump_error"] = parsed.get("dump_error") or why
        signal, signal_name = parsed.get("signal"), parsed.get("signal_name")
        summary.update({k: v for k, v in parsed.items() if k not in ("python_traceback",)})
        record_meta = parsed.get("record") or {}
        if _digits(str(record_meta.get("time_ns", ""))):
            when = int(record_meta["time_ns"]) // 1_000_000
        signature = str(parsed["signature"])
        anns = dict(parsed.get("annotations") or {}) or dict(annotations)
    elif kind == "python_exception":
        try:
            info = json.loads(text(PYTHON_EXCEPTION_FILE))
        except ValueError as exc:
            info = {"type": "?", "message": f"unreadable {PYTHON_EXCEPTION_FILE}: {exc}"}
        if not isinstance(info, dict):
            info = {}
        py_tb = str(info.get("traceback", ""))
        frames = traceback_frames(py_tb)
        for key in ("agent", "method", "where", "type", "message"):
            summary[key] = str(info.get(key, ""))
        summary["python_frames"] = frames
        if isinstance(info.get("time"), int):
            when = info["time"]
        signature = _signature("python_exception", summary["type"], *frames)
        anns = dict(annotations)
    else:  # hang
        py_tb = text(HANG_FILE)
        frames = python_frames(py_tb)
        summary["python_frames"] = frames
        signature = _signature("hang", *frames)
        anns = dict(annotations)
    summary["annotations"] = anns
    summary["files"] = {name: path.stat().st_size for name, path in files.items()}
    summary["skipped"] = dict(skipped)
    return {"time": when, "signal": signal, "signal_name": signal_name, "signature": signature,
            "host_version": anns.get("host_version"), "bundles": _bundles(anns.get("bundles", "")),
            "python_traceback": py_tb, "summary": summary}


class CrashStore:
    """Reports on disk under `root` and their rows in SQLite (the registry's connection; event loop thread only)."""

    def __init__(self, db: sqlite3.Connection, root: Path, *, max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
                 loop_count: int = DEFAULT_LOOP_COUNT, loop_window: float = DEFAULT_LOOP_WINDOW) -> None:
        if max_report_bytes < 4096:
            raise ValueError(f"max_report_bytes must be at least 4096, got {max_report_bytes}")
        if loop_count < 2 or not loop_window > 0:
            raise ValueError("crash loops need loop_count >= 2 and a positive loop_window")
        self._db = db
        self.root = root
        self.incoming = root / "incoming"
        self.max_report_bytes = max_report_bytes
        self.loop_count = loop_count
        self.loop_window = loop_window
        self._uploads: dict[tuple[str, str], _Upload] = {}
        self._ending: set[tuple[str, str]] = set()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db.executescript(_SCHEMA)

    # -- uploads -------------------------------------------------------------------------------------------------

    def begin(self, agent_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        method = "crash.begin"
        _check_keys(params, ("report", "kind", "files", "annotations", "meta"), method)
        report = _string(params, "report", method)
        if not _REPORT_NAME.match(report):
            raise _bad(f"{method}: bad report name {report!r}", {"parameter": "report"})
        kind = params.get("kind")
        if kind not in KINDS:
            raise _bad(f"{method}: 'kind' must be one of {', '.join(KINDS)}, got {kind!r}", {"parameter": "kind"})
        files = params.get("files")
        if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
            raise _bad(f"{method}: 'files' must be a list of 1 to {MAX_FILES} {{name, size}} objects",
                       {"parameter": "files"})
        declared: dict[str, int] = {}
        for f in files:
            if not isinstance(f, dict) or set(f) != {"name", "size"}:
                raise _bad(f"{method}: each file must be an object {{name, size}}", {"parameter": "files"})
            name = _check_file_name(f["name"], method)
            if name in declared:
                raise _bad(f"{method}: file {name!r} is listed twice", {"parameter": "files"})
            declared[name] = _int(f, "size", method)
        annotations = params.get("annotations", {})
        if (not isinstance(annotations, dict) or len(annotations) > MAX_ANNOTATIONS
                or not all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= MAX_ANNOTATION_CHARS
                           for k, v in annotations.items())):
            raise _bad(f"{method}: 'annotations' must be an object of at most {MAX_ANNOTATIONS} short strings",
                       {"parameter": "annotations"})
        rid = report_id(agent_id, report)
        if self._db.execute("SELECT 1 FROM crash_reports WHERE id = ?", (rid,)).fetchone():
            return {"id": rid, "done": True}
        accepted: dict[str, int] = {}
        skipped: dict[str, int] = {}
        total = 0
        for name, size in sorted(declared.items(), key=lambda item: (item[1], item[0])):
            if total + size <= self.max_report_bytes:
                accepted[name] = size
                total += size
            else:
                skipped[name] = size
        key = (agent_id, report)
        staging = self.incoming / agent_id / report
        old = self._uploads.get(key)
        if old is None or old.files != accepted or old.kind != kind:
            if staging.exists():
                shutil.rmtree(staging)
            self._evict(agent_id)
        upload = _Upload(agent_id, report, kind, accepted, skipped, dict(annotations), staging)
        self._uploads[key] = upload
        staging.mkdir(parents=True, exist_ok=True)
        offsets = {}
        for name in accepted:
            path = staging / name
            offsets[name] = min(path.stat().st_size, accepted[name]) if path.exists() else 0
        if skipped:
            log_event(_log, logging.WARNING, "crash.upload.skipped", agent=agent_id, report=report,
                      files=",".join(skipped), limit=self.max_report_bytes)
        log_event(_log, logging.INFO, "crash.upload.started", agent=agent_id, report=report, kind=kind,
                  bytes=total, resumed=sum(offsets.values()))
        return {"id": rid, "done": False, "offsets": offsets, "skip": sorted(skipped),
                "max_report_bytes": self.max_report_bytes}

    def _evict(self, agent_id: str) -> None:
        """At most MAX_STAGED_PER_AGENT uploads in flight per agent: forget the oldest."""
        mine = [k for k in self._uploads if k[0] == agent_id]
        for key in mine[:max(0, len(mine) - MAX_STAGED_PER_AGENT + 1)]:
            upload = self._uploads.pop(key)
            shutil.rmtree(upload.dir, ignore_errors=True)

    def _upload_for(self, agent_id: str, params: Mapping[str, Any], method: str) -> _Upload:
        report = _string(params, "report", method)
        upload = self._uploads.get((agent_id, report))
        if upload is None:
            raise _bad(f"{method}: no upload of report {report!r} in progress; send crash.begin first",
                       {"parameter": "report", "restart": True})
        return upload

    def chunk(self, agent_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        method = "crash.chunk"
        _check_keys(params, ("report", "file", "offset", "size", "data", "last"), method)
        upload = self._upload_for(agent_id, params, method)
        name = _string(params, "file", method)
        if name not in upload.files:
            what = "is over the report size limit" if name in upload.skipped else "was not declared in crash.begin"
            raise _bad(f"{method}: file {name!r} {what}", {"parameter": "file"})
        size = _int(params, "size", method)
        if size != upload.files[name]:
            raise _bad(f"{method}: file {name!r} has size {upload.files[name]} in crash.begin, {size} here",
                       {"parameter": "size"})
        offset = _int(params, "offset", method)
        path = upload.dir / name
        have = path.stat().st_size if path.exists() else 0
        if offset != have:
            raise _bad(f"{method}: {name!r} continues at offset {have}, not {offset}",
                       {"parameter": "offset", "offset": have})
        data = params.get("data")
        if not isinstance(data, str):
            raise _bad(f"{method}: 'data' must be a base64 string", {"parameter": "data"})
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _bad(f"{method}: 'data' is not valid base64: {exc}", {"parameter": "data"}) from None
        if offset + len(raw) > size:
            raise _bad(f"{method}: {len(raw)} bytes at offset {offset} run past the file's size {size}",
                       {"parameter": "data"})
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(raw)
        return {"offset": offset + len(raw)}

    async def end(self, agent_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        method = "crash.end"
        _check_keys(params, ("report", "sha256"), method)
        upload = self._upload_for(agent_id, params, method)
        digests = params.get("sha256")
        if not isinstance(digests, dict):
            raise _bad(f"{method}: 'sha256' must be an object {{file: hex digest}}", {"parameter": "sha256"})
        key = (agent_id, upload.report)
        if key in self._ending:
            raise _bad(f"{method}: report {upload.report!r} is already being stored", {"parameter": "report"})
        for name, size in upload.files.items():
            path = upload.dir / name
            have = path.stat().st_size if path.exists() else 0
            if have != size:
                raise _bad(f"{method}: file {name!r} is incomplete ({have} of {size} bytes)",
                           {"parameter": "report", "offset": have, "file": name})
            if not isinstance(digests.get(name), str):
                raise _bad(f"{method}: no sha256 for file {name!r}", {"parameter": "sha256"})
        self._ending.add(key)
        try:
            files = {name: upload.dir / name for name in upload.files}
            bad = await asyncio.to_thread(_check_digests, files, digests)
            if bad:
                self._uploads.pop(key, None)
                shutil.rmtree(upload.dir, ignore_errors=True)
                raise _bad(f"{method}: SHA-256 mismatch for {', '.join(bad)}; upload the report again",
                           {"parameter": "sha256", "files": bad, "restart": True})
            fields = await asyncio.to_thread(analyse, upload.kind, upload.report, files, upload.annotations,
                                             upload.skipped)
            return self._store(upload, fields)
        finally:
            self._ending.discard(key)

    def _store(self, upload: _Upload, fields: dict[str, Any]) -> dict[str, Any]:
        rid = report_id(upload.agent_id, upload.report)
        target = self.root / rid
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(upload.dir), str(target))
        self._uploads.pop((upload.agent_id, upload.report), None)
        size = sum(upload.files.values())
        now = int(time.time() * 1000)
        self._db.execute(
            "INSERT OR REPLACE INTO crash_reports (id, agent_id, report, kind, time, received, signal, signal_name,"
            " signature, host_version, bundles, python_traceback, size, summary)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (rid, upload.agent_id, upload.report, upload.kind, fields["time"], now, fields["signal"],
             fields["signal_name"], fields["signature"], fields["host_version"], json.dumps(fields["bundles"]),
             fields["python_traceback"], size, json.dumps(fields["summary"])))
        group_count = self._db.execute("SELECT COUNT(*) FROM crash_reports WHERE signature = ?",
                                       (fields["signature"],)).fetchone()[0]
        log_event(_log, logging.WARNING if upload.kind == "crash" else logging.INFO, "crash.stored", id=rid,
                  agent=upload.agent_id, report=upload.report, kind=upload.kind, signal=fields["signal_name"],
                  signature=fields["signature"], group_count=group_count, bytes=size,
                  delay_ms=now - int(fields["time"]))
        loop = self._check_loop(upload.agent_id, int(fields["time"])) if upload.kind == "crash" else False
        return {"id": rid, "signature": fields["signature"], "group_count": group_count, "crash_loop": loop}

    def _check_loop(self, agent_id: str, when: int) -> bool:
        window = int(self.loop_window * 1000)
        cleared = self._db.execute("SELECT cleared_at FROM crash_loop_clears WHERE agent_id = ?",
                                   (agent_id,)).fetchone()
        low = max(when - window, cleared[0] + 1) if cleared else when - window
        if when < low:
            return False  # a crash from before the operator cleared the loop, uploaded late
        rows = self._db.execute(
            "SELECT time FROM crash_reports WHERE agent_id = ? AND kind = 'crash' AND time BETWEEN ? AND ?"
            " ORDER BY time", (agent_id, low, when + window)).fetchall()
        times = [r[0] for r in rows]
        # The largest number of crashes inside any window of `loop_window` seconds around this one.
        best, first, last = 0, when, when
        for i, start in enumerate(times):
            inside = [t for t in times[i:] if t - start <= window]
            if len(inside) > best:
                best, first, last = len(inside), inside[0], inside[-1]
        if best < self.loop_count:
            return False
        self._db.execute(
            "INSERT INTO crash_loops (agent_id, detected_at, crashes, first_crash, last_crash) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT(agent_id) DO UPDATE SET crashes = MAX(crashes, excluded.crashes),"
            " last_crash = MAX(last_crash, excluded.last_crash)",
            (agent_id, int(time.time() * 1000), best, first, last))
        log_event(_log, logging.WARNING, "crash.loop", agent=agent_id, crashes=best, window_s=self.loop_window,
                  first_crash=first, last_crash=last)
        return True

    # -- queries -------------------------------------------------------------------------------------------------

    def list_reports(self, agent_id: str | None = None, kind: str | None = None,
                     limit: int = 500) -> list[dict[str, Any]]:
        where, args = [], []
        if agent_id:
            where.append("agent_id = ?")
            args.append(agent_id)
        if kind:
            where.append("kind = ?")
            args.append(kind)
        sql = f"SELECT {_LIST_COLUMNS} FROM crash_reports"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY time DESC, id LIMIT ?"
        rows = self._db.execute(sql, (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    @staticmethod
    def _row(r: tuple[Any, ...]) -> dict[str, Any]:
        return {"id": r[0], "agent_id": r[1], "report": r[2], "kind": r[3], "time": r[4], "received": r[5],
                "signal": r[6], "signal_name": r[7], "signature": r[8], "host_version": r[9],
                "bundles": json.loads(r[10]), "size": r[11]}

    def get(self, ref: str) -> dict[str, Any] | None:
        """One report by id or unique id prefix, with its summary and Python traceback; None when unknown.
        Raises ValueError when a prefix matches several reports."""
        if not ref or not all(c in "0123456789abcdef" for c in ref):
            return None
        rows = self._db.execute(f"SELECT {_LIST_COLUMNS}, python_traceback, summary FROM crash_reports"
                                " WHERE id LIKE ? LIMIT 2", (ref + "%",)).fetchall()
        if not rows:
            return None
        if len(rows) > 1:
            raise ValueError(f"crash id prefix {ref!r} matches several reports")
        r = rows[0]
        out = self._row(r)
        out["python_traceback"] = r[12]
        out["summary"] = json.loads(r[13])
        out["crash_loop"] = self.loop_of(out["agent_id"])
        return out

    def groups(self, agent_id: str | None = None) -> list[dict[str, Any]]:
        sql = ("SELECT signature, kind, MAX(signal_name), COUNT(*), MIN(time), MAX(time), COUNT(DISTINCT agent_id),"
               " MAX(id) FROM crash_reports")
        args: list[Any] = []
        if agent_id:
            sql += " WHERE agent_id = ?"
            args.append(agent_id)
        sql += " GROUP BY signature, kind ORDER BY COUNT(*) DESC, MAX(time) DESC"
        return [{"signature": r[0], "kind": r[1], "signal_name": r[2], "count": r[3], "first": r[4], "last": r[5],
                 "agents": r[6], "example": r[7]} for r in self._db.execute(sql, args).fetchall()]

    def loop_of(self, agent_id: str) -> dict[str, Any] | None:
        r = self._db.execute("SELECT agent_id, detected_at, crashes, first_crash, last_crash FROM crash_loops"
                             " WHERE agent_id = ?", (agent_id,)).fetchone()
        return None if r is None else {"agent_id": r[0], "detected_at": r[1], "crashes": r[2], "first_crash": r[3],
                                       "last_crash": r[4]}

    def loop_fields(self, agent_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The crash-loop fields of each agent's record in the operator API: `crash_loop` (bool), `crash_loop_since`
        (ms since the epoch the loop was detected, or None) and `crash_loop_crashes` (crashes in the window, 0)."""
        flagged = {r[0]: r for r in self._db.execute("SELECT agent_id, detected_at, crashes FROM crash_loops")}
        out = {}
        for agent_id in agent_ids:
            r = flagged.get(agent_id)
            out[agent_id] = {"crash_loop": r is not None, "crash_loop_since": r[1] if r else None,
                             "crash_loop_crashes": r[2] if r else 0}
        return out

    def clear_loop(self, agent_id: str) -> dict[str, Any] | None:
        """Clear an agent's crash-loop flag (an operator looked at it); crashes up to now no longer count towards a
        new one. Returns the loop cleared, None when the agent was not flagged (then nothing changes)."""
        loop = self.loop_of(agent_id)
        if loop is None:
            return None
        now = int(time.time() * 1000)
        self._db.execute("DELETE FROM crash_loops WHERE agent_id = ?", (agent_id,))
        self._db.execute("INSERT INTO crash_loop_clears (agent_id, cleared_at) VALUES (?, ?) ON CONFLICT(agent_id)"
                         " DO UPDATE SET cleared_at = excluded.cleared_at", (agent_id, max(now, loop["last_crash"])))
        log_event(_log, logging.INFO, "crash.loop.cleared", agent=agent_id, crashes=loop["crashes"],
                  detected_at=loop["detected_at"])
        return loop

    def loops(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT agent_id FROM crash_loops ORDER BY detected_at DESC").fetchall()
        return [loop for (agent_id,) in rows if (loop := self.loop_of(agent_id)) is not None]

    def crash_counts(self, since: int, version: str | None = None,
                     kinds: tuple[str, ...] = ("crash",)) -> dict[str, Any]:
        """Reports of `kinds` with crash time >= `since` (ms since the epoch): the total and the counts per host
        version and per bundle version (`name@version`). With `version`, only reports of that host version or
        that bundle (`name@version`) are counted. For rollout health gates and the supervisor's crash-loop logic."""
        marks = ",".join("?" * len(kinds))
        rows = self._db.execute(f"SELECT host_version, bundles FROM crash_reports WHERE time >= ? AND kind IN"
                                f" ({marks})", (since, *kinds)).fetchall()
        total = 0
        hosts: dict[str, int] = {}
        bundles: dict[str, int] = {}
        for host_version, bundle_text in rows:
            named = [f"{n}@{v}" for n, v in json.loads(bundle_text).items()]
            if version is not None and version != host_version and version not in named:
                continue
            total += 1
            hosts[str(host_version)] = hosts.get(str(host_version), 0) + 1
            for item in named:
                bundles[item] = bundles.get(item, 0) + 1
        return {"since": since, "version": version, "total": total, "host_versions": hosts, "bundles": bundles}

    def count_since(self, since: Mapping[str, int], kinds: tuple[str, ...] = ("crash",)) -> dict[str, int]:
        """Reports of `kinds` per agent with crash time >= that agent's `since` (ms since the epoch), for the
        agents in `since` (rollout crash gates, `_rollouts.py`); one query."""
        if not since:
            return {}
        marks = ",".join("?" * len(kinds))
        rows = self._db.execute(f"SELECT agent_id, time FROM crash_reports WHERE time >= ? AND kind IN ({marks})",
                                (min(since.values()), *kinds)).fetchall()
        counts: dict[str, int] = {}
        for agent_id, when in rows:
            start = since.get(agent_id)
            if start is not None and when >= start:
                counts[agent_id] = counts.get(agent_id, 0) + 1
        return counts

    # -- the protocol ----------------------------------------------------------------------------------------

    def handle(self, session: CrashSession, msg_id: int | None, method: str, params: dict[str, Any]) -> None:
        """Serve one `crash.*` request of an agent session (a notification is ignored: uploads need replies)."""
        agent_id = session.agent_id
        if msg_id is None or agent_id is None:
            return
        try:
            if method == "crash.begin":
                session.send_response(msg_id, self.begin(agent_id, params))
            elif method == "crash.chunk":
                session.send_response(msg_id, self.chunk(agent_id, params))
            elif method == "crash.end":
                task = asyncio.get_running_loop().create_task(self._end_task(session, msg_id, agent_id, params))
                _TASKS.add(task)
                task.add_done_callback(_TASKS.discard)
            else:
                session.send_error(msg_id, METHOD_NOT_FOUND, f"method not found: the endpoint has no {method!r}")
        except RemoteError as exc:
            session.send_error(msg_id, exc.code, exc.message, exc.data)
        except (OSError, sqlite3.Error) as exc:
            log_event(_log, logging.ERROR, "crash.upload.failed", agent=agent_id, method=method, error=str(exc))
            session.send_error(msg_id, INTERNAL_ERROR, f"{method}: the endpoint could not store the data: {exc}")

    async def _end_task(self, session: CrashSession, msg_id: int, agent_id: str, params: dict[str, Any]) -> None:
        try:
            result = await self.end(agent_id, params)
        except RemoteError as exc:
            session.send_error(msg_id, exc.code, exc.message, exc.data)
        except Exception as exc:  # a bug or a full disk: the agent keeps the report and retries later
            log_event(_log, logging.ERROR, "crash.upload.failed", agent=agent_id, method="crash.end",
                      error=f"{type(exc).__name__}: {exc}")
            session.send_error(msg_id, INTERNAL_ERROR, f"crash.end: the endpoint failed to store the report: "
                               f"{type(exc).__name__}: {exc}")
        else:
            session.send_response(msg_id, result)


_TASKS: set[asyncio.Task[None]] = set()


def _check_digests(files: Mapping[str, Path], digests: Mapping[str, Any]) -> list[str]:
    bad = []
    for name, path in files.items():
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != str(digests.get(name, "")).lower():
            bad.append(name)
    return bad


# -- the operator API (routes registered in _api.py) ------------------------------------------------------------


def _json_error(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": {"code": INVALID_PARAMS, "message": message}}, status_code=status)


async def api_list(request: Any, store: CrashStore) -> Any:
    """`GET /api/v1/crashes?agent=ID&kind=K&group=1&limit=N`: reports newest first (or groups), and crash loops."""
    from starlette.responses import JSONResponse

    query = request.query_params
    agent = query.get("agent") or None
    kind = query.get("kind") or None
    if kind is not None and kind not in KINDS:
        return _json_error(400, f"'kind' must be one of {', '.join(KINDS)}")
    limit_text = query.get("limit", "500")
    if not _digits(limit_text) or not 1 <= int(limit_text) <= 10000:
        return _json_error(400, "'limit' must be an integer from 1 to 10000")
    body: dict[str, Any] = {"loops": store.loops()}
    if query.get("group") in ("1", "true"):
        body["groups"] = store.groups(agent)
    else:
        body["crashes"] = store.list_reports(agent, kind, int(limit_text))
    return JSONResponse(body)


async def api_show(request: Any, store: CrashStore) -> Any:
    """`GET /api/v1/crashes/{id}`: one report (id or unique prefix) with its parsed summary."""
    from starlette.responses import JSONResponse

    ref = request.path_params["id"]
    try:
        report = store.get(ref)
    except ValueError as exc:
        return _json_error(409, str(exc))
    if report is None:
        return _json_error(404, f"no crash report {ref!r}")
    return JSONResponse(report)


async def api_counts(request: Any, store: CrashStore) -> Any:
    """`GET /api/v1/crash-counts?since=MS&version=V`: what the rollout health gates read."""
    from starlette.responses import JSONResponse

    since = request.query_params.get("since", "0")
    if not _digits(since):
        return _json_error(400, "'since' must be milliseconds since the epoch")
    return JSONResponse(store.crash_counts(int(since), request.query_params.get("version") or None))
