"""Per-agent update state and policy (docs/updates.md §2 and §4), in the registry's SQLite database.

`agent_updates` holds the last state of each (agent, kind, name): fed by the `update.state` events agents send
(object "pyagent") and by the offers the endpoint makes. `agent_update_policy` holds an agent's pins (kind, name →
version) and its opt-out. Use from the event loop thread only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from pyagent._updatenames import HOST_NAME, bundle_name_problem, version_problem

UPDATES_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_updates (
    agent_id   TEXT NOT NULL,
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    version    TEXT NOT NULL,
    state      TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '',
    rollout_id TEXT,
    progress   TEXT,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (agent_id, kind, name)
);
CREATE TABLE IF NOT EXISTS agent_update_policy (
    agent_id TEXT PRIMARY KEY,
    opt_out  INTEGER NOT NULL DEFAULT 0,
    pins     TEXT NOT NULL DEFAULT '{}'   -- {"bundle:NAME": VERSION, "host:pyagent-host": VERSION}
);
"""

KINDS = ("bundle", "host")
STATES = ("offered", "downloading", "verifying", "staged", "restarting", "probation", "committed", "rolled_back",
          "failed", "refused")
EVENT_OBJECT = "pyagent"
EVENT_NAME = "update.state"
MAX_DETAIL = 4000


def now_ms() -> int:
    return int(time.time() * 1000)


def check_name(kind: str, name: str) -> str | None:
    """None when (kind, name) names an update target, else what is wrong."""
    if kind not in KINDS:
        return f"kind must be bundle or host, got {kind!r}"
    if kind == "host":
        return None if name == HOST_NAME else f"a host update's name is {HOST_NAME!r}, got {name!r}"
    return bundle_name_problem(name)


def check_version(version: str) -> str | None:
    return version_problem(version)


@dataclass(frozen=True)
class UpdateReport:
    """One `update.state` event's data."""

    kind: str
    name: str
    version: str
    state: str
    detail: str
    rollout: str | None
    progress: dict[str, int] | None


