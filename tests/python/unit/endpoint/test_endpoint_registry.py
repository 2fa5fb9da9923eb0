"""The SQLite registry: hello upserts, buffered heartbeats, lookups, disconnects."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pyagent.endpoint import StateError
from pyagent.endpoint._registry import AgentInfo, Registry


def info(agent_id: str = "a1", name: str = "web-1", version: str = "0.1.0") -> AgentInfo:
    return AgentInfo(agent_id=agent_id, name=name, host_version=version, python_version="3.11.2",
                     bundles=[{"name": "hello", "version": "1.0", "agents": ["hello"]}], labels={"env": "dev"},
                     platform={"system": "Linux"}, features={"bundle.call": 1})


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "endpoint.db")
    yield reg  # type: ignore[misc]
    reg.close()


def test_hello_creates_then_updates(registry: Registry) -> None:
    registry.upsert_hello(info(), "127.0.0.1:1000", 1000)
    rec = registry.get_agent("a1")
    assert rec is not None
    assert rec["connected"] is True and rec["first_seen"] == rec["last_seen"] == 1000
    assert rec["bundles"] == [{"name": "hello", "version": "1.0", "agents": ["hello"]}]
    assert rec["labels"] == {"env": "dev"} and rec["peer"] == "127.0.0.1:1000"
    registry.set_disconnected("a1", 1500)
    registry.upsert_hello(info(version="0.2.0"), "127.0.0.1:2000", 2000)
    rec = registry.get_agent("web-1")
    assert rec is not None
    assert (rec["first_seen"], rec["last_seen"], rec["host_version"], rec["connected"]) == (1000, 2000, "0.2.0", True)
    assert len(registry.list_agents()) == 1


def test_heartbeats_are_buffered_and_flushed_before_reads(registry: Registry) -> None:
    registry.upsert_hello(info(), "p", 1000)
    registry.heartbeat("a1", 2000, None, None, 0.0)
    registry.heartbeat("a1", 3000, 0.5, -2.0, None)
    registry.heartbeat("a1", 4000, None, None, None)  # None keeps the last measurement
    assert registry.pending == 1
    rec = registry.get_agent("a1")
    assert rec is not None and registry.pending == 0
    assert (rec["last_seen"], rec["latency_ms"], rec["skew_ms"], rec["py_lag_ms"]) == (4000, 0.5, -2.0, 0.0)
    # A new hello means a new session: measurements start over.
    registry.upsert_hello(info(), "p", 5000)
    rec = registry.get_agent("a1")
    assert rec is not None and rec["latency_ms"] is None


def test_lookup_by_name_prefers_the_connected_agent(registry: Registry) -> None:
    registry.upsert_hello(info("a1", "web"), "p", 1000)
    registry.upsert_hello(info("a2", "web"), "p", 2000)
    registry.set_disconnected("a2", 3000)
    rec = registry.get_agent("web")
    assert rec is not None and rec["agent_id"] == "a1"
    assert registry.get_agent("nope") is None


def test_reopen_marks_everyone_disconnected(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "endpoint.db")
    reg.upsert_hello(info(), "p", 1000)
    reg.close()
    reg = Registry(tmp_path / "endpoint.db")
    try:
        assert reg.mark_all_disconnected() == 1
        rec = reg.get_agent("a1")
        assert rec is not None and rec["connected"] is False
        assert reg.list_agents()[0]["agent_id"] == "a1"
    finally:
        reg.close()


def test_wal_mode_and_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "endpoint.db"
    Registry(path).close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.execute("PRAGMA user_version=99")
    finally:
        db.close()
    with pytest.raises(StateError, match="schema version 99"):
        Registry(path)
