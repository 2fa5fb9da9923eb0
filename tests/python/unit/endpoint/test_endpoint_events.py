"""EventHub (storage, de-duplication, acks, following) and target selection, without agents."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest

from pyagent.endpoint._events import EventHub, make_matcher, parse_batch
from pyagent.endpoint._targets import AgentView, Selector, TargetError, fan_out
from pyagent.protocol import AGENT_UNAVAILABLE, ProtocolError, RemoteError

VIEW = AgentView("id-1", "web-1", "host-a", {"env": "prod", "group": "blue"}, ("Metrics",))


def db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("CREATE TABLE agents (agent_id TEXT PRIMARY KEY, name TEXT, platform TEXT, labels TEXT,"
                 " capabilities TEXT, connected INTEGER, status TEXT)")
    return conn


def ev(seq: int, event: str = "tick", data: Any = None) -> dict[str, Any]:
    return {"seq": seq, "agent": "obj", "event": event, "data": data, "time": 1000 + seq}


def test_store_dedups_and_acks() -> None:
    hub = EventHub(db())
    assert hub.store_batch(VIEW, {"events": [ev(1), ev(2), ev(3)], "dropped": 0}) == {"acked": 3}
    # A batch re-sent after a lost ack, overlapping the next one: stored once.
    assert hub.store_batch(VIEW, {"events": [ev(2), ev(3), ev(4)], "dropped": 0}) == {"acked": 4}
    assert [e["seq"] for e in hub.recent(make_matcher(None, None, None), 100)] == [1, 2, 3, 4]
    assert hub.stats.duplicates == 2 and hub.stats.stored == 4
    # Only drops: acked stays at the highest stored seq, the drop count is stored as an event.
    assert hub.store_batch(VIEW, {"events": [], "dropped": 7}) == {"acked": 4}
    last = hub.recent(make_matcher(None, "outbox.dropped", None), 1)
    assert last[0]["data"] == {"dropped": 7} and hub.stats.dropped_by_agents == 7
    # Another agent has its own sequence.
    other = AgentView("id-2", "db-1")
    assert hub.store_batch(other, {"events": [ev(1)]}) == {"acked": 1}


def test_survives_reopen() -> None:
    conn = db()
    EventHub(conn).store_batch(VIEW, {"events": [ev(1, data={"x": 1}), ev(2)]})
    hub = EventHub(conn)  # an endpoint restart: the ring is primed, the acks remembered
    assert [e["data"] for e in hub.recent(make_matcher(None, None, None), 10)] == [{"x": 1}, None]
    assert hub.store_batch(VIEW, {"events": [ev(2), ev(3)]}) == {"acked": 3}
    assert conn.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 3


@pytest.mark.parametrize("params, field", [
    ({"events": {}}, "'events' must be an array"),
    ({"events": [], "dropped": -1}, "'dropped'"),
    ({"events": [], "extra": 1}, "unknown parameter 'extra'"),
    ({"events": [{"seq": 0, "agent": "a", "event": "e", "time": 1}]}, "'events[0].seq'"),
    ({"events": [{"seq": True, "agent": "a", "event": "e", "time": 1}]}, "'events[0].seq'"),
    ({"events": [ev(1), {"seq": 2, "agent": "", "event": "e", "time": 1}]}, "'events[1].agent'"),
    ({"events": [{"seq": 2, "agent": "a", "event": "e" * 300, "time": 1}]}, "'events[0].event'"),
    ({"events": [{"seq": 2, "agent": "a", "event": "e", "time": "now"}]}, "'events[0].time'"),
    ({"events": [{"seq": 2, "agent": "a", "event": "e", "time": 1e300}]}, "'events[0].time'"),
    ({"events": [{"seq": 1 << 64, "agent": "a", "event": "e", "time": 1}]}, "'events[0].seq'"),
])
def test_bad_batches_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_batch(params)
    assert info.value.code == -32602 and field in info.value.message


def test_follow_filters_counts_and_ends() -> None:
    async def main() -> list[Any]:
        hub = EventHub(db())
        hub.store_batch(VIEW, {"events": [ev(1, "report")]})
        got: list[Any] = []

        async def follow() -> None:
            async for record in hub.follow(make_matcher("env=prod", "rep*", "obj"), last=5, count=3, timeout=5):
                got.append(record and record["seq"])

        task = asyncio.ensure_future(follow())
        await asyncio.sleep(0.05)
        hub.store_batch(AgentView("id-2", "dev-1", labels={"env": "dev"}), {"events": [ev(1, "report")]})
        hub.store_batch(VIEW, {"events": [ev(2, "tick"), ev(3, "report"), ev(4, "report"), ev(5, "report")]})
        await asyncio.wait_for(task, 5)
        assert hub.followers == 0
        return got

    assert asyncio.run(main()) == [1, 3, 4]


def test_slow_follower_is_told_of_drops() -> None:
    async def main() -> list[Any]:
        hub = EventHub(db(), follower_queue=2)
        got: list[Any] = []
        agen = hub.follow(make_matcher(None, None, None), timeout=2)
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0.05)
        hub.store_batch(VIEW, {"events": [ev(i) for i in range(1, 6)]})
        got.append((await first)["seq"])  # type: ignore[index]
        got.append((await agen.__anext__())["seq"])  # type: ignore[index]
        got.append(await agen.__anext__())
        await agen.aclose()
        return got

    assert asyncio.run(main()) == [1, 2, {"dropped": 3}]


@pytest.mark.parametrize("text, matches", [
    ("id-1", True), ("web-1", True), ("host-a", False), ("group:blue", True), ("group:red", False),
    ("env=prod", True), ("env=prod,group=blue", True), ("env=prod,group=red", False),
    ("capability:metrics", True), ("capability:METRICS", True), ("capability:met", False), ("*", True),
])
def test_selector_matches(text: str, matches: bool) -> None:
    assert Selector.parse(text).matches(VIEW) is matches


def test_selector_plain_falls_back_to_hostname_and_skips_inactive() -> None:
    views = [VIEW, AgentView("id-2", "web-2", "host-a"), AgentView("id-3", "x", status="revoked",
                                                                   labels={"env": "prod"})]
    assert [v.agent_id for v in Selector.parse("host-a").select(views)] == ["id-1", "id-2"]
    assert [v.agent_id for v in Selector.parse("env=prod").select(views)] == ["id-1"]
    assert Selector.parse("x").select(views)[0].agent_id == "id-3"  # a plain target names it explicitly
    for bad in ("", "group:", "env=", "=x", "a b=c", "x" * 2000):
        with pytest.raises(TargetError):
            Selector.parse(bad)


def test_fan_out_limits_concurrency_and_reports_per_target() -> None:
    running = peak = 0

    async def call(view: AgentView) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        if view.agent_id == "b":
            raise RemoteError(AGENT_UNAVAILABLE, "gone")
        if view.agent_id == "c":
            raise KeyError("bug")
        return view.agent_id

    views = [AgentView(i, i) for i in "abcdefg"]
    results = asyncio.run(fan_out(views, call, concurrency=3))
    assert list(results) == list("abcdefg") and peak == 3
    assert results["a"] == {"result": "a"} and results["b"]["error"]["code"] == AGENT_UNAVAILABLE
    assert results["c"]["error"]["code"] == -32603 and "KeyError" in results["c"]["error"]["message"]


def test_unstorable_data_and_storage_errors_are_errors_not_crashes() -> None:
    conn = db()
    hub = EventHub(conn)
    with pytest.raises(ProtocolError, match=r"'events\[1\].data' cannot be stored"):
        hub.store_batch(VIEW, {"events": [ev(1), ev(2, data=float("nan"))]})
    assert hub.acked(VIEW.agent_id) == 0
    conn.execute("DROP TABLE events")
    with pytest.raises(RemoteError) as info:
        hub.store_batch(VIEW, {"events": [ev(1)]})
    assert info.value.code == -32603 and hub.acked(VIEW.agent_id) == 0
