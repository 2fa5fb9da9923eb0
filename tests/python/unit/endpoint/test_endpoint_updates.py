"""Per-agent update state from `update.state` events, and the policy store (pins, opt-out)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from fakeagent import endpoint_config
from rolloutagents import COMMIT, ScriptedAgent, api, close_all, wait_until

from pyagent.endpoint import Endpoint
from pyagent.endpoint._updates import Policy, UpdateStore, parse_state_event


def test_state_event_parsing_names_the_bad_field() -> None:
    good = {"kind": "bundle", "name": "hello", "version": "1.2.0", "state": "downloading", "detail": "",
            "rollout": None, "progress": {"bytes": 5, "total": 10}}
    report = parse_state_event(good)
    assert (report.state, report.rollout, report.progress) == ("downloading", None, {"bytes": 5, "total": 10})
    for change, words in [({"kind": "pkg"}, "kind must be bundle or host"), ({"state": "done"}, "'state' must be"),
                          ({"version": ""}, "'version'"), ({"name": "a/b"}, "bad bundle name"),
                          ({"kind": "host"}, "'pyagent-host'"), ({"progress": {"bytes": "1"}}, "'progress'"),
                          ({"rollout": 5}, "'rollout'"), ({"detail": 3}, "'detail'")]:
        with pytest.raises(ValueError, match=words):
            parse_state_event({**good, **change})
    with pytest.raises(ValueError, match="object"):
        parse_state_event([1])


def test_policy_store() -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    store = UpdateStore(db)
    assert store.policy("a") == Policy()
    store.pin("a", "bundle", "hello", "1.0.0")
    store.pin("a", "host", "pyagent-host", "0.1.0")
    policy = store.policy("a")
    assert policy.excludes("bundle", "hello", "2.0.0") == "the agent is pinned to hello 1.0.0"
    assert policy.excludes("bundle", "hello", "1.0.0") is None and policy.excludes("bundle", "other", "9") is None
    assert store.unpin("a", "host")[1] == 1 and store.policy("a").pins == {"bundle:hello": "1.0.0"}
    store.set_opt_out("a", True)
    assert store.policy("a").excludes("bundle", "x", "1") == "the agent opted out of updates"
    store.set_opt_out("a", False)
    assert store.unpin("a")[1] == 1
    assert db.execute("SELECT COUNT(*) FROM agent_update_policy").fetchone()[0] == 0  # nothing left: no row


async def test_update_state_events_feed_the_per_agent_state(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        agent = await ScriptedAgent.start(ep, "agent-1", COMMIT)
        try:
            target = {"kind": "bundle", "name": "hello", "version": "1.2.0", "rollout": None}
            assert "result" in await agent.report(target, "downloading", progress={"bytes": 50, "total": 200})

            async def states() -> list[dict[str, Any]]:
                status, body = await api(ep, "GET", "/api/v1/updates")
                assert status == 200
                return list(body["updates"])

            got = await wait_until(states, what="the state")
            assert got[0]["state"] == "downloading" and got[0]["progress"] == {"bytes": 50, "total": 200}
            assert got[0]["agent_name"] == "agent-1"
            # A malformed event is stored as an event but changes no state; the batch is still acknowledged.
            reply = await agent.report({**target, "kind": "pkg"}, "committed")
            assert reply["result"] == {"acked": agent.seq}
            await agent.report(target, "committed")
            await wait_until(lambda: ep.rollouts.updates.states("agent-1")[0]["state"] == "committed")
            assert len(ep.rollouts.updates.states()) == 1
            status, body = await api(ep, "GET", "/api/v1/updates?agent=nobody")
            assert status == 404 and "nobody" in body["error"]["message"]
        finally:
            await close_all([agent])
