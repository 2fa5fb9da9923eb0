"""Rollouts (docs/updates.md §4): members, waves, gates, halt/resume, supersede; offers through `agent.update`.

One `RolloutManager` per endpoint. Everything is in the registry's SQLite database (tables `rollouts` and
`rollout_members`, plus `_updates.py`'s); the engine is one task that evaluates the rollouts whose members changed
(event-driven: `update.state` events, offer results, agents connecting) and every rollout once per TICK seconds (for
crash reports, which arrive without a state change, and for members stalled in progress: no report for the rollout's
`stall_timeout_s`, default 900 s, ends them as `failed` with a detail starting "stalled: "). Offers are tasks of their own, at most OFFER_CONCURRENCY at a
time; `aclose()` cancels and awaits all of them.

Member states: `pending` (its wave is not reached yet), `waiting` (reached, agent offline), the agent's reported
states `offered` … `probation` (in progress), and the ends `committed`, `failed`, `rolled_back`, `refused`, `skipped`
(the agent opted out or was pinned elsewhere after the rollout started).

Each member's wave is stored when it joins (late joiners: the current wave). An agent answering `agent_busy`, or
updating in another rollout, waits and is offered again later (OFFER_RETRY_GAP; the end of the other update). A wave
advances once a member of it was judged (committed/failed/rolled back); crashes count until CRASH_WINDOW after a
member ended.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import secrets
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pyagent._updatenames import platform_name
from pyagent.endpoint._log import log_event
from pyagent.endpoint._targets import AgentView, Selector, TargetError, views_from_db
from pyagent.endpoint._updates import (
    EVENT_NAME,
    EVENT_OBJECT,
    HOST_NAME,
    UpdateStore,
    check_name,
    check_version,
    now_ms,
    parse_state_event,
)
from pyagent.protocol import AGENT_BUSY, AGENT_UNAVAILABLE, NOT_ALLOWED, RemoteError

_log = logging.getLogger("pyagent.endpoint.rollouts")

ROLLOUTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id               TEXT PRIMARY KEY,
    kind             TEXT NOT NULL,
    name             TEXT NOT NULL,
    version          TEXT NOT NULL,
    selector         TEXT NOT NULL,
    waves            TEXT NOT NULL,          -- JSON list of fractions, increasing, the last 1.0
    max_failure_rate REAL NOT NULL,
    max_crash_rate   REAL NOT NULL,
    state            TEXT NOT NULL,          -- running | halted | completed | superseded
    reason           TEXT NOT NULL DEFAULT '',
    wave             INTEGER NOT NULL DEFAULT 0,
    gate_since_ms    INTEGER NOT NULL,       -- the gate counts what ended after this (start, or the last resume)
    created_ms       INTEGER NOT NULL,
    updated_ms       INTEGER NOT NULL,
    stall_timeout_s  REAL NOT NULL DEFAULT 900  -- a member in progress without a report this long has failed
);
CREATE TABLE IF NOT EXISTS rollout_members (
    rollout_id  TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    key         TEXT NOT NULL,               -- sha256(rollout id + agent id): the order
    wave        INTEGER NOT NULL DEFAULT 0,  -- its wave (0-based), fixed when it is added
    state       TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT '',
    offered_ms  INTEGER,
    ended_ms    INTEGER,
    updated_ms  INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, agent_id)
);
CREATE INDEX IF NOT EXISTS rollout_members_agent ON rollout_members(agent_id);
"""

DEFAULT_WAVES = "1%,10%,50%,100%"
DEFAULT_MAX_FAILURE_RATE = 0.05
DEFAULT_STALL_TIMEOUT = 900.0
MAX_STALL_TIMEOUT = 7 * 86400.0
STALLED = "stalled: "  # the detail of a member failed for want of reports; a late report from it still counts
MAX_WAVES = 20
TICK = 1.0
OFFER_TIMEOUT = 30.0
# After an agent answered an offer `agent_busy` (or unavailable) it is offered again on a tick, no sooner than this.
OFFER_RETRY_GAP = 5.0
# A member's crash reports count in its rollout's gate from its offer until this long after it ended.
CRASH_WINDOW = 600.0
OFFER_CONCURRENCY = 64
ROLLOUT_STATES = ("running", "halted", "completed", "superseded")
IN_PROGRESS = frozenset({"offered", "downloading", "verifying", "staged", "restarting", "probation"})
ENDED = frozenset({"committed", "failed", "rolled_back", "refused", "skipped"})
JUDGED = frozenset({"committed", "failed", "rolled_back"})  # the ends that tell something about the version
NOT_OFFERED = frozenset({"pending", "waiting"})
FAILED = frozenset({"failed", "rolled_back"})
CRASH_KINDS = ("crash",)
START_FIELDS = frozenset({"kind", "name", "version", "select", "waves", "max_failure_rate", "max_crash_rate",
                          "stall_timeout"})
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_NUMBER_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$")


