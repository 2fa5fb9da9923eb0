"""Events agents emit (`event.batch`, docs/protocol.md): stored once, acknowledged, and streamed to operators.

Every event is written to the SQLite table `events` (bounded to `max_rows`, oldest pruned) and kept in an in-memory
ring of the last `ring_size` for followers. Delivery from agents is at least once, so storage de-duplicates by
(agent_id, seq): a per-agent high-water mark (`event_acks`) plus a unique index. The answer `{"acked": S}` is the
highest seq of this agent now stored; the agent then forgets every event up to S.

Followers (`GET /api/v1/events?follow=1`) each get a bounded queue; one that cannot keep up loses events, and the
count is reported to it in the stream as `{"dropped": N}` rather than slowing the endpoint down.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pyagent.endpoint._targets import AgentView, Selector, TargetError
from pyagent.protocol import INTERNAL_ERROR, INVALID_PARAMS, ProtocolError, RemoteError

_log = logging.getLogger("pyagent.endpoint.events")

EVENTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id  TEXT NOT NULL,
    seq       INTEGER,            -- the agent's outbox sequence number; NULL for a drop report
    object    TEXT NOT NULL,      -- the agent object that emitted it
    event     TEXT NOT NULL,
    data      TEXT NOT NULL,      -- JSON
    time      INTEGER NOT NULL,   -- when the agent emitted it, ms since the epoch
    received  INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_agent_seq ON events(agent_id, seq) WHERE seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS event_acks (
    agent_id  TEXT PRIMARY KEY,
    acked     INTEGER NOT NULL,   -- every event of this agent with seq <= acked is stored
    dropped   INTEGER NOT NULL DEFAULT 0
);
"""

BATCH_METHOD = "event.batch"
MAX_BATCH_EVENTS = 2000
MAX_NAME_CHARS = 256
MAX_TIME = 1 << 53
DROPPED_EVENT = "outbox.dropped"
Matcher = Callable[[dict[str, Any], AgentView], bool]
Listener = Callable[[dict[str, Any], AgentView], None]