def parse_state_event(data: Any) -> UpdateReport:
    """The data of an `update.state` event; ValueError names the bad field."""
    if not isinstance(data, dict):
        raise ValueError("the data must be an object")
    texts: dict[str, str] = {}
    for key in ("kind", "name", "version", "state"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ValueError(f"'{key}' must be a non-empty string")
        texts[key] = value
    problem = check_name(texts["kind"], texts["name"]) or check_version(texts["version"])
    if problem:
        raise ValueError(problem)
    if texts["state"] not in STATES:
        raise ValueError(f"'state' must be one of {', '.join(STATES)}, got {texts['state']!r}")
    detail = data.get("detail") or ""
    if not isinstance(detail, str):
        raise ValueError("'detail' must be a string")
    rollout = data.get("rollout")
    if rollout is not None and not isinstance(rollout, str):
        raise ValueError("'rollout' must be a string or null")
    progress = data.get("progress")
    parsed: dict[str, int] | None = None
    if progress is not None:
        if (not isinstance(progress, dict)
                or not all(isinstance(progress.get(k), int) and not isinstance(progress.get(k), bool)
                           for k in ("bytes", "total"))):
            raise ValueError("'progress' must be {\"bytes\": N, \"total\": N}")
        parsed = {"bytes": int(progress["bytes"]), "total": int(progress["total"])}
    return UpdateReport(texts["kind"], texts["name"], texts["version"], texts["state"], detail[:MAX_DETAIL],
                        rollout or None, parsed)


def pin_key(kind: str, name: str) -> str:
    return f"{kind}:{name}"


@dataclass
class Policy:
    opt_out: bool = False
    pins: dict[str, str] = field(default_factory=dict)

    def excludes(self, kind: str, name: str, version: str) -> str | None:
        """Why this agent takes no offer of `kind name version` (opted out, pinned to another version), or None."""
        if self.opt_out:
            return "the agent opted out of updates"
        pinned = self.pins.get(pin_key(kind, name))
        if pinned is not None and pinned != version:
            return f"the agent is pinned to {name} {pinned}"
        return None

    def to_json(self) -> dict[str, Any]:
        return {"opt_out": self.opt_out, "pins": dict(sorted(self.pins.items()))}


class UpdateStore:
    """The two tables; every method is one short statement or transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(UPDATES_SCHEMA)

    # -- state ---------------------------------------------------------------------------------------------------

    def record(self, agent_id: str, kind: str, name: str, version: str, state: str, detail: str = "",
               rollout_id: str | None = None, progress: dict[str, int] | None = None,
               when: int | None = None) -> None:
        self._db.execute(
            "INSERT INTO agent_updates (agent_id, kind, name, version, state, detail, rollout_id, progress,"
            " updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(agent_id, kind, name) DO UPDATE SET"
            " version = excluded.version, state = excluded.state, detail = excluded.detail,"
            " rollout_id = excluded.rollout_id, progress = excluded.progress, updated_ms = excluded.updated_ms",
            (agent_id, kind, name, version, state, detail, rollout_id,
             None if progress is None else json.dumps(progress), now_ms() if when is None else when))

    def states(self, agent_id: str | None = None) -> list[dict[str, Any]]:
        """Every agent's last update state per target (one agent's with `agent_id`), newest first."""
        where, args = ("WHERE u.agent_id = ?", (agent_id,)) if agent_id is not None else ("", ())
        rows = self._db.execute(
            "SELECT u.agent_id, a.name, u.kind, u.name, u.version, u.state, u.detail, u.rollout_id, u.progress,"
            f" u.updated_ms FROM agent_updates u LEFT JOIN agents a ON a.agent_id = u.agent_id {where}"
            " ORDER BY u.updated_ms DESC, u.agent_id", args).fetchall()
        return [{"agent_id": r[0], "agent_name": r[1], "kind": r[2], "name": r[3], "version": r[4], "state": r[5],
                 "detail": r[6], "rollout": r[7], "progress": None if r[8] is None else json.loads(r[8]),
                 "updated_ms": r[9]} for r in rows]

    # -- policy --------------------------------------------------------------------------------------------------

    def policy(self, agent_id: str) -> Policy:
        row = self._db.execute("SELECT opt_out, pins FROM agent_update_policy WHERE agent_id = ?",
                               (agent_id,)).fetchone()
        return Policy() if row is None else Policy(bool(row[0]), json.loads(row[1]))

    def policies(self) -> dict[str, Policy]:
        rows = self._db.execute("SELECT agent_id, opt_out, pins FROM agent_update_policy").fetchall()
        return {r[0]: Policy(bool(r[1]), json.loads(r[2])) for r in rows}

    def _save(self, agent_id: str, policy: Policy) -> None:
        if not policy.opt_out and not policy.pins:
            self._db.execute("DELETE FROM agent_update_policy WHERE agent_id = ?", (agent_id,))
            return
        self._db.execute("INSERT INTO agent_update_policy (agent_id, opt_out, pins) VALUES (?, ?, ?)"
                         " ON CONFLICT(agent_id) DO UPDATE SET opt_out = excluded.opt_out, pins = excluded.pins",
                         (agent_id, int(policy.opt_out), json.dumps(policy.pins, sort_keys=True)))

    def pin(self, agent_id: str, kind: str, name: str, version: str) -> Policy:
        policy = self.policy(agent_id)
        policy.pins[pin_key(kind, name)] = version
        self._save(agent_id, policy)
        return policy

    def unpin(self, agent_id: str, kind: str | None = None, name: str | None = None) -> tuple[Policy, int]:
        """Remove the pin of (kind, name), or every pin of `kind`, or every pin; returns the policy and how many
        pins were removed."""
        policy = self.policy(agent_id)
        keep = {k: v for k, v in policy.pins.items()
                if not ((kind is None or k.split(":", 1)[0] == kind)
                        and (name is None or k.split(":", 1)[1] == name))}
        removed = len(policy.pins) - len(keep)
        policy.pins = keep
        self._save(agent_id, policy)
        return policy, removed

    def set_opt_out(self, agent_id: str, opt_out: bool) -> Policy:
        policy = self.policy(agent_id)
        policy.opt_out = opt_out
        self._save(agent_id, policy)
        return policy


__all__ = ["EVENT_NAME", "EVENT_OBJECT", "HOST_NAME", "KINDS", "STATES", "Policy", "UpdateReport", "UpdateStore",
           "check_name", "check_version", "parse_state_event", "pin_key"]