class RolloutError(Exception):
    """A refused operator request: `status` is the HTTP status, the message names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> RolloutError:
    return RolloutError(400, message)


def parse_rate(value: Any, what: str) -> float:
    """A rate: "5%", "0.5%", or a fraction in [0, 1] (number or string). RolloutError (400) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _bad(f"'{what}' must be a percentage like 5% or a fraction from 0 to 1, got {value!r}")
    if isinstance(value, str):
        match = _PERCENT_RE.match(value)
        if match:
            rate = float(match.group(1)) / 100
        elif _NUMBER_RE.match(value):
            rate = float(value)
        else:
            raise _bad(f"'{what}' must be a percentage like 5% or a fraction from 0 to 1, got {value!r}")
    else:
        rate = float(value)
    if not (math.isfinite(rate) and 0 <= rate <= 1):
        raise _bad(f"'{what}' must be from 0% to 100% (or a fraction from 0 to 1), got {value!r}")
    return rate


def parse_waves(value: Any) -> list[float]:
    """"1%,10%,50%,100%" (or a list of such items) → [0.01, 0.1, 0.5, 1.0]: each a percentage above 0 and at most
    100, strictly increasing, the last 100%. RolloutError (400) names the bad item."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(x, str) for x in value):
        items = list(value)
    else:
        raise _bad(f"'waves' must be a string like {DEFAULT_WAVES!r} or a list of percentages")
    if not items or items == [""]:
        raise _bad(f"'waves' is empty; expected percentages like {DEFAULT_WAVES!r}")
    if len(items) > MAX_WAVES:
        raise _bad(f"'waves' has {len(items)} waves, more than {MAX_WAVES}")
    waves: list[float] = []
    for i, item in enumerate(items, 1):
        match = _PERCENT_RE.match(item)
        if not match:
            raise _bad(f"wave {i} {item.strip()!r} is not a percentage like 10% (waves: {DEFAULT_WAVES!r})")
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise _bad(f"wave {i} {item.strip()!r} must be above 0% and at most 100%")
        if waves and percent / 100 <= waves[-1]:
            raise _bad(f"wave {i} {item.strip()!r} is not larger than the wave before it; waves must increase")
        waves.append(percent / 100)
    if waves[-1] != 1.0:
        raise _bad(f"the last wave must be 100%, got {items[-1].strip()!r}")
    return waves


def parse_stall_timeout(value: Any) -> float:
    """Seconds without a report after which a member in progress has failed: a number above 0 and at most 7 days.
    RolloutError (400) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_STALL_TIMEOUT:
        raise _bad(f"'stall_timeout' must be a number of seconds above 0 and at most {MAX_STALL_TIMEOUT:g} (7 days), "
                   f"got {value!r}")
    return float(value)


def format_percent(rate: float) -> str:
    return f"{rate * 100:.4g}%"


def member_key(rollout_id: str, agent_id: str) -> str:
    return hashlib.sha256((rollout_id + agent_id).encode("utf-8")).hexdigest()


def wave_size(fraction: float, members: int) -> int:
    """How many members the wave of `fraction` covers (at least 1 when there are members)."""
    if members <= 0:
        return 0
    return min(members, max(1, math.ceil(round(fraction * members, 9))))


def wave_indexes(waves: list[float], members: int) -> list[int]:
    """The wave (0-based) of each of `members` members in key order: wave k takes them up to wave_size(w_k)."""
    out: list[int] = []
    for i, fraction in enumerate(waves):
        out.extend([i] * max(0, wave_size(fraction, members) - len(out)))
    out.extend([len(waves) - 1] * (members - len(out)))
    return out


def agent_platform(platform: Any) -> str | None:
    """`<system>-<machine>` lower-case from a hello's platform, or None when the agent did not say."""
    if not isinstance(platform, dict):
        return None
    system, machine = platform.get("system"), platform.get("machine")
    if not isinstance(system, str) or not isinstance(machine, str) or not system or not machine:
        return None
    return platform_name(system, machine)


def current_version(record: dict[str, Any], kind: str, name: str) -> str | None:
    """The version of `kind name` an agent's last hello reported."""
    if kind == "host":
        version = record.get("host_version")
        return version if isinstance(version, str) else None
    for bundle in record.get("bundles") or ():
        if isinstance(bundle, dict) and bundle.get("name") == name and isinstance(bundle.get("version"), str):
            return str(bundle["version"])
    return None


class RolloutBackend(Protocol):
    """What the manager needs from the endpoint."""

    async def call(self, target: str, method: str, params: dict[str, Any] | None = None,
                   timeout: float = ...) -> Any: ...
    def is_connected(self, target: str) -> bool: ...
    def agents(self) -> list[Any]: ...


@dataclass
class _Member:
    agent_id: str
    key: str
    wave: int
    state: str
    detail: str
    offered_ms: int | None
    ended_ms: int | None


@dataclass
class _Rollout:
    id: str
    kind: str
    name: str
    version: str
    selector: str
    waves: list[float]
    max_failure_rate: float
    max_crash_rate: float
    state: str
    reason: str
    wave: int
    gate_since_ms: int
    created_ms: int
    updated_ms: int
    stall_timeout_s: float


_ROLLOUT_COLUMNS = ("id, kind, name, version, selector, waves, max_failure_rate, max_crash_rate, state, reason, wave,"
                    " gate_since_ms, created_ms, updated_ms, stall_timeout_s")


def _rollout(row: tuple[Any, ...]) -> _Rollout:
    return _Rollout(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], row[8], row[9],
                    row[10], row[11], row[12], row[13], float(row[14]))