def _fail(message: str) -> ProtocolError:
    return ProtocolError(INVALID_PARAMS, f"{BATCH_METHOD}: {message}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_batch(params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """The events and the drop count of `event.batch` params; ProtocolError (-32602) names the bad field."""
    unknown = sorted(set(params) - {"events", "dropped"})
    if unknown:
        raise _fail(f"unknown parameter '{unknown[0]}'")
    events = params.get("events")
    if not isinstance(events, list):
        raise _fail("'events' must be an array")
    if len(events) > MAX_BATCH_EVENTS:
        raise _fail(f"'events' holds {len(events)} events, more than {MAX_BATCH_EVENTS}")
    dropped = params.get("dropped", 0)
    if not _int(dropped) or dropped < 0:
        raise _fail("'dropped' must be a non-negative integer")
    for i, ev in enumerate(events):
        where = f"events[{i}]"
        if not isinstance(ev, dict):
            raise _fail(f"'{where}' must be an object")
        if not _int(ev.get("seq")) or not 1 <= ev["seq"] < 1 << 62:
            raise _fail(f"'{where}.seq' must be a positive integer below 2^62")
        for key in ("agent", "event"):
            value = ev.get(key)
            if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
                raise _fail(f"'{where}.{key}' must be a string of 1 to {MAX_NAME_CHARS} characters")
        stamp = ev.get("time")
        if not isinstance(stamp, (int, float)) or isinstance(stamp, bool) or not -MAX_TIME <= stamp <= MAX_TIME:
            raise _fail(f"'{where}.time' must be a number (ms since the epoch)")
    return events, dropped


@dataclass(eq=False)
class _Follower:
    matcher: Matcher
    queue: asyncio.Queue[dict[str, Any] | None]
    dropped: int = 0


@dataclass
class EventStats:
    stored: int = 0
    duplicates: int = 0
    dropped_by_agents: int = 0
    follower_drops: int = 0
    pruned: int = 0
    by_agent: dict[str, int] = field(default_factory=dict)


class EventHub:
    """Stores `event.batch` contents and feeds followers. Use from the event loop thread only."""

    def __init__(self, db: sqlite3.Connection, *, ring_size: int = 10_000, max_rows: int = 1_000_000,
                 follower_queue: int = 10_000) -> None:
        self._db = db
        self._db.executescript(EVENTS_SCHEMA)
        self.max_rows = max_rows
        self._ring: deque[tuple[dict[str, Any], AgentView]] = deque(maxlen=ring_size)
        self._followers: set[_Follower] = set()
        self._follower_queue = follower_queue
        self._acked: dict[str, int] = {}
        self._listeners: list[Listener] = []
        self.stats = EventStats()
        self._closed = False
        self._prime()

    def _prime(self) -> None:
        """Fill the ring with the newest stored events (after an endpoint restart)."""
        rows = self._db.execute(
            "SELECT e.id, e.agent_id, e.seq, e.object, e.event, e.data, e.time, e.received, a.name, a.platform,"
            " a.labels, a.capabilities FROM events e LEFT JOIN agents a ON a.agent_id = e.agent_id"
            " ORDER BY e.id DESC LIMIT ?", (self._ring.maxlen,)).fetchall()
        for row in reversed(rows):
            name = row[8] or ""
            view = AgentView(row[1], name, str(_loads(row[9], {}).get("hostname", "")), _loads(row[10], {}),
                             tuple(_loads(row[11], [])))
            self._ring.append(({"id": row[0], "agent_id": row[1], "name": name, "seq": row[2], "object": row[3],
                                "event": row[4], "data": _loads(row[5], None), "time": row[6], "received": row[7]},
                               view))

    # -- storing -------------------------------------------------------------------------------------------------

    def acked(self, agent_id: str) -> int:
        value = self._acked.get(agent_id)
        if value is None:
            row = self._db.execute("SELECT acked FROM event_acks WHERE agent_id = ?", (agent_id,)).fetchone()
            value = self._acked[agent_id] = int(row[0]) if row else 0
        return value

    def store_batch(self, view: AgentView, params: dict[str, Any]) -> dict[str, Any]:
        """Store one batch from the agent `view`; return the `event.batch` result `{"acked": S}`."""
        events, dropped = parse_batch(params)
        floor = self.acked(view.agent_id)
        now = int(time.time() * 1000)
        new: list[tuple[Any, ...]] = []
        top = floor
        for ev in events:
            seq = ev["seq"]
            if seq <= floor:
                self.stats.duplicates += 1
                continue
            top = max(top, seq)
            try:
                data = json.dumps(ev.get("data"), ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise _fail(f"'events[{events.index(ev)}].data' cannot be stored as JSON: {exc}") from None
            new.append((view.agent_id, seq, ev["agent"], ev["event"], data, int(ev["time"]), now))
        if dropped:
            new.append((view.agent_id, None, "", DROPPED_EVENT, json.dumps({"dropped": dropped}), now, now))
        stored: list[dict[str, Any]] = []
        try:
            self._write(view, new, stored, top, floor, dropped)
        except sqlite3.Error as exc:  # e.g. a full disk: the agent keeps the events and sends them again
            stored.clear()
            raise RemoteError(INTERNAL_ERROR, f"{BATCH_METHOD}: the endpoint cannot store events now: {exc}") \
                from None
        self._acked[view.agent_id] = top
        self.stats.stored += len(stored)
        self.stats.dropped_by_agents += dropped
        self.stats.by_agent[view.agent_id] = self.stats.by_agent.get(view.agent_id, 0) + len(stored)
        for record in stored:
            self._publish(record, view)
            for listener in self._listeners:
                try:
                    listener(record, view)
                except Exception:  # a listener's bug must not lose the batch's ack
                    _log.exception("event.listener_failed listener=%r", listener)
        if stored and stored[-1]["id"] % 1000 == 0:
            self._prune(stored[-1]["id"])
        return {"acked": top}

    def _write(self, view: AgentView, new: list[tuple[Any, ...]], stored: list[dict[str, Any]], top: int,
               floor: int, dropped: int) -> None:
        with self._db:
            self._db.execute("BEGIN")
            for row in new:
                cur = self._db.execute("INSERT OR IGNORE INTO events (agent_id, seq, object, event, data, time,"
                                       " received) VALUES (?, ?, ?, ?, ?, ?, ?)", row)
                if cur.rowcount == 1:
                    stored.append({"id": cur.lastrowid, "agent_id": row[0], "name": view.name, "seq": row[1],
                                   "object": row[2], "event": row[3], "data": json.loads(row[4]), "time": row[5],
                                   "received": row[6]})
                else:
                    self.stats.duplicates += 1
            if top > floor or dropped:
                self._db.execute("INSERT INTO event_acks (agent_id, acked, dropped) VALUES (?, ?, ?)"
                                 " ON CONFLICT(agent_id) DO UPDATE SET acked = MAX(acked, excluded.acked),"
                                 " dropped = dropped + excluded.dropped", (view.agent_id, top, dropped))

    def _prune(self, last_id: int) -> None:
        cur = self._db.execute("DELETE FROM events WHERE id <= ?", (last_id - self.max_rows,))
        self.stats.pruned += max(cur.rowcount, 0)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(record, view)` for every event stored from now on, in the event loop thread (e.g. the
        rollouts' `update.state` consumer). It must be quick and not raise."""
        self._listeners.append(listener)

    # -- reading and following -----------------------------------------------------------------------------------

    def _publish(self, record: dict[str, Any], view: AgentView) -> None:
        self._ring.append((record, view))
        for follower in self._followers:
            if not follower.matcher(record, view):
                continue
            try:
                follower.queue.put_nowait(record)
            except asyncio.QueueFull:
                follower.dropped += 1
                self.stats.follower_drops += 1

    def recent(self, matcher: Matcher, last: int, since: int | None = None) -> list[dict[str, Any]]:
        """The newest `last` matching events still in the ring (with id > since, when given), oldest first."""
        out: list[dict[str, Any]] = []
        if last <= 0 and since is None:
            return out
        for record, view in reversed(self._ring):
            if since is not None and record["id"] <= since:
                break
            if matcher(record, view):
                out.append(record)
                if since is None and len(out) >= last:
                    break
        out.reverse()
        return out

    async def follow(self, matcher: Matcher, *, last: int = 0, count: int | None = None,
                     timeout: float | None = None, keepalive: float = 15.0) -> AsyncIterator[dict[str, Any] | None]:
        """Yield matching events: the newest `last` first, then live ones; `None` is a keep-alive tick (nothing
        for `keepalive` seconds). Ends after `count` events, after `timeout` seconds, or when the hub closes."""
        follower = _Follower(matcher, asyncio.Queue(self._follower_queue))
        self._followers.add(follower)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        sent = 0
        try:
            for record in self.recent(matcher, last):
                yield record
                sent += 1
                if count is not None and sent >= count:
                    return
            while not self._closed:
                wait = keepalive if deadline is None else min(keepalive, deadline - loop.time())
                if wait <= 0:
                    return
                try:
                    item: dict[str, Any] | None = await asyncio.wait_for(follower.queue.get(), wait)
                except TimeoutError:
                    yield None
                    continue
                if item is None:
                    return
                yield item
                sent += 1
                if count is not None and sent >= count:
                    return
                if follower.dropped and follower.queue.empty():  # what was queued came first, then the loss
                    yield {"dropped": follower.dropped}
                    follower.dropped = 0
        finally:
            self._followers.discard(follower)

    @property
    def followers(self) -> int:
        return len(self._followers)

    def close(self) -> None:
        """End every follow stream."""
        self._closed = True
        for follower in self._followers:
            try:
                follower.queue.put_nowait(None)
            except asyncio.QueueFull:
                pass


def _loads(text: Any, default: Any) -> Any:
    try:
        value = json.loads(text) if isinstance(text, str) else default
    except ValueError:
        return default
    return value if isinstance(value, type(default)) or default is None else default


# -- the operator API: GET /api/v1/events -------------------------------------------------------------------------

QUERY_KEYS = frozenset({"follow", "select", "event", "object", "last", "count", "timeout", "since"})
MAX_LAST = 10_000


class _QueryError(ValueError):
    pass


def _query_int(query: Mapping[str, str], key: str, default: int | None, low: int, high: int) -> int | None:
    text = query.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise _QueryError(f"'{key}' must be an integer") from None
    if not low <= value <= high:
        raise _QueryError(f"'{key}' must be in [{low}, {high}]")
    return value


def make_matcher(select: str | None, event: str | None, obj: str | None) -> Matcher:
    """Events of the agents `select` names (a target expression, see _targets), whose name matches the glob
    `event` and whose object is `obj`; None means any."""
    selector = Selector.parse(select) if select else None

    def matches(record: dict[str, Any], view: AgentView) -> bool:
        if obj is not None and record["object"] != obj:
            return False
        if event is not None and not fnmatch.fnmatchcase(record["event"], event):
            return False
        if selector is None:
            return True
        if selector.kind == "plain":
            return selector.text in (view.agent_id, view.name, view.hostname)
        return selector.matches(view)

    return matches


async def events_response(request: Request, backend: Any) -> Response:
    """`GET /api/v1/events?select=&event=&object=&last=&since=` → `{"events": [...]}`; with `follow=1` an NDJSON
    stream (chunked) of the newest `last` (default 10) then live events, ending after `count` events or `timeout`
    seconds when given; an empty line is a keep-alive."""
    query = request.query_params
    try:
        unknown = sorted(set(query) - QUERY_KEYS)
        if unknown:
            raise _QueryError(f"unknown query parameter '{unknown[0]}' (expected {', '.join(sorted(QUERY_KEYS))})")
        follow = query.get("follow", "0")
        if follow not in ("0", "1", "true", "false"):
            raise _QueryError("'follow' must be 1 or 0")
        following = follow in ("1", "true")
        last = _query_int(query, "last", 10 if following else 100, 0, MAX_LAST)
        since = _query_int(query, "since", None, 0, 1 << 62)
        count = _query_int(query, "count", None, 1, 1 << 31)
        timeout = _query_int(query, "timeout", None, 1, 86400)
        try:
            matcher = make_matcher(query.get("select") or None, query.get("event") or None,
                                   query.get("object") or None)
        except TargetError as exc:
            raise _QueryError(f"'select': {exc}") from None
    except _QueryError as exc:
        return JSONResponse({"error": {"code": INVALID_PARAMS, "message": str(exc)}}, status_code=400)
    hub: EventHub = backend.events
    assert last is not None
    if not following:
        return JSONResponse({"events": hub.recent(matcher, last, since)})

    async def lines() -> AsyncIterator[bytes]:
        async for record in hub.follow(matcher, last=last, count=count, timeout=timeout):
            yield b"\n" if record is None else json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
