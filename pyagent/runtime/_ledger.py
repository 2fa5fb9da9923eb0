"""The ledger reporter: what the supervisor wrote while no worker could report it, sent through the outbox.

The supervisor (no Python, no connection) appends one JSON line per event to two files in the state directory:

- `updates/updates.jsonl`: swaps, commits and rollbacks of updates (docs/updates.md §3) → `update.state` events
  `{kind, name, version, state, detail, rollout, previous}` of object `pyagent`;
- `restarts.jsonl`: every worker restart with its reason (docs/architecture.md, "Supervisor") → `supervisor.restart`
  events of object `pyagent` whose data is the record.

Once a second the reporter reads the records with a `seq` above the last one it reported, queues them in the outbox
(which delivers them at least once, across restarts) and then remembers the highest seq of each file in
`updates/reported.json` `{"updates": SEQ, "restarts": SEQ}`. A crash between the two re-reports a few records, never
loses one. Lines that are not JSON objects with an integer `seq` (a torn write, garbage) are skipped with a log line.
Only the supervisor writes the two files; this module never modifies them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyagent._files import write_atomic
from pyagent.runtime._log import log_event

UPDATES_DIR = "updates"
UPDATES_FILE = "updates.jsonl"
RESTARTS_FILE = "restarts.jsonl"
REPORTED_FILE = "reported.json"
OBJECT = "pyagent"
UPDATE_EVENT = "update.state"
RESTART_EVENT = "supervisor.restart"
INTERVAL = 1.0
MAX_FILE_BYTES = 1 << 20  # the supervisor keeps both files under 64 KiB; anything far larger is not ours

_log = logging.getLogger("pyagent.runtime.ledger")

Put = Callable[[str, str, Any], int]


@dataclass
class _Source:
    key: str  # in reported.json
    path: Path
    event: str
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) when last read


def update_event_data(rec: dict[str, Any]) -> dict[str, Any]:
    """An `updates.jsonl` record as `update.state` event data (docs/updates.md §2)."""
    data = {key: rec.get(key) for key in ("kind", "name", "version", "state", "detail", "rollout")}
    data["detail"] = data["detail"] if isinstance(data["detail"], str) else ""
    if "previous" in rec:
        data["previous"] = rec["previous"]
    return data


class LedgerReporter:
    """Reports the supervisor's records once; `put(object, event, data)` is the outbox's `put`."""

    def __init__(self, state_dir: Path, put: Put) -> None:
        self.state_dir = Path(state_dir)
        self.put = put
        self.reported_path = self.state_dir / UPDATES_DIR / REPORTED_FILE
        self.sources = (_Source("updates", self.state_dir / UPDATES_DIR / UPDATES_FILE, UPDATE_EVENT),
                        _Source("restarts", self.state_dir / RESTARTS_FILE, RESTART_EVENT))
        self.reported = self._load_reported()
        self.lines_skipped = 0

    def _load_reported(self) -> dict[str, int]:
        out = {"updates": 0, "restarts": 0}
        try:
            doc = json.loads(self.reported_path.read_bytes())
        except FileNotFoundError:
            return out
        except (OSError, ValueError) as exc:
            log_event(_log, logging.WARNING, "ledger.reported.unreadable",
                      f"{self.reported_path} unreadable, reporting from the start: {exc}")
            return out
        if isinstance(doc, dict):
            for key in out:
                value = doc.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    out[key] = value
        return out

    def poll(self) -> int:
        """Report what is new in both files; return the number of events queued."""
        queued = 0
        changed = False
        for source in self.sources:
            records = self._read_new(source)
            if records is None:
                continue
            for rec in records:
                data = update_event_data(rec) if source.event == UPDATE_EVENT else rec
                self.put(OBJECT, source.event, data)
                queued += 1
            if records:
                self.reported[source.key] = max(int(r["seq"]) for r in records)
                changed = True
        if changed:
            self._save_reported()
        return queued

    def _read_new(self, source: _Source) -> list[dict[str, Any]] | None:
        """The records above the reported seq, None when the file did not change since the last read."""
        try:
            st = os.stat(source.path)
        except FileNotFoundError:
            source.stamp = None
            return None
        except OSError as exc:
            log_event(_log, logging.WARNING, "ledger.unreadable", f"cannot read {source.path}: {exc}")
            return None
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == source.stamp:
            return None
        source.stamp = stamp
        if st.st_size > MAX_FILE_BYTES:
            log_event(_log, logging.WARNING, "ledger.too_large",
                      f"{source.path} is {st.st_size} bytes (over {MAX_FILE_BYTES}); not read")
            return None
        try:
            raw = source.path.read_bytes()
        except OSError as exc:
            log_event(_log, logging.WARNING, "ledger.unreadable", f"cannot read {source.path}: {exc}")
            return None
        records: dict[int, dict[str, Any]] = {}
        for number, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            seq = rec.get("seq") if isinstance(rec, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not isinstance(rec, dict):
                self.lines_skipped += 1
                log_event(_log, logging.WARNING, "ledger.line.skipped",
                          f"{source.path} line {number} is not a record with a seq, skipped",
                          line=line[:80].decode("utf-8", "replace"))
                continue
            records[seq] = rec
        last = self.reported[source.key]
        if records and max(records) < last:
            # The file was replaced by a fresh one (seq starts again): everything in it is new.
            log_event(_log, logging.INFO, "ledger.reset", f"{source.path} starts again below seq {last}")
            last = 0
        return [records[seq] for seq in sorted(records) if seq > last]

    def _save_reported(self) -> None:
        try:
            self.reported_path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.reported_path, json.dumps(self.reported).encode() + b"\n", 0o644)
        except OSError as exc:
            log_event(_log, logging.WARNING, "ledger.reported.failed", f"cannot write {self.reported_path}: {exc}")

    async def run(self, interval: float = INTERVAL) -> None:
        """Poll forever (cancel to stop)."""
        while True:
            try:
                self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never let a bad file stop the worker
                log_event(_log, logging.ERROR, "ledger.failed", f"ledger poll failed: {exc!r}", exc_info=True)
            await asyncio.sleep(interval)