def _migrate(db: sqlite3.Connection) -> None:
    """Columns added after the first release of the tables (CREATE TABLE IF NOT EXISTS keeps an old table)."""
    columns = {str(row[1]) for row in db.execute("PRAGMA table_info(rollouts)")}
    if "stall_timeout_s" not in columns:
        db.execute(f"ALTER TABLE rollouts ADD COLUMN stall_timeout_s REAL NOT NULL DEFAULT {DEFAULT_STALL_TIMEOUT:g}")
    columns = {str(row[1]) for row in db.execute("PRAGMA table_info(rollout_members)")}
    if "wave" not in columns:
        # Members get the waves their order gave them before (all of a rollout's members, by key).
        with db:
            db.execute("BEGIN")
            db.execute("ALTER TABLE rollout_members ADD COLUMN wave INTEGER NOT NULL DEFAULT 0")
            for rollout_id, waves in db.execute("SELECT id, waves FROM rollouts").fetchall():
                ids = [r[0] for r in db.execute("SELECT agent_id FROM rollout_members WHERE rollout_id = ?"
                                                " ORDER BY key", (rollout_id,))]
                db.executemany("UPDATE rollout_members SET wave = ? WHERE rollout_id = ? AND agent_id = ?",
                               [(w, rollout_id, a) for a, w in zip(ids, wave_indexes(json.loads(waves), len(ids)))])


