"""Rollouts with a real endpoint in-process and scripted fake agents over TLS: waves, gates, halt/resume, offline
agents, pins, opt-out, superseding, and the 4xx answers to bad requests (docs/updates.md §4)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from fakeagent import endpoint_config
from rolloutagents import (
    COMMIT,
    FAIL,
    HANG,
    OFFERS,
    REFUSE,
    ROLL_BACK,
    SILENT,
    FakeRepo,
    ScriptedAgent,
    api,
    close_all,
    wait_until,
)

from pyagent.endpoint import Endpoint
from pyagent.endpoint._rollouts import (
    RolloutError,
    RolloutManager,
    format_percent,
    member_key,
    parse_rate,
    parse_stall_timeout,
    parse_waves,
    wave_size,
)
from pyagent.endpoint._updates import UpdateStore

REPO = FakeRepo(("bundle", "hello", "2.0.0", None), ("bundle", "hello", "3.0.0", None),
                ("host", "pyagent-host", "0.2.0", "linux-x86_64"))


async def started(tmp_path: Path) -> Endpoint:
    ep = Endpoint(endpoint_config(tmp_path))
    await ep.start()
    ep.rollouts.repo = REPO
    return ep


async def start_rollout(ep: Endpoint, **body: Any) -> dict[str, Any]:
    spec = {"kind": "bundle", "name": "hello", "version": "2.0.0", **body}
    status, reply = await api(ep, "POST", "/api/v1/rollouts", spec)
    assert status == 201, reply
    return dict(reply)


async def rollout(ep: Endpoint, rollout_id: str) -> dict[str, Any]:
    status, reply = await api(ep, "GET", f"/api/v1/rollouts/{rollout_id}")
    assert status == 200, reply
    return dict(reply)


async def wait_state(ep: Endpoint, rollout_id: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        r = await rollout(ep, rollout_id)
        return r if r["state"] == state else None
    return dict(await wait_until(check, timeout, f"rollout {rollout_id} {state}"))


# -- pure parts ---------------------------------------------------------------------------------------------------

def test_waves_and_rates_parse_strictly() -> None:
    assert parse_waves("1%,10%,50%,100%") == [0.01, 0.1, 0.5, 1.0]
    assert parse_waves(["25%", " 100 % "]) == [0.25, 1.0]
    for bad, words in [("", "empty"), ("10%,5%,100%", "wave 2 '5%' is not larger"), ("10%,50%", "last wave"),
                       ("abc", "wave 1 'abc' is not a percentage"), ("0%,100%", "above 0%"),
                       ("50%,150%", "at most 100%"), ("10,100%", "wave 1 '10' is not a percentage"), (5, "string")]:
        with pytest.raises(RolloutError, match=words) as info:
            parse_waves(bad)
        assert info.value.status == 400
    assert parse_rate("5%", "r") == 0.05 and parse_rate(0.25, "r") == 0.25 and parse_rate("0.5", "r") == 0.5
    for bad in ("5", "x%", "-1%", "101%", True, None, float("nan")):
        with pytest.raises(RolloutError, match="'r'"):
            parse_rate(bad, "r")
    assert [wave_size(w, 10) for w in (0.01, 0.1, 0.5, 1.0)] == [1, 1, 5, 10]
    assert wave_size(0.3, 10) == 3 and wave_size(0.5, 0) == 0 and format_percent(0.005) == "0.5%"
    assert parse_stall_timeout(1) == 1.0 and parse_stall_timeout(7 * 86400) == 604800.0
    for bad in (0, -5, 604801, "60", True, None, float("inf"), float("nan")):
        with pytest.raises(RolloutError, match="'stall_timeout' must be a number of seconds") as info:
            parse_stall_timeout(bad)
        assert info.value.status == 400


_OLD_ROLLOUTS = """CREATE TABLE rollouts (id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
    version TEXT NOT NULL, selector TEXT NOT NULL, waves TEXT NOT NULL, max_failure_rate REAL NOT NULL,
    max_crash_rate REAL NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    wave INTEGER NOT NULL DEFAULT 0, gate_since_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL)"""


def test_a_database_from_before_stall_timeouts_opens_with_the_default(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "endpoint.db", isolation_level=None)
    try:
        db.execute(_OLD_ROLLOUTS)
        db.execute("INSERT INTO rollouts VALUES ('ro-old', 'bundle', 'hello', '2.0.0', '*', '[1.0]', 0.05, 0.05,"
                   " 'completed', '', 0, 1, 1, 1)")
        manager = RolloutManager(None, db, UpdateStore(db))  # type: ignore[arg-type]
        assert manager.describe("ro-old")["stall_timeout"] == 900
        RolloutManager(None, db, UpdateStore(db))  # type: ignore[arg-type]  # a second open: nothing to add
        columns = [r[1] for r in db.execute("PRAGMA table_info(rollouts)")]
        assert columns.count("stall_timeout_s") == 1
    finally:
        db.close()


# -- waves ----------------------------------------------------------------------------------------------------------

async def test_waves_advance_in_member_order_and_complete(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", COMMIT) for i in range(10)]
    try:
        OFFERS.clear()
        r = await start_rollout(ep, waves="10%,50%,100%")
        assert r["state"] == "running" and r["members"] == 10 and r["max_crash_rate"] == 0.05
        done = await wait_state(ep, r["id"], "completed")
        assert done["counts"] == {"committed": 10} and done["failure_rate"] == 0 and done["wave"] == 3
        order = [a["agent_id"] for a in done["agents"]]
        assert order == sorted(order, key=lambda a: member_key(r["id"], a))
        offered = [agent for _, agent in OFFERS]
        assert sorted(offered) == sorted(order)  # each agent got exactly one offer
        # Wave 1 is the first member alone, wave 2 the next four; later waves start after the earlier ones ended.
        assert offered[0] == order[0] and set(offered[1:5]) == set(order[1:5])
        assert [w["members"] for w in done["wave_progress"]] == [1, 4, 5]
        offer = next(a for a in agents if a.agent_id == order[0]).offers[0]
        assert offer == {"kind": "bundle", "name": "hello", "version": "2.0.0", "target": "bundles/hello/2.0.0.tar.gz",
                         "rollout": r["id"]}
        status, updates = await api(ep, "GET", "/api/v1/updates")
        assert status == 200 and len(updates["updates"]) == 10
        assert {u["state"] for u in updates["updates"]} == {"committed"}
        status, listed = await api(ep, "GET", "/api/v1/rollouts")
        assert status == 200 and [x["id"] for x in listed["rollouts"]] == [r["id"]]
        status, prefixed = await api(ep, "GET", f"/api/v1/rollouts/{r['id'][:6]}")
        assert status == 200 and prefixed["id"] == r["id"]
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_failures_halt_the_rollout_at_its_gate_and_resume_continues(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", COMMIT) for i in range(10)]
    try:
        # In-process, so that the scripts are chosen by member order before any offer is answered (no await).
        r = ep.rollouts.create({"kind": "bundle", "name": "hello", "version": "2.0.0", "waves": "50%,100%",
                                "max_failure_rate": "5%"})
        order = [a["agent_id"] for a in ep.rollouts.describe(r["id"], agents=True)["agents"]]
        for agent in agents:  # wave 1: two fail, one rolls back, two commit
            agent.script = FAIL if agent.agent_id in order[:2] else ROLL_BACK if agent.agent_id == order[2] else COMMIT
        halted = await wait_state(ep, r["id"], "halted")
        assert "failure rate" in halted["reason"] and "above the limit 5%" in halted["reason"]
        await wait_until(lambda: _ended(ep, r["id"], order[:5]), what="wave 1 to end")
        await asyncio.sleep(ep.rollouts.tick * 1.5)  # a tick passes: nothing of wave 2 is offered
        assert all(not a.offers for a in agents if a.agent_id in order[5:])
        assert all(len(a.offers) == 1 for a in agents if a.agent_id in order[:5])
        assert ep.rollouts.describe(r["id"])["counts"] == {"committed": 2, "failed": 2, "pending": 5,
                                                           "rolled_back": 1}
        # Resume: the gate counts afresh and wave 2 goes out.
        status, resumed = await api(ep, "POST", f"/api/v1/rollouts/{r['id']}/resume")
        assert status == 200 and resumed["state"] in ("running", "completed")
        done = await wait_state(ep, r["id"], "completed")
        assert done["counts"] == {"committed": 7, "failed": 2, "rolled_back": 1}
        failed = next(a for a in done["agents"] if a["state"] == "rolled_back")
        assert failed["detail"] == "exit code 2"
        status, again = await api(ep, "POST", f"/api/v1/rollouts/{r['id']}/resume")
        assert status == 409 and "only a halted rollout" in again["error"]["message"]
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_a_new_rollout_of_the_same_target_supersedes_the_running_one(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", HANG) for i in range(3)]
    try:
        first = await start_rollout(ep, waves="100%")
        await wait_until(lambda: all(a.offers for a in agents), what="the first offers")
        for agent in agents:
            agent.script = COMMIT
        second = await start_rollout(ep, version="3.0.0", waves="100%")
        old = await rollout(ep, first["id"])
        assert old["state"] == "superseded" and second["id"] in old["reason"]
        # The agents are still in probation with 2.0.0 (an agent runs one update at a time): the new rollout waits
        # for that to end rather than offer to a busy agent.
        waiting = await rollout(ep, second["id"])
        assert waiting["counts"] == {"waiting": 3}
        assert all(a["detail"].startswith(f"busy: rollout {first['id']} is updating it") for a in waiting["agents"])
        assert all(len(a.offers) == 1 for a in agents)
        for agent in agents:  # the old update ends (a report of the superseded rollout still counts)
            await agent.report(agent.offers[0], "committed")
        await wait_state(ep, second["id"], "completed")
        assert (await rollout(ep, first["id"]))["counts"] == {"committed": 3}
        assert [o["version"] for o in agents[0].offers] == ["2.0.0", "3.0.0"]
        # The superseded rollout takes no more offers; halting it is refused.
        status, reply = await api(ep, "POST", f"/api/v1/rollouts/{first['id']}/halt")
        assert status == 409 and "superseded" in reply["error"]["message"]
    finally:
        await close_all(agents)
        await ep.aclose()


def _ended(ep: Endpoint, rollout_id: str, agent_ids: list[str]) -> bool:
    members = {a["agent_id"]: a["state"] for a in ep.rollouts.describe(rollout_id, agents=True)["agents"]}
    return all(members[a] in ("committed", "failed", "rolled_back", "refused") for a in agent_ids)


def _crash_record(when_ms: int) -> bytes:
    return (f"pyagent crash record 1\nsignal: 11 SIGSEGV\ncode: 1\naddress: 0x10\npid: 1\ntid: 2\nthread: main\n"
            f"time_ns: {when_ms * 10**6}\nhost_version: 0.1.0\nannotation: bundles=hello=3.0.0\nbacktrace:\n"
            "/usr/bin/pyagent-host(+0x8fa5)[0x55d0c0e08fa5]\nend backtrace\nend\n").encode()


async def store_crash(ep: Endpoint, agent_id: str) -> None:
    data = _crash_record(int(time.time() * 1000))
    report = f"{int(time.time())}-{agent_id}"
    store = ep.crashes
    store.begin(agent_id, {"report": report, "kind": "crash", "annotations": {"host_version": "0.1.0"},
                           "files": [{"name": "record.txt", "size": len(data)}]})
    store.chunk(agent_id, {"report": report, "file": "record.txt", "offset": 0, "size": len(data),
                           "data": base64.b64encode(data).decode(), "last": True})
    await store.end(agent_id, {"report": report, "sha256": {"record.txt": hashlib.sha256(data).hexdigest()}})


async def test_crash_reports_halt_the_rollout(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", HANG) for i in range(4)]
    try:
        r = await start_rollout(ep, waves="25%,100%", max_failure_rate="100%", max_crash_rate="10%")
        assert r["max_failure_rate"] == 1.0 and r["max_crash_rate"] == 0.1
        first = (await rollout(ep, r["id"]))["agents"][0]["agent_id"]
        await wait_until(lambda: any(a.offers for a in agents), what="the first offer")
        assert (await rollout(ep, r["id"]))["state"] == "running"
        await store_crash(ep, first)
        # No member state changes: the periodic tick sees the crash report.
        halted = await wait_state(ep, r["id"], "halted", timeout=5)
        assert "crash rate" in halted["reason"] and halted["crashes"] == 1
        assert sum(len(a.offers) for a in agents) == 1
    finally:
        await close_all(agents)
        await ep.aclose()


# -- stalled members -----------------------------------------------------------------------------------------------

async def test_a_member_without_reports_stalls_fails_and_its_wave_advances(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", COMMIT) for i in range(2)]
    try:
        r = ep.rollouts.create({"kind": "bundle", "name": "hello", "version": "2.0.0", "waves": "50%,100%",
                                "max_failure_rate": "100%", "stall_timeout": 1})
        assert r["stall_timeout"] == 1.0
        order = [a["agent_id"] for a in ep.rollouts.describe(r["id"], agents=True)["agents"]]
        silent = next(a for a in agents if a.agent_id == order[0])
        silent.script = SILENT  # wave 1: accepts the offer, then never reports
        done = await wait_state(ep, r["id"], "completed")
        assert done["counts"] == {"committed": 1, "failed": 1} and done["failure_rate"] == 0.5
        states = {a["agent_id"]: (a["state"], a["detail"]) for a in done["agents"]}
        assert states[order[0]] == ("failed", "stalled: no update report for 1 s")
        assert len(silent.offers) == 1
        status, updates = await api(ep, "GET", f"/api/v1/updates?agent={order[0]}")
        assert status == 200 and updates["updates"][0]["state"] == "failed"
        # A late report is the truth: the member commits after all.
        await silent.report(silent.offers[0], "committed")
        after = await wait_until(lambda: (x := ep.rollouts.describe(r["id"]))["counts"] == {"committed": 2} and x,
                                 what="the late report to count")
        assert after["failure_rate"] == 0 and after["state"] == "completed"
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_a_stalled_member_counts_in_the_gate(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", SILENT) for i in range(2)]
    try:
        r = await start_rollout(ep, waves="50%,100%", stall_timeout=0.5)
        halted = await wait_state(ep, r["id"], "halted", timeout=5)
        assert "failure rate 100% (1 of 1 ended)" in halted["reason"]
        assert halted["counts"] == {"failed": 1, "pending": 1}
        assert sum(len(a.offers) for a in agents) == 1  # wave 2 was never offered
    finally:
        await close_all(agents)
        await ep.aclose()


# -- offline agents, halt/resume, policy ---------------------------------------------------------------------------

async def test_offline_agent_gets_the_offer_when_it_connects_after_completion(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    away = await ScriptedAgent.start(ep, "agent-away", COMMIT)
    await away.close()
    await wait_until(lambda: not ep.is_connected("agent-away"), what="the agent to be gone")
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", COMMIT) for i in range(2)]
    try:
        r = await start_rollout(ep, waves="100%")
        done = await wait_state(ep, r["id"], "completed")
        assert done["counts"] == {"committed": 2, "waiting": 1}
        waiting = next(a for a in done["agents"] if a["state"] == "waiting")
        assert waiting["agent_id"] == "agent-away" and "offline" in waiting["detail"]
        back = await ScriptedAgent.start(ep, "agent-away", COMMIT)
        agents.append(back)
        await wait_until(lambda: back.offers, what="the offer on connect")
        assert back.offers[0]["rollout"] == r["id"]
        after = await wait_until(lambda: (x := ep.rollouts.describe(r["id"]))["counts"] == {"committed": 3} and x,
                                 what="the late agent to commit")
        assert after["state"] == "completed"
        # A new agent matching the selector joins the completed rollout when it first connects.
        new = await ScriptedAgent.start(ep, "agent-new", COMMIT)
        agents.append(new)
        await wait_until(lambda: new.offers, what="the new agent's offer")
        await wait_until(lambda: ep.rollouts.describe(r["id"])["counts"] == {"committed": 4}, what="4 committed")
    finally:
        await close_all(agents)
        await ep.aclose()


async def started_with_offline_agents(tmp_path: Path, count: int) -> Endpoint:
    """An endpoint that knows `count` agents (agent-00, …), none of them connected."""
    ep = await started(tmp_path)
    for i in range(count):
        gone = await ScriptedAgent.start(ep, f"agent-{i:02d}", COMMIT)
        await gone.close()
    await wait_until(lambda: ep.connected_count == 0, what="the agents to be gone")
    return ep


async def test_halted_rollout_makes_no_offers_until_resumed(tmp_path: Path) -> None:
    ep = await started_with_offline_agents(tmp_path, 2)
    agents: list[ScriptedAgent] = []
    try:
        r = await start_rollout(ep, waves="100%")
        assert (await wait_state(ep, r["id"], "completed"))["counts"] == {"waiting": 2}
        status, halted = await api(ep, "POST", f"/api/v1/rollouts/{r['id']}/halt")
        assert status == 200 and halted["state"] == "halted" and halted["reason"] == "halted by an operator"
        agents.append(await ScriptedAgent.start(ep, "agent-00", COMMIT))
        await wait_until(lambda: ep.is_connected("agent-00"))
        await asyncio.sleep(ep.rollouts.tick * 1.5)  # a tick passes: still nothing offered
        assert agents[0].offers == []
        status, resumed = await api(ep, "POST", f"/api/v1/rollouts/{r['id']}/resume")
        assert status == 200
        await wait_until(lambda: agents[0].offers, what="the offer after resume")
        await wait_until(lambda: ep.rollouts.describe(r["id"])["counts"] == {"committed": 1, "waiting": 1})
        status, again = await api(ep, "POST", f"/api/v1/rollouts/{r['id']}/resume")
        assert status == 409
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_pins_opt_out_and_agents_already_at_the_version(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, "agent-out", COMMIT),
              await ScriptedAgent.start(ep, "agent-pinned", COMMIT),
              await ScriptedAgent.start(ep, "agent-same-pin", COMMIT),
              await ScriptedAgent.start(ep, "agent-there", COMMIT, bundle_version="2.0.0"),
              await ScriptedAgent.start(ep, "agent-plain", REFUSE)]
    try:
        assert (await api(ep, "POST", "/api/v1/agents/agent-out/updates", {"opt_out": True}))[0] == 200
        status, pinned = await api(ep, "PUT", "/api/v1/agents/agent-pinned/pin",
                                   {"kind": "bundle", "name": "hello", "version": "1.0.0"})
        assert status == 200 and pinned["pins"] == {"bundle:hello": "1.0.0"}
        assert (await api(ep, "PUT", "/api/v1/agents/agent-same-pin/pin",
                          {"kind": "bundle", "name": "hello", "version": "2.0.0"}))[0] == 200
        r = await start_rollout(ep, waves="100%")
        done = await wait_state(ep, r["id"], "completed")
        states = {a["agent_id"]: (a["state"], a["detail"]) for a in done["agents"]}
        assert set(states) == {"agent-same-pin", "agent-there", "agent-plain"}
        assert states["agent-there"] == ("committed", "already at 2.0.0")
        assert states["agent-plain"][0] == "refused" and "upgrades = false" in states["agent-plain"][1]
        assert states["agent-same-pin"][0] == "committed"
        assert agents[3].offers == [] and agents[0].offers == [] and agents[1].offers == []
        assert done["failure_rate"] == 0  # refused does not count as a failure
        status, body = await api(ep, "GET", "/api/v1/updates?agent=agent-out")
        assert status == 200 and body == {"updates": [], "policies": {"agent-out": {"opt_out": True, "pins": {}}}}
        status, unpinned = await api(ep, "DELETE", "/api/v1/agents/agent-pinned/pin")
        assert status == 200 and unpinned["removed"] == 1 and unpinned["pins"] == {}
        assert (await api(ep, "POST", "/api/v1/agents/agent-out/updates", {"opt_out": False}))[1]["opt_out"] is False
        assert (await api(ep, "POST", "/api/v1/agents/agent-out/updates", {"opt_out": "yes"}))[0] == 400
        assert (await api(ep, "PUT", "/api/v1/agents/nobody/pin", {"kind": "host", "version": "1"}))[0] == 404
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_host_rollout_targets_the_agent_platform(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, "agent-x86", COMMIT),
              await ScriptedAgent.start(ep, "agent-arm", COMMIT, machine="aarch64", labels={"env": "arm"})]
    try:
        status, refused = await api(ep, "POST", "/api/v1/rollouts", {"kind": "host", "version": "0.2.0"})
        assert status == 409 and "linux-aarch64" in refused["error"]["message"]
        assert "pyagent release host BINARY --platform linux-aarch64 --version 0.2.0" in refused["error"]["message"]
        r = await start_rollout(ep, kind="host", name="pyagent-host", version="0.2.0", select="env=test",
                                waves="100%")
        await wait_state(ep, r["id"], "completed")
        assert agents[0].offers[0]["target"] == "hosts/linux-x86_64/0.2.0/pyagent-host"
        assert agents[0].offers[0]["name"] == "pyagent-host" and agents[1].offers == []
    finally:
        await close_all(agents)
        await ep.aclose()


@pytest.mark.parametrize("body, status, words", [
    ({"waves": "10%,5%,100%"}, 400, "wave 2 '5%' is not larger"),
    ({"waves": "10%,50%"}, 400, "the last wave must be 100%"),
    ({"waves": "ten"}, 400, "not a percentage"),
    ({"max_failure_rate": "5"}, 400, "'max_failure_rate' must be from 0% to 100%"),
    ({"max_crash_rate": "lots"}, 400, "'max_crash_rate' must be a percentage"),
    ({"select": "env="}, 400, "bad selector 'env='"),
    ({"select": "group:nobody"}, 400, "no active agent matches"),
    ({"kind": "package"}, 400, "'kind' must be"),
    ({"name": "../x"}, 400, "bad bundle name"),
    ({"version": ""}, 400, "bad version"),
    ({"color": "red"}, 400, "unknown field 'color'"),
    ({"stall_timeout": 0}, 400, "'stall_timeout' must be a number of seconds above 0 and at most 604800"),
    ({"stall_timeout": 8 * 86400}, 400, "at most 604800 (7 days), got 691200"),
    ({"stall_timeout": "1h"}, 400, "'stall_timeout' must be a number of seconds"),
    ({"version": "9.9.9"}, 409, "`pyagent release bundle PATH`"),
])
async def test_bad_rollout_requests_are_refused_clearly(tmp_path: Path, body: dict[str, Any], status: int,
                                                        words: str) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, "agent-00", COMMIT)]
    try:
        got, reply = await api(ep, "POST", "/api/v1/rollouts", {"kind": "bundle", "name": "hello",
                                                                "version": "2.0.0", **body})
        assert got == status and words in reply["error"]["message"], reply
        assert (await api(ep, "GET", "/api/v1/rollouts"))[1] == {"rollouts": []}
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_unreleased_versions_and_unknown_rollouts(tmp_path: Path) -> None:
    ep = Endpoint(endpoint_config(tmp_path))
    await ep.start()  # the endpoint's own (empty) TUF repository, not the fake one
    agents = [await ScriptedAgent.start(ep, "agent-00", COMMIT)]
    try:
        status, reply = await api(ep, "POST", "/api/v1/rollouts", {"kind": "bundle", "name": "hello",
                                                                   "version": "2.0.0"})
        assert status == 409 and "bundle hello 2.0.0 is not released" in reply["error"]["message"]
        status, reply = await api(ep, "POST", "/api/v1/rollouts", {"kind": "host", "version": "0.2.0"})
        assert status == 409 and "host 0.2.0 is not released for linux-x86_64" in reply["error"]["message"]
        assert (await api(ep, "GET", "/api/v1/rollouts"))[1] == {"rollouts": []}
        for method, path in (("GET", "/api/v1/rollouts/ro-nope"), ("POST", "/api/v1/rollouts/ro-nope/halt")):
            status, reply = await api(ep, method, path)
            assert status == 404 and "no rollout 'ro-nope'" in reply["error"]["message"]
    finally:
        await close_all(agents)
        await ep.aclose()


# -- busy agents, late joiners, canaries, crash windows (review fixes) ---------------------------------------------

async def test_a_busy_agent_waits_and_is_offered_again_after_the_gap(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    ep.rollouts.offer_retry_gap = 0.6
    agents = [await ScriptedAgent.start(ep, "agent-00", COMMIT)]
    agents[0].busy = 2  # two offers answered -32011 agent_busy, then it takes the third
    try:
        OFFERS.clear()
        r = await start_rollout(ep, waves="100%")
        first = await wait_until(lambda: (x := ep.rollouts.describe(r["id"], agents=True))["counts"] == {
            "waiting": 1} and x, what="the busy answer")
        assert first["agents"][0]["detail"].startswith("busy: offered again later (an update is already running")
        assert first["agents"][0]["offered_ms"] is None and first["failure_rate"] == 0
        await wait_until(lambda: ep.rollouts.describe(r["id"])["counts"] == {"committed": 1}, timeout=15,
                         what="the third offer to commit")
        times = [t for t, _ in OFFERS]
        assert len(times) == 3  # no busy loop: one offer per gap
        assert all(b - a >= 0.6 for a, b in zip(times, times[1:])), times
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_an_agent_updating_in_one_rollout_is_not_offered_by_another(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, "agent-00", HANG)]
    try:
        bundle = await start_rollout(ep, waves="100%")
        await wait_until(lambda: agents[0].offers, what="the bundle offer")
        await wait_until(lambda: ep.rollouts.describe(bundle["id"])["counts"] == {"probation": 1})
        host = await start_rollout(ep, kind="host", name="pyagent-host", version="0.2.0", waves="100%")
        await asyncio.sleep(ep.rollouts.tick * 1.5)  # a tick passes: still nothing offered
        held = await rollout(ep, host["id"])
        assert held["counts"] == {"waiting": 1} and len(agents[0].offers) == 1
        assert held["agents"][0]["detail"] == f"busy: rollout {bundle['id']} is updating it; offered when that ends"
        await agents[0].report(agents[0].offers[0], "committed")  # the bundle update ends: the host one starts
        await wait_until(lambda: len(agents[0].offers) == 2, what="the host offer")
        assert agents[0].offers[1]["kind"] == "host" and agents[0].offers[1]["rollout"] == host["id"]
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_late_joiners_do_not_change_the_waves_of_members(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", COMMIT) for i in range(2)]
    try:
        r = ep.rollouts.create({"kind": "bundle", "name": "hello", "version": "2.0.0", "waves": "1%,100%"})
        order = [a["agent_id"] for a in ep.rollouts.describe(r["id"], agents=True)["agents"]]
        canary = next(a for a in agents if a.agent_id == order[0])
        canary.script = HANG  # the canary stays in probation
        await wait_until(lambda: ep.rollouts.describe(r["id"])["counts"] == {"pending": 1, "probation": 1})
        # A new agent whose key sorts before the canary's joins: it goes into the current wave, beside the canary.
        first_key = member_key(r["id"], order[0])
        late_id = next(f"agent-late-{i}" for i in range(1000) if member_key(r["id"], f"agent-late-{i}") < first_key)
        late = await ScriptedAgent.start(ep, late_id, COMMIT)
        agents.append(late)
        await wait_until(lambda: ep.rollouts.describe(r["id"])["counts"].get("committed") == 1, what="the late one")
        await asyncio.sleep(ep.rollouts.tick * 1.5)
        now = await rollout(ep, r["id"])
        waves = {a["agent_id"]: (a["wave"], a["state"]) for a in now["agents"]}
        assert waves == {order[0]: (1, "probation"), late_id: (1, "committed"), order[1]: (2, "pending")}
        assert now["wave"] == 1 and [w["members"] for w in now["wave_progress"]] == [2, 1]
        assert not next(a for a in agents if a.agent_id == order[1]).offers  # the canary still holds wave 1
        await canary.report(canary.offers[0], "committed")
        await wait_state(ep, r["id"], "completed")
        assert (await rollout(ep, r["id"]))["counts"] == {"committed": 3}
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_an_offline_canary_holds_its_wave_until_it_is_judged(tmp_path: Path) -> None:
    ep = await started_with_offline_agents(tmp_path, 2)
    agents: list[ScriptedAgent] = []
    try:
        r = await start_rollout(ep, waves="50%,100%")
        order = [a["agent_id"] for a in (await rollout(ep, r["id"]))["agents"]]
        await asyncio.sleep(ep.rollouts.tick * 1.5)
        held = await rollout(ep, r["id"])
        assert held["state"] == "running" and held["wave"] == 1
        assert held["counts"] == {"pending": 1, "waiting": 1}  # the offline canary did not pass wave 1
        agents.append(await ScriptedAgent.start(ep, order[0], COMMIT))  # the canary connects and commits
        done = await wait_state(ep, r["id"], "completed")
        assert done["counts"] == {"committed": 1, "waiting": 1} and done["wave"] == 2
    finally:
        await close_all(agents)
        await ep.aclose()


async def test_crashes_long_after_a_member_ended_do_not_count(tmp_path: Path) -> None:
    ep = await started(tmp_path)
    ep.rollouts.crash_window = 0.5
    agents = [await ScriptedAgent.start(ep, f"agent-{i:02d}", COMMIT) for i in range(2)]
    try:
        r = await start_rollout(ep, waves="100%", max_crash_rate="10%")
        await wait_state(ep, r["id"], "completed")
        await asyncio.sleep(0.6)  # past the crash window of both members
        await store_crash(ep, agents[0].agent_id)
        await asyncio.sleep(ep.rollouts.tick * 1.5)  # a tick evaluates the gate
        after = await rollout(ep, r["id"])
        assert after["state"] == "completed" and after["crashes"] == 0
        # Within its window, a crash still counts (after a late agent joins and commits, for example).
        ep.rollouts.crash_window = 600
        halted = await wait_state(ep, r["id"], "halted", timeout=5)
        assert "crash rate" in halted["reason"] and halted["crashes"] == 1
    finally:
        await close_all(agents)
        await ep.aclose()


def test_a_database_from_before_member_waves_gets_them_by_member_order(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "endpoint.db", isolation_level=None)
    try:
        db.execute(_OLD_ROLLOUTS)
        db.execute("ALTER TABLE rollouts ADD COLUMN stall_timeout_s REAL NOT NULL DEFAULT 900")
        db.execute("""CREATE TABLE rollout_members (rollout_id TEXT NOT NULL, agent_id TEXT NOT NULL,
            key TEXT NOT NULL, state TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '', offered_ms INTEGER,
            ended_ms INTEGER, updated_ms INTEGER NOT NULL, PRIMARY KEY (rollout_id, agent_id))""")
        db.execute("INSERT INTO rollouts VALUES ('ro-old', 'bundle', 'hello', '2.0.0', '*', '[0.25, 0.5, 1.0]',"
                   " 0.05, 0.05, 'running', '', 1, 1, 1, 1, 900)")
        ids = [f"agent-{i}" for i in range(4)]
        for agent_id in ids:
            db.execute("INSERT INTO rollout_members VALUES ('ro-old', ?, ?, 'pending', '', NULL, NULL, 1)",
                       (agent_id, member_key("ro-old", agent_id)))
        manager = RolloutManager(None, db, UpdateStore(db))  # type: ignore[arg-type]
        order = sorted(ids, key=lambda a: member_key("ro-old", a))
        got = dict(db.execute("SELECT agent_id, wave FROM rollout_members WHERE rollout_id = 'ro-old'").fetchall())
        assert got == {order[0]: 0, order[1]: 1, order[2]: 2, order[3]: 2}
        assert [w["members"] for w in manager.describe("ro-old")["wave_progress"]] == [1, 1, 2]
        RolloutManager(None, db, UpdateStore(db))  # type: ignore[arg-type]  # a second open: nothing to add
    finally:
        db.close()
