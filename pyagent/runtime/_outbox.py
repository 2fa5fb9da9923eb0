"""The persistent event outbox: what `Agent.emit` writes, delivered to the endpoint at least once, in order.

On disk it is one append-only file, `STATE_DIR/outbox.jsonl`, of JSON lines:

    {"seq": 7, "agent": "sysinfo", "event": "report", "data": {...}, "time": 1700000000123}   an event
    {"floor": 7, "dropped": 2}       every event with seq <= 7 is gone (acknowledged or dropped); 2 drops unreported

Replaying the file gives the events not yet acknowledged, in order, and the count of drops not yet reported. The file
is rewritten (to a temporary file, then renamed) when it holds more dead lines than live ones. A torn last line (the
process died mid-write) is skipped. Past `max_events` the oldest event is dropped and counted; the count travels in
the next `event.batch` and is cleared when that batch is acknowledged.

Delivery (`deliver()`, a task of the runtime): while a session is up, send the oldest events as one `event.batch`
request on session 0; the endpoint answers `{"acked": last seq}` once it has stored them; the outbox then advances its
floor. On an error or timeout it retries after a backoff. The endpoint de-duplicates by (agent_id, seq), so a batch
re-sent after a lost ack is harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from pyagent.runtime._log import log_event

OUTBOX_FILE = "outbox.jsonl"
BATCH_METHOD = "event.batch"
DEFAULT_MAX_EVENTS = 10_000
MAX_BATCH_EVENTS = 500
RETRY_MIN = 0.5
RETRY_MAX = 30.0
ACK_TIMEOUT = 10.0

_log = logging.getLogger("pyagent.runtime.outbox")

Request = Callable[[str, Mapping[str, Any], float], Awaitable[Any]]


class OutboxError(Exception):
    pass


class Outbox:
    """Bounded, persistent, ordered queue of events. `path` None keeps it in memory only (tests, no state dir)."""

    def __init__(self, path: Path | None, *, max_events: int = DEFAULT_MAX_EVENTS,
                 max_batch_bytes: int = 512 * 1024) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.path = path
        self.max_events = max_events
        self.max_batch_bytes = max_batch_bytes
        self._events: deque[dict[str, Any]] = deque()
        self._next_seq = 1
        self._floor = 0
        self.dropped_unreported = 0
        self.dropped_total = 0
        self.delivered_total = 0
        self._dead_lines = 0
        self._file: Any = None
        self._wakeup = asyncio.Event()
        if path is not None:
            self._load(path)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the life of the outbox

    # --- persistence ---

    def _load(self, path: Path) -> None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            log_event(_log, logging.ERROR, "outbox.unreadable", f"outbox {path} unreadable, starting empty: {exc}")
            lines = []
        events: dict[int, dict[str, Any]] = {}
        for i, line in enumerate(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                log_event(_log, logging.WARNING, "outbox.line.skipped", f"outbox line {i + 1} is not JSON, skipped")
                continue
            if not isinstance(rec, dict):
                continue
            if isinstance(rec.get("seq"), int):
                events[rec["seq"]] = rec
                self._next_seq = max(self._next_seq, rec["seq"] + 1)
            elif isinstance(rec.get("floor"), int):
                self._floor = max(self._floor, rec["floor"])
                self._next_seq = max(self._next_seq, self._floor + 1)
                dropped = rec.get("dropped")
                self.dropped_unreported = dropped if isinstance(dropped, int) and dropped >= 0 else 0
        self._events = deque(events[s] for s in sorted(events) if s > self._floor)
        self._dead_lines = len(lines) - len(self._events)
        self._compact_if_needed(force=self._dead_lines > 0)

    def _append(self, rec: Mapping[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
        self._file.flush()

    def _compact_if_needed(self, *, force: bool = False) -> None:
        if self.path is None or not (force or self._dead_lines > max(len(self._events), 1000)):
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"floor": self._floor, "dropped": self.dropped_unreported}) + "\n")
            for rec in self._events:
                f.write(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._file is not None:
            self._file.close()
        os.replace(tmp, self.path)
        self._dead_lines = 1
        if self._file is not None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    # --- the queue ---

    def put(self, agent: str, event: str, data: Any) -> int:
        """Queue one event; return its sequence number. Raises TypeError if `data` is not JSON-serialisable."""
        rec = {"seq": self._next_seq, "agent": agent, "event": event, "data": data,
               "time": int(time.time() * 1000)}
        json.dumps(rec, allow_nan=False)  # refuse what cannot be delivered now, not at send time
        self._next_seq += 1
        self._events.append(rec)
        self._append(rec)
        if len(self._events) > self.max_events:
            gone = len(self._events) - self.max_events
            for _ in range(gone):
                self._floor = self._events.popleft()["seq"]
            self.dropped_unreported += gone
            self.dropped_total += gone
            self._dead_lines += gone
            self._append({"floor": self._floor, "dropped": self.dropped_unreported})
            self._dead_lines += 1
            self._compact_if_needed()
        self._wakeup.set()
        return int(rec["seq"])

    def __len__(self) -> int:
        return len(self._events)

    def pending(self) -> list[dict[str, Any]]:
        return list(self._events)

    def next_batch(self) -> dict[str, Any] | None:
        """The params of the next `event.batch`: the oldest events within MAX_BATCH_EVENTS and max_batch_bytes."""
        if not self._events and not self.dropped_unreported:
            return None
        batch: list[dict[str, Any]] = []
        size = 0
        for rec in self._events:
            n = len(json.dumps(rec, separators=(",", ":")))
            if batch and (len(batch) >= MAX_BATCH_EVENTS or size + n > self.max_batch_bytes):
                break
            batch.append(rec)
            size += n
        return {"events": batch, "dropped": self.dropped_unreported}

    def ack(self, acked: int, reported_drops: int) -> int:
        """The endpoint stored every event with seq <= `acked`; `reported_drops` were reported in that batch.
        Returns how many events were removed."""
        removed = 0
        while self._events and self._events[0]["seq"] <= acked:
            self._events.popleft()
            removed += 1
        if acked > self._floor:
            self._floor = acked
        self.dropped_unreported = max(self.dropped_unreported - reported_drops, 0)
        self.delivered_total += removed
        self._dead_lines += removed
        self._append({"floor": self._floor, "dropped": self.dropped_unreported})
        self._dead_lines += 1
        self._compact_if_needed()
        return removed

    def stats(self) -> dict[str, Any]:
        return {"pending": len(self._events), "max_events": self.max_events, "next_seq": self._next_seq,
                "dropped_total": self.dropped_total, "dropped_unreported": self.dropped_unreported,
                "delivered_total": self.delivered_total, "path": str(self.path) if self.path else None}

    # --- delivery ---

    async def deliver(self, request: Request, connected: Callable[[], bool],
                      session_changed: asyncio.Event) -> None:
        """Deliver forever (cancel to stop): one batch in flight at a time, retried with backoff."""
        delay = RETRY_MIN
        while True:
            batch = self.next_batch()
            if batch is None or not connected():
                self._wakeup.clear()
                session_changed.clear()
                await _first(self._wakeup.wait(), session_changed.wait())
                continue
            try:
                result = await request(BATCH_METHOD, batch, ACK_TIMEOUT)
                acked = result.get("acked") if isinstance(result, dict) else None
                if not isinstance(acked, int) or isinstance(acked, bool):
                    raise OutboxError(f"{BATCH_METHOD}: bad result {result!r}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RemoteError, timeout, runtime stopping: keep the events, retry later
                log_event(_log, logging.WARNING, "outbox.deliver.failed",
                          f"event delivery failed, retrying in {delay:.1f} s: {exc}", pending=len(self._events))
                session_changed.clear()
                try:
                    await asyncio.wait_for(session_changed.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = RETRY_MIN
            self.ack(acked, batch["dropped"])


async def _first(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