class RolloutManager:
    """Rollouts of one endpoint. `start()` after the endpoint listens, `aclose()` before the registry closes."""

    def __init__(self, backend: RolloutBackend, db: sqlite3.Connection, updates: UpdateStore,
                 crashes: Any = None, repo: Any = None, *, tick: float = TICK) -> None:
        self._backend = backend
        self._db = db
        self._db.executescript(ROLLOUTS_SCHEMA)
        _migrate(self._db)
        self.updates = updates
        self.crashes = crashes  # CrashStore (count_since) or None
        # Anything with find_target(kind, name, version, platform) -> str | None; None: the backend's `repo`.
        self.repo = repo
        self.tick = tick
        self.offer_retry_gap = OFFER_RETRY_GAP
        self.crash_window = CRASH_WINDOW
        # (rollout id, agent id) → loop time before which that member is not offered again (it answered busy).
        self._retry_at: dict[tuple[str, str], float] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._offers: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._connects: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(OFFER_CONCURRENCY)
        self._closed = False

    # -- life cycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pyagent-rollouts")

    async def aclose(self) -> None:
        self._closed = True
        tasks = [t for t in (self._task, *self._offers.values(), *self._connects) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self._offers.clear()
        self._connects.clear()
        self._task = None

    async def _run(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick)
                ticked = False
            except TimeoutError:
                ticked = True
            self._wake.clear()
            if ticked:
                now = asyncio.get_running_loop().time()
                for key in [k for k, at in self._retry_at.items() if at <= now]:
                    del self._retry_at[key]
                try:
                    self._dirty.update(self.expire_stalled())
                except Exception as exc:  # as below: logged, the next tick tries again
                    _log.exception("rollout.stall_check_failed error=%s", exc)
                ids = [r[0] for r in self._db.execute(
                    "SELECT id FROM rollouts WHERE state IN ('running', 'completed')").fetchall()]
                self._dirty.update(ids)
            dirty, self._dirty = self._dirty, set()
            for rollout_id in sorted(dirty):
                try:
                    self.evaluate(rollout_id)
                except Exception as exc:  # a bug must not stop the engine: log it, the next tick tries again
                    _log.exception("rollout.evaluate_failed rollout=%s error=%s", rollout_id, exc)

    def _touch(self, rollout_id: str) -> None:
        self._dirty.add(rollout_id)
        self._wake.set()

    # -- reading -------------------------------------------------------------------------------------------------

    def _get(self, rollout_id: str) -> _Rollout | None:
        row = self._db.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", (rollout_id,)).fetchone()
        return None if row is None else _rollout(row)

    def resolve(self, ref: str) -> str:
        """A rollout id from an id or unique id prefix; RolloutError 404 otherwise."""
        if self._get(ref) is not None:
            return ref
        rows = self._db.execute("SELECT id FROM rollouts WHERE id LIKE ? ESCAPE '\\'",
                                (ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",)
                                ).fetchall() if ref else []
        if len(rows) == 1:
            return str(rows[0][0])
        if not rows:
            raise RolloutError(404, f"no rollout {ref!r}")
        raise RolloutError(404, f"{len(rows)} rollouts start with {ref!r}; give more of the id")

    def _members(self, rollout_id: str) -> list[_Member]:
        rows = self._db.execute("SELECT agent_id, key, wave, state, detail, offered_ms, ended_ms FROM rollout_members"
                                " WHERE rollout_id = ? ORDER BY wave, key", (rollout_id,)).fetchall()
        return [_Member(*row) for row in rows]

    def _set_member(self, rollout_id: str, agent_id: str, state: str, detail: str = "", *,
                    offered: bool = False) -> None:
        now = now_ms()
        self._db.execute(
            "UPDATE rollout_members SET state = ?, detail = ?, updated_ms = ?,"
            " offered_ms = CASE WHEN ? THEN ? ELSE offered_ms END,"
            " ended_ms = CASE WHEN ? THEN ? ELSE NULL END WHERE rollout_id = ? AND agent_id = ?",
            (state, detail, now, offered, now, state in ENDED, now, rollout_id, agent_id))

    def _set_rollout(self, rollout: _Rollout, **changes: Any) -> None:
        changes["updated_ms"] = now_ms()
        for key, value in changes.items():
            setattr(rollout, key, value)
        sets = ", ".join(f"{key} = ?" for key in changes)
        self._db.execute(f"UPDATE rollouts SET {sets} WHERE id = ?", (*changes.values(), rollout.id))

    def _crash_counts(self, rollout: _Rollout, members: list[_Member]) -> int:
        """Crash reports of the members from their offer (or the last resume) until `crash_window` after they
        ended: the crashes that may be the new version's, not those of a fleet running it for months."""
        if self.crashes is None:
            return 0
        window = int(self.crash_window * 1000)
        since: dict[str, int] = {}
        until: dict[str, int] = {}
        for m in members:
            if m.offered_ms is None:
                continue
            start = max(m.offered_ms, rollout.gate_since_ms)
            if m.ended_ms is not None:
                if m.ended_ms + window <= start:
                    continue
                until[m.agent_id] = m.ended_ms + window
            since[m.agent_id] = start
        if not since:
            return 0
        # count_since counts reports at or after a time: those in [since, until) are the difference
        counts: dict[str, int] = self.crashes.count_since(since, CRASH_KINDS)
        later: dict[str, int] = self.crashes.count_since(until, CRASH_KINDS) if until else {}
        return sum(counts.values()) - sum(later.values())

    def _gate(self, rollout: _Rollout, members: list[_Member]) -> dict[str, Any]:
        since = rollout.gate_since_ms
        ended = [m for m in members if m.state in ENDED and m.state != "skipped"
                 and (m.ended_ms is None or m.ended_ms >= since)]
        judged = [m for m in ended if m.state != "refused"]
        failed = sum(1 for m in judged if m.state in FAILED)
        crashes = self._crash_counts(rollout, members)
        return {"ended": len(ended), "failed": failed, "crashes": crashes,
                "failure_rate": failed / len(judged) if judged else 0.0,
                # before any member ended, one crash is a rate of 1 (crashes per member that ended, at least 1)
                "crash_rate": crashes / max(len(ended), 1) if crashes else 0.0}

    def describe(self, rollout_id: str, *, agents: bool = False) -> dict[str, Any]:
        rollout = self._get(rollout_id)
        if rollout is None:
            raise RolloutError(404, f"no rollout {rollout_id!r}")
        members = self._members(rollout_id)
        counts: dict[str, int] = {}
        for m in members:
            counts[m.state] = counts.get(m.state, 0) + 1
        gate = self._gate(rollout, members)
        waves = []
        for i, fraction in enumerate(rollout.waves):
            part = [m for m in members if m.wave == i]
            waves.append({"wave": i + 1, "percent": format_percent(fraction), "members": len(part),
                          "ended": sum(1 for m in part if m.state in ENDED),
                          "committed": sum(1 for m in part if m.state == "committed"),
                          "failed": sum(1 for m in part if m.state in FAILED),
                          "in_progress": sum(1 for m in part if m.state in IN_PROGRESS),
                          "waiting": sum(1 for m in part if m.state == "waiting"),
                          "pending": sum(1 for m in part if m.state == "pending")})
        out: dict[str, Any] = {
            "id": rollout.id, "kind": rollout.kind, "name": rollout.name, "version": rollout.version,
            "select": rollout.selector, "waves": [format_percent(w) for w in rollout.waves],
            "max_failure_rate": rollout.max_failure_rate, "max_crash_rate": rollout.max_crash_rate,
            "stall_timeout": rollout.stall_timeout_s,
            "state": rollout.state, "reason": rollout.reason, "wave": rollout.wave + 1,
            "created_ms": rollout.created_ms, "updated_ms": rollout.updated_ms, "members": len(members),
            "counts": dict(sorted(counts.items())), "wave_progress": waves, **gate}
        if agents:
            names = {r[0]: r[1] for r in self._db.execute(
                "SELECT a.agent_id, a.name FROM agents a JOIN rollout_members m ON m.agent_id = a.agent_id"
                " WHERE m.rollout_id = ?", (rollout_id,))}
            out["agents"] = [{"agent_id": m.agent_id, "name": names.get(m.agent_id), "wave": m.wave + 1,
                              "state": m.state,
                              "detail": m.detail, "offered_ms": m.offered_ms, "ended_ms": m.ended_ms}
                             for m in members]
        return out

    def list(self) -> list[dict[str, Any]]:
        ids = [r[0] for r in self._db.execute("SELECT id FROM rollouts ORDER BY created_ms DESC, id").fetchall()]
        return [self.describe(i) for i in ids]

    # -- operator actions ----------------------------------------------------------------------------------------

    def _find_target(self, kind: str, name: str, version: str, platform: str | None) -> str | None:
        try:
            repo = self.repo if self.repo is not None else getattr(self._backend, "repo", None)
        except Exception:  # the endpoint's property raises while it closes
            repo = None
        if repo is None:
            raise RolloutError(409, "the endpoint has no update repository (it is created when the endpoint "
                                    "starts with updates enabled, or with `pyagent release init`)")
        found = repo.find_target(kind, name, version, platform)
        return None if found is None else str(found)

    def create(self, spec: Any) -> dict[str, Any]:
        """Start a rollout from the API body `{"kind", "name", "version", "select", "waves", "max_failure_rate",
        "max_crash_rate", "stall_timeout"}`; RolloutError names what is wrong."""
        if not isinstance(spec, dict):
            raise _bad("the request body must be a JSON object")
        unknown = sorted(set(spec) - START_FIELDS)
        if unknown:
            raise _bad(f"unknown field '{unknown[0]}' (expected {', '.join(sorted(START_FIELDS))})")
        kind = spec.get("kind")
        if kind not in ("bundle", "host"):
            raise _bad("'kind' must be \"bundle\" or \"host\"")
        name = spec.get("name", HOST_NAME if kind == "host" else None)
        if not isinstance(name, str):
            raise _bad("'name' must be the bundle's name")
        version = spec.get("version")
        if not isinstance(version, str):
            raise _bad("'version' must be a string, e.g. \"1.2.0\"")
        problem = check_name(kind, name) or check_version(version)
        if problem:
            raise _bad(problem)
        select = spec.get("select", "*")
        if not isinstance(select, str):
            raise _bad("'select' must be a target selector string, e.g. \"env=prod\" or \"*\"")
        try:
            selector = Selector.parse(select)
        except TargetError as exc:
            raise _bad(f"bad selector {select!r}: {exc}") from None
        waves = parse_waves(spec.get("waves", DEFAULT_WAVES))
        max_failure = parse_rate(spec.get("max_failure_rate", DEFAULT_MAX_FAILURE_RATE), "max_failure_rate")
        max_crash = parse_rate(spec["max_crash_rate"], "max_crash_rate") \
            if spec.get("max_crash_rate") is not None else max_failure
        stall_timeout = parse_stall_timeout(spec["stall_timeout"]) \
            if spec.get("stall_timeout") is not None else DEFAULT_STALL_TIMEOUT
        views = [v for v in selector.select(views_from_db(self._db)) if v.status == "active"]
        if not views:
            raise _bad(f"no active agent matches the selector {select!r}")
        records = {str(r["agent_id"]): dict(r) for r in self._backend.agents()}
        # Released? A bundle once; a host for every platform among the members.
        if kind == "bundle":
            if self._find_target(kind, name, version, None) is None:
                raise RolloutError(409, f"bundle {name} {version} is not released: publish it first with "
                                        "`pyagent release bundle PATH`")
        else:
            platforms = sorted({agent_platform(records.get(v.agent_id, {}).get("platform")) or "unknown"
                                for v in views})
            missing = [p for p in platforms if p == "unknown" or self._find_target(kind, name, version, p) is None]
            if missing:
                raise RolloutError(409, f"host {version} is not released for {', '.join(missing)}: publish it first "
                                        f"with `pyagent release host BINARY --platform {missing[0]} --version "
                                        f"{version}`")
        rollout_id = "ro-" + secrets.token_hex(5)
        now = now_ms()
        policies = self.updates.policies()
        with self._db:
            self._db.execute("BEGIN")
            superseded = [r[0] for r in self._db.execute(
                "SELECT id FROM rollouts WHERE kind = ? AND name = ? AND state != 'superseded'", (kind, name))]
            for old in superseded:
                self._db.execute("UPDATE rollouts SET state = 'superseded', reason = ?, updated_ms = ? WHERE id = ?",
                                 (f"superseded by {rollout_id} ({name} {version})", now, old))
            self._db.execute(
                f"INSERT INTO rollouts ({_ROLLOUT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running', '', 0, ?, ?, ?, ?)",
                (rollout_id, kind, name, version, select, json.dumps(waves), max_failure, max_crash, now, now, now,
                 stall_timeout))
            joining = []
            for view in views:
                policy = policies.get(view.agent_id)
                if policy is None or not policy.excludes(kind, name, version):
                    joining.append(view.agent_id)
            joining.sort(key=lambda a: member_key(rollout_id, a))  # the order gives the waves
            for agent_id, wave in zip(joining, wave_indexes(waves, len(joining))):
                self._insert_member(rollout_id, kind, name, version, agent_id, records.get(agent_id), now, wave)
        for old in superseded:
            log_event(_log, logging.INFO, "rollout.superseded", rollout=old, by=rollout_id)
        log_event(_log, logging.INFO, "rollout.started", rollout=rollout_id, kind=kind, name=name, version=version,
                  select=select, waves=",".join(format_percent(w) for w in waves), max_failure_rate=max_failure,
                  max_crash_rate=max_crash, stall_timeout=stall_timeout, members=len(views))
        self.evaluate(rollout_id)
        return self.describe(rollout_id)

    def _insert_member(self, rollout_id: str, kind: str, name: str, version: str, agent_id: str,
                       record: dict[str, Any] | None, now: int, wave: int) -> None:
        at_version = record is not None and current_version(record, kind, name) == version
        self._db.execute(
            "INSERT OR IGNORE INTO rollout_members (rollout_id, agent_id, key, wave, state, detail, offered_ms,"
            " ended_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
            (rollout_id, agent_id, member_key(rollout_id, agent_id), wave, "committed" if at_version else "pending",
             f"already at {version}" if at_version else "", now if at_version else None, now))

    def halt(self, ref: str, reason: str = "halted by an operator") -> dict[str, Any]:
        rollout = self._get(self.resolve(ref))
        assert rollout is not None
        if rollout.state not in ("running", "completed"):
            raise RolloutError(409, f"rollout {rollout.id} is {rollout.state}; only a running or completed rollout "
                                    "can be halted")
        self._halt(rollout, reason)
        return self.describe(rollout.id)

    def _halt(self, rollout: _Rollout, reason: str) -> None:
        self._set_rollout(rollout, state="halted", reason=reason)
        log_event(_log, logging.WARNING, "rollout.halted", rollout=rollout.id, reason=reason)

    def resume(self, ref: str) -> dict[str, Any]:
        rollout = self._get(self.resolve(ref))
        assert rollout is not None
        if rollout.state != "halted":
            raise RolloutError(409, f"rollout {rollout.id} is {rollout.state}; only a halted rollout can be resumed")
        # The gate starts counting afresh: what failed before the resume is what the operator looked at.
        self._set_rollout(rollout, state="running", reason="", gate_since_ms=now_ms())
        log_event(_log, logging.INFO, "rollout.resumed", rollout=rollout.id, wave=rollout.wave + 1)
        self.evaluate(rollout.id)
        return self.describe(rollout.id)

    # -- the engine ----------------------------------------------------------------------------------------------

    def expire_stalled(self) -> set[str]:
        """Members in progress (`offered` … `probation`) without a report for their rollout's stall timeout end as
        `failed` (so the gate counts them and they stop holding their wave); returns the rollouts changed. Runs on
        the engine's tick, for halted rollouts too (what the operator sees before a resume)."""
        marks = ",".join("?" * len(IN_PROGRESS))
        rows = self._db.execute(
            "SELECT m.rollout_id, m.agent_id, m.state, r.kind, r.name, r.version, r.stall_timeout_s"
            " FROM rollout_members m JOIN rollouts r ON r.id = m.rollout_id"
            " WHERE r.state IN ('running', 'completed', 'halted', 'superseded')"
            f" AND m.state IN ({marks}) AND m.updated_ms < ? - r.stall_timeout_s * 1000",
            (*sorted(IN_PROGRESS), now_ms())).fetchall()
        changed = set()
        for rollout_id, agent_id, state, kind, name, version, timeout in rows:
            detail = f"{STALLED}no update report for {timeout:g} s"
            self._set_member(rollout_id, agent_id, "failed", detail)
            self.updates.record(agent_id, kind, name, version, "failed", detail, rollout_id)
            log_event(_log, logging.WARNING, "rollout.member_stalled", rollout=rollout_id, agent=agent_id,
                      state=state, stall_timeout=timeout)
            changed.add(str(rollout_id))
            changed.update(str(r[0]) for r in self._db.execute(
                "SELECT rollout_id FROM rollout_members WHERE agent_id = ? AND state = 'waiting'", (agent_id,)))
        return changed

    def evaluate(self, rollout_id: str) -> None:
        """Check the gate, offer to the reached members that are connected, advance waves, complete."""
        rollout = self._get(rollout_id)
        if rollout is None or rollout.state not in ("running", "completed") or self._closed:
            return
        members = self._members(rollout_id)
        gate = self._gate(rollout, members)
        if gate["failure_rate"] > rollout.max_failure_rate:
            self._halt(rollout, f"failure rate {format_percent(gate['failure_rate'])} ({gate['failed']} of "
                                f"{gate['ended']} ended) is above the limit "
                                f"{format_percent(rollout.max_failure_rate)}")
            return
        if gate["crash_rate"] > rollout.max_crash_rate:
            self._halt(rollout, f"crash rate {format_percent(gate['crash_rate'])} ({gate['crashes']} crash reports, "
                                f"{gate['ended']} members ended) is above the limit "
                                f"{format_percent(rollout.max_crash_rate)}")
            return
        records: dict[str, dict[str, Any]] | None = None
        busy: dict[str, str] = {}
        policies = self.updates.policies()
        while True:
            reached = [m for m in members if m.wave <= rollout.wave]
            for m in reached:
                if m.state not in NOT_OFFERED or (rollout.id, m.agent_id) in self._offers:
                    continue
                if records is None:
                    records = {str(r["agent_id"]): dict(r) for r in self._backend.agents()}
                    busy = self._busy_elsewhere(rollout.id)
                self._consider(rollout, m, records.get(m.agent_id), policies.get(m.agent_id), busy.get(m.agent_id))
            if any(m.state in IN_PROGRESS for m in reached):
                break
            if rollout.wave + 1 < len(rollout.waves):
                # The next wave only once this one was judged: a member of it committed, failed or rolled back
                # (offline members alone do not pass a canary), or it has nothing that could be judged (no
                # members, or all refused/skipped). The last wave completes without: the rest wait for agents.
                current = [m for m in members if m.wave == rollout.wave]
                if not (any(m.state in JUDGED for m in current) or all(m.state in ENDED for m in current)):
                    break
                self._set_rollout(rollout, wave=rollout.wave + 1)
                log_event(_log, logging.INFO, "rollout.wave", rollout=rollout.id, wave=rollout.wave + 1,
                          percent=format_percent(rollout.waves[rollout.wave]))
                continue
            if rollout.state == "running":
                self._set_rollout(rollout, state="completed")
                log_event(_log, logging.INFO, "rollout.completed", rollout=rollout.id,
                          waiting=sum(1 for m in members if m.state == "waiting"))
            break

    def _busy_elsewhere(self, rollout_id: str) -> dict[str, str]:
        """Agents with a member in progress (`offered` … `probation`) in another rollout → that rollout's id."""
        marks = ",".join("?" * len(IN_PROGRESS))
        return {str(r[0]): str(r[1]) for r in self._db.execute(
            f"SELECT agent_id, rollout_id FROM rollout_members WHERE rollout_id != ? AND state IN ({marks})",
            (rollout_id, *sorted(IN_PROGRESS)))}

    def _consider(self, rollout: _Rollout, m: _Member, record: dict[str, Any] | None, policy: Any,
                  busy_with: str | None = None) -> None:
        """A reached member not offered yet: skip, count as committed, mark waiting, or offer."""
        excluded = policy.excludes(rollout.kind, rollout.name, rollout.version) if policy is not None else None
        state, detail = m.state, m.detail
        retry_at = self._retry_at.get((rollout.id, m.agent_id))
        if excluded:
            state, detail = "skipped", excluded
        elif record is not None and current_version(record, rollout.kind, rollout.name) == rollout.version:
            state, detail = "committed", f"already at {rollout.version}"
        elif not self._backend.is_connected(m.agent_id):
            state, detail = "waiting", "offline: offered when it connects"
        elif busy_with is not None:
            state, detail = "waiting", f"busy: rollout {busy_with} is updating it; offered when that ends"
        elif retry_at is not None and asyncio.get_running_loop().time() < retry_at:
            state = "waiting"  # it answered busy: the detail says so; a tick offers again after the gap
        else:
            self._retry_at.pop((rollout.id, m.agent_id), None)
            self._offer(rollout, m, record)
            return
        if (state, detail) != (m.state, m.detail):
            self._set_member(rollout.id, m.agent_id, state, detail)
            m.state, m.detail = state, detail
            if state in ENDED:
                m.ended_ms = now_ms()

    def _offer(self, rollout: _Rollout, m: _Member, record: dict[str, Any] | None) -> None:
        platform = agent_platform((record or {}).get("platform")) if rollout.kind == "host" else None
        try:
            target = self._find_target(rollout.kind, rollout.name, rollout.version, platform) \
                if rollout.kind == "bundle" or platform is not None else None
        except Exception as exc:  # the repository cannot answer now: fail this member, the gate decides
            target, problem = None, f"the update repository failed: {exc}"
        else:
            problem = (f"host {rollout.version} is not released for {platform or 'the agent platform (unknown)'}"
                       if target is None else "")
        if target is None:
            self._set_member(rollout.id, m.agent_id, "failed", problem)
            m.state, m.detail, m.ended_ms = "failed", problem, now_ms()
            return
        self._set_member(rollout.id, m.agent_id, "offered", "", offered=True)
        m.state, m.detail, m.offered_ms = "offered", "", now_ms()
        self.updates.record(m.agent_id, rollout.kind, rollout.name, rollout.version, "offered", "", rollout.id)
        params = {"kind": rollout.kind, "name": rollout.name, "version": rollout.version, "target": target,
                  "rollout": rollout.id}
        key = (rollout.id, m.agent_id)
        task = asyncio.get_running_loop().create_task(self._call_offer(rollout.id, m.agent_id, params))
        self._offers[key] = task
        task.add_done_callback(lambda _t: self._offers.pop(key, None))

    async def _call_offer(self, rollout_id: str, agent_id: str, params: dict[str, Any]) -> None:
        async with self._slots:
            try:
                await self._backend.call(agent_id, "agent.update", params, OFFER_TIMEOUT)
                log_event(_log, logging.INFO, "rollout.offered", rollout=rollout_id, agent=agent_id,
                          version=params["version"])
                return
            except RemoteError as exc:
                code, message = exc.code, exc.message
            except Exception as exc:  # the endpoint is closing, or a bug: this member failed, others go on
                code, message = 0, f"{type(exc).__name__}: {exc}"
        row = self._db.execute("SELECT state FROM rollout_members WHERE rollout_id = ? AND agent_id = ?",
                               (rollout_id, agent_id)).fetchone()
        if row is None or row[0] != "offered":  # an event already moved it on
            return
        if code in (AGENT_UNAVAILABLE, AGENT_BUSY):
            # Not a verdict on the version: offered again, on a tick at least offer_retry_gap from now (or when
            # it connects again, if it went away).
            self._retry_at[(rollout_id, agent_id)] = asyncio.get_running_loop().time() + self.offer_retry_gap
        if code == AGENT_UNAVAILABLE:
            state, detail = "waiting", f"offline: offered when it connects ({message})"
        elif code == AGENT_BUSY:
            state, detail = "waiting", f"busy: offered again later ({message})"
        elif code == NOT_ALLOWED:
            state, detail = "refused", message
        else:
            state, detail = "failed", message
        self._set_member(rollout_id, agent_id, state, detail)
        if code == AGENT_BUSY:  # it did not take the offer: its crashes are not this version's
            self._db.execute("UPDATE rollout_members SET offered_ms = NULL WHERE rollout_id = ? AND agent_id = ?",
                             (rollout_id, agent_id))
        if state != "waiting":
            self.updates.record(agent_id, params["kind"], params["name"], params["version"], state, detail,
                                rollout_id)
        log_event(_log, logging.WARNING, "rollout.offer_failed", rollout=rollout_id, agent=agent_id, state=state,
                  reason=message)
        self._touch(rollout_id)
        if state in ENDED:
            self._touch_waiting(agent_id)

    # -- inputs: agents' events and connections ------------------------------------------------------------------

    def on_event(self, record: dict[str, Any], view: AgentView) -> None:
        """An `update.state` event the EventHub stored (called for every stored event; filters its own)."""
        if record.get("object") != EVENT_OBJECT or record.get("event") != EVENT_NAME or self._closed:
            return
        try:
            report = parse_state_event(record.get("data"))
        except ValueError as exc:
            log_event(_log, logging.WARNING, "update.bad_state_event", agent=view.agent_id, reason=str(exc))
            return
        self.updates.record(view.agent_id, report.kind, report.name, report.version, report.state, report.detail,
                            report.rollout, report.progress)
        if report.rollout is None:
            return
        row = self._db.execute(
            "SELECT m.state, r.kind, r.name, r.version, m.detail FROM rollout_members m"
            " JOIN rollouts r ON r.id = m.rollout_id WHERE m.rollout_id = ? AND m.agent_id = ?",
            (report.rollout, view.agent_id)).fetchone()
        if row is None or (row[1], row[2], row[3]) != (report.kind, report.name, report.version):
            return
        # An end is final, except `failed` for a stall: the agent was alive after all, and its report is the truth.
        if row[0] in ENDED and not (row[0] == "failed" and str(row[4]).startswith(STALLED)):
            return
        self._set_member(report.rollout, view.agent_id, report.state, report.detail,
                         offered=report.state == "offered" and row[0] in NOT_OFFERED)
        self._touch(report.rollout)
        if report.state not in IN_PROGRESS:
            self._touch_waiting(view.agent_id)

    def _touch_waiting(self, agent_id: str) -> None:
        """Evaluate the rollouts in which this agent waits (its update in another rollout ended)."""
        for (rollout_id,) in self._db.execute("SELECT rollout_id FROM rollout_members WHERE agent_id = ?"
                                              " AND state = 'waiting'", (agent_id,)).fetchall():
            self._touch(str(rollout_id))

    def on_hello(self, agent_id: str) -> None:
        """An agent finished its handshake: schedule (never await) joining rollouts and offering to it."""
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._on_connect(agent_id))
        self._connects.add(task)
        task.add_done_callback(self._connects.discard)

    async def _on_connect(self, agent_id: str) -> None:
        live = [_rollout(r) for r in self._db.execute(
            f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE state IN ('running', 'completed', 'halted')")]
        if not live:
            return
        member_of = {r[0]: r[1] for r in self._db.execute(
            "SELECT rollout_id, state FROM rollout_members WHERE agent_id = ?", (agent_id,))}
        view = next((v for v in _views_of(self._db, (agent_id,))), None)
        if view is None:
            return
        record: dict[str, Any] | None = None
        policy = self.updates.policy(agent_id)
        for key in [k for k in self._retry_at if k[1] == agent_id]:  # a new connection: offer it now
            del self._retry_at[key]
        for rollout in live:
            if rollout.id not in member_of:
                try:
                    selector = Selector.parse(rollout.selector)
                except TargetError:
                    continue
                if view.status != "active" or not (selector.matches(view) or (
                        selector.kind == "plain" and view.hostname == selector.text)):
                    continue
                if policy.excludes(rollout.kind, rollout.name, rollout.version):
                    continue
                if record is None:
                    found = next((r for r in self._backend.agents() if r["agent_id"] == agent_id), None)
                    record = dict(found) if found is not None else {}
                # A late joiner goes into the current wave (the last one once the rollout completed): it never
                # changes what an earlier wave holds.
                self._insert_member(rollout.id, rollout.kind, rollout.name, rollout.version, agent_id, record,
                                    now_ms(), rollout.wave)
                log_event(_log, logging.INFO, "rollout.member_added", rollout=rollout.id, agent=agent_id)
            elif member_of[rollout.id] not in NOT_OFFERED:
                continue
            self._touch(rollout.id)


def _views_of(db: sqlite3.Connection, agent_ids: Iterable[str]) -> list[AgentView]:
    """The selection views of some agents (views_from_db reads every agent; this reads a few)."""
    ids = list(agent_ids)
    marks = ",".join("?" * len(ids))
    rows = db.execute("SELECT agent_id, name, platform, labels, capabilities, connected, status FROM agents"
                      f" WHERE agent_id IN ({marks})", ids).fetchall()
    out = []
    for agent_id, name, platform, labels, caps, connected, status in rows:
        labels_v = json.loads(labels) if labels else {}
        caps_v = json.loads(caps) if caps else []
        host = json.loads(platform).get("hostname", "") if platform else ""
        out.append(AgentView(agent_id, name, str(host), {str(k): str(v) for k, v in labels_v.items()},
                             tuple(str(c) for c in caps_v), bool(connected), str(status or "active")))
    return out


__all__ = ["DEFAULT_MAX_FAILURE_RATE", "DEFAULT_STALL_TIMEOUT", "DEFAULT_WAVES", "RolloutError", "RolloutManager",
           "agent_platform", "current_version", "format_percent", "member_key", "parse_rate", "parse_stall_timeout",
           "parse_waves", "wave_size"]
