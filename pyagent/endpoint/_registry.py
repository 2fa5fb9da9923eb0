"""The agent registry (SQLite).

One class with a small surface (`upsert_hello`, `heartbeat`, `set_disconnected`, `list_agents`, `get_agent`) so that a
PostgreSQL implementation can replace it for cluster mode. All calls come from the event loop thread; statements are
small, and heartbeats are buffered in memory and written in one transaction per `flush()` (the endpoint flushes about
once a second, and before every read), so 10k agents cost one short write per second instead of 10k commits.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from pyagent.endpoint._errors import StateError
from pyagent.endpoint._events import EVENTS_SCHEMA

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id       TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    host_version   TEXT,
    python_version TEXT,
    bundles        TEXT NOT NULL DEFAULT '[]',
    labels         TEXT NOT NULL DEFAULT '{}',
    platform       TEXT NOT NULL DEFAULT '{}',
    features       TEXT NOT NULL DEFAULT '{}',
    first_seen     INTEGER NOT NULL,
    last_seen      INTEGER NOT NULL,
    connected      INTEGER NOT NULL DEFAULT 0,
    latency_ms     REAL,
    skew_ms        REAL,
    py_lag_ms      REAL,
    peer           TEXT
);
CREATE INDEX IF NOT EXISTS agents_name ON agents(name);
"""

# Version 2: enrollment (agents get a status and the certificate they were issued) and hashed tokens.
_AGENT_COLUMNS_V2 = (
    ("status", "TEXT NOT NULL DEFAULT 'active'"),  # pending | active | rejected | revoked
    ("pubkey_fp", "TEXT"),                         # SHA-256 of the enrolled public key (DER SubjectPublicKeyInfo)
    ("token_id", "TEXT"),                          # the enrollment token used
    ("cert_serial", "TEXT"),                       # the last certificate issued, hex
    ("cert_not_after", "INTEGER"),                 # ms since the epoch
)
_SCHEMA_V2 = """
CREATE UNIQUE INDEX IF NOT EXISTS agents_pubkey ON agents(pubkey_fp) WHERE pubkey_fp IS NOT NULL;
CREATE TABLE IF NOT EXISTS enroll_tokens (
    token_id    TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    labels      TEXT NOT NULL DEFAULT '{}',
    max_uses    INTEGER,
    uses        INTEGER NOT NULL DEFAULT 0,
    expires_at  INTEGER,
    approve     INTEGER NOT NULL DEFAULT 0,
    revoked     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS operator_tokens (
    token_id    TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    label       TEXT NOT NULL DEFAULT '',
    revoked     INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
"""

# The agent API (issue 6): what the hello published; the events table is pyagent/endpoint/_events.py's.
AGENT_API_COLUMNS = (
    ("interface", "TEXT NOT NULL DEFAULT '{}'"),     # agent object name -> interface (methods, config, ...)
    ("capabilities", "TEXT NOT NULL DEFAULT '[]'"),  # sorted union of the objects' capabilities
)

_COLUMNS = ("agent_id, name, connected, host_version, python_version, bundles, labels, platform, features, "
            "first_seen, last_seen, latency_ms, skew_ms, py_lag_ms, peer, status, cert_not_after, capabilities")


class AgentRecord(TypedDict):
    """An agent as the operator API shows it; times are milliseconds since the epoch."""

    agent_id: str
    name: str
    connected: bool
    host_version: str | None
    python_version: str | None
    bundles: list[Any]
    labels: dict[str, Any]
    platform: dict[str, Any]
    features: dict[str, Any]
    first_seen: int
    last_seen: int
    latency_ms: float | None
    skew_ms: float | None
    py_lag_ms: float | None
    peer: str | None
    status: str
    cert_not_after: int | None
    capabilities: list[str]


@dataclass(frozen=True)
class AgentInfo:
    """What an agent says about itself in its hello."""

    agent_id: str
    name: str
    host_version: str
    python_version: str
    bundles: list[dict[str, Any]]
    labels: dict[str, str]
    platform: dict[str, str]
    features: dict[str, int]
    # Agent object name -> its interface (docs/protocol.md, "Agent API messages"); {} from older agents.
    interface: dict[str, Any] = field(default_factory=dict)

    @property
    def capabilities(self) -> list[str]:
        """Every capability any agent object declares, sorted, without duplicates."""
        return sorted({str(c) for spec in self.interface.values() if isinstance(spec, dict)
                       for c in spec.get("capabilities", ())})


def _record(row: tuple[Any, ...]) -> AgentRecord:
    return AgentRecord(
        agent_id=row[0], name=row[1], connected=bool(row[2]), host_version=row[3], python_version=row[4],
        bundles=json.loads(row[5]), labels=json.loads(row[6]), platform=json.loads(row[7]),
        features=json.loads(row[8]), first_seen=row[9], last_seen=row[10], latency_ms=row[11], skew_ms=row[12],
        py_lag_ms=row[13], peer=row[14], status=row[15], cert_not_after=row[16], capabilities=json.loads(row[17]),
    )


class Registry:
    """SQLite store of agents. Not thread-safe: use it from the event loop thread only."""

    def __init__(self, path: Path | str) -> None:
        try:
            self._db = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the registry {path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=2000")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StateError(f"the registry {path} has schema version {version}, newer than this endpoint "
                                 f"({SCHEMA_VERSION}); upgrade pyagent")
            self._db.executescript(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(agents)")}
            for column, decl in _AGENT_COLUMNS_V2:
                if column not in have:
                    self._db.execute(f"ALTER TABLE agents ADD COLUMN {column} {decl}")
            self._db.executescript(_SCHEMA_V2)
            for column, decl in AGENT_API_COLUMNS:  # additive: older endpoints ignore them
                if column not in have:
                    self._db.execute(f"ALTER TABLE agents ADD COLUMN {column} {decl}")
            self._db.executescript(EVENTS_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.Error as exc:
            self._db.close()
            raise StateError(f"cannot use the registry {path}: {exc}") from exc
        except BaseException:
            self._db.close()
            raise
        # agent_id -> (last_seen, latency_ms, skew_ms, py_lag_ms), written by flush().
        self._heartbeats: dict[str, tuple[int, float | None, float | None, float | None]] = {}

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for the enrollment and token stores that share this database."""
        return self._db

    def close(self) -> None:
        self.flush()
        self._db.close()

    def mark_all_disconnected(self) -> int:
        self._heartbeats.clear()
        return self._db.execute("UPDATE agents SET connected = 0 WHERE connected != 0").rowcount

    def upsert_hello(self, info: AgentInfo, peer: str, now_ms: int) -> None:
        """Record a successful handshake: the agent is connected, its latency is not measured yet."""
        self._heartbeats.pop(info.agent_id, None)
        self._db.execute(
            "INSERT INTO agents (agent_id, name, host_version, python_version, bundles, labels, platform, features,"
            " first_seen, last_seen, connected, latency_ms, skew_ms, py_lag_ms, peer, interface, capabilities)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, NULL, NULL, NULL, ?, ?, ?)"
            " ON CONFLICT(agent_id) DO UPDATE SET name = excluded.name, host_version = excluded.host_version,"
            " python_version = excluded.python_version, bundles = excluded.bundles, labels = excluded.labels,"
            " platform = excluded.platform, features = excluded.features, last_seen = excluded.last_seen,"
            " connected = 1, latency_ms = NULL, skew_ms = NULL, py_lag_ms = NULL, peer = excluded.peer,"
            " interface = excluded.interface, capabilities = excluded.capabilities",
            (info.agent_id, info.name, info.host_version, info.python_version, json.dumps(info.bundles),
             json.dumps(info.labels), json.dumps(info.platform), json.dumps(info.features), now_ms, now_ms, peer,
             json.dumps(info.interface), json.dumps(info.capabilities)),
        )

    def interface(self, ref: str) -> tuple[str, dict[str, Any]] | None:
        """(agent_id, the interface its last hello published) of an agent by id or name, or None."""
        record = self.get_agent(ref)
        if record is None:
            return None
        row = self._db.execute("SELECT interface FROM agents WHERE agent_id = ?", (record["agent_id"],)).fetchone()
        return record["agent_id"], json.loads(row[0]) if row else {}

    def heartbeat(self, agent_id: str, now_ms: int, latency_ms: float | None, skew_ms: float | None,
                  py_lag_ms: float | None) -> None:
        """Buffer a heartbeat; a None measurement keeps the last known value."""
        prev = self._heartbeats.get(agent_id)
        if prev is not None:
            latency_ms = prev[1] if latency_ms is None else latency_ms
            skew_ms = prev[2] if skew_ms is None else skew_ms
            py_lag_ms = prev[3] if py_lag_ms is None else py_lag_ms
        self._heartbeats[agent_id] = (now_ms, latency_ms, skew_ms, py_lag_ms)

    @property
    def pending(self) -> int:
        return len(self._heartbeats)

    def flush(self) -> None:
        """Write the buffered heartbeats in one transaction."""
        if not self._heartbeats:
            return
        rows = [(ts, lat, skew, lag, agent_id) for agent_id, (ts, lat, skew, lag) in self._heartbeats.items()]
        self._heartbeats.clear()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE agents SET last_seen = ?, latency_ms = COALESCE(?, latency_ms),"
                " skew_ms = COALESCE(?, skew_ms), py_lag_ms = COALESCE(?, py_lag_ms) WHERE agent_id = ?",
                rows,
            )

    def set_disconnected(self, agent_id: str, now_ms: int) -> None:
        self.flush()
        self._db.execute("UPDATE agents SET connected = 0, last_seen = ? WHERE agent_id = ?", (now_ms, agent_id))

    def list_agents(self) -> list[AgentRecord]:
        self.flush()
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM agents ORDER BY name, agent_id").fetchall()
        return [_record(row) for row in rows]

    def get_agent(self, ref: str) -> AgentRecord | None:
        """An agent by id, else by name (the connected, most recently seen one when several share the name)."""
        self.flush()
        row = self._db.execute(f"SELECT {_COLUMNS} FROM agents WHERE agent_id = ?", (ref,)).fetchone()
        if row is None:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM agents WHERE name = ? ORDER BY connected DESC, last_seen DESC LIMIT 1",
                (ref,),
            ).fetchone()
        return None if row is None else _record(row)
