"""Discovery (`registry.discover`) and agent-to-agent calls (`agent.call`) through the real host and endpoint, under
the endpoint's agent-call policy (issue 6, item 7)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import TEST_BUNDLES, AgentProc, EndpointProc, wait_for

pytestmark = pytest.mark.integration

PEER = TEST_BUNDLES / "peer"
TICKER = TEST_BUNDLES / "ticker"
NOT_ALLOWED = -32007


def start(make_agent: Any, ep: EndpointProc, workdir: Path, name: str, group: str | None,
          bundles: list[Path] | None = None, extra: str = "") -> AgentProc:
    labels = f'labels = {{ group = "{group}" }}\n' if group is not None else ""
    agent: AgentProc = make_agent(workdir, [ep], ep.ca, ep.agent_token, bundles=bundles or [PEER], name=name,
                                  extra=labels + extra)
    agent.start()
    ep.wait_connected(agent.agent_id)
    return agent


def result(ep: EndpointProc, agent: str, method: str, /, **params: Any) -> Any:
    """The result of an operator call to `agent` (asserting it succeeded)."""
    status, body = ep.api("POST", "/api/v1/call", {"target": agent, "method": method, "params": params,
                                                  "timeout": 15})
    assert status == 200 and "result" in body, body
    return body["result"]


@pytest.fixture
def any_endpoint(tmp_path: Path) -> Iterator[EndpointProc]:
    ep = EndpointProc(tmp_path / "endpoint-any", heartbeat_interval=0.5,
                      extra_args=["--agent-call-policy", "any"]).start()
    yield ep
    ep.stop()


def test_discover_and_calls_same_group(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a1 = start(make_agent, endpoint, tmp_path / "a1", "disc-a1", "a")
    a2 = start(make_agent, endpoint, tmp_path / "a2", "disc-a2", "a")
    b1 = start(make_agent, endpoint, tmp_path / "b1", "disc-b1", "b")
    n1 = start(make_agent, endpoint, tmp_path / "n1", "disc-n1", None, bundles=[PEER, TICKER])

    # Discovery: exact, case-insensitive; how_many caps the list (default 1); all=true gives every match.
    found = result(endpoint, "disc-a1", "peer.find", capability="LOOKUP", how_many=2)
    assert len(found) == 2
    everyone = result(endpoint, "disc-a1", "peer.find", capability="lookup", all=True)
    assert [f["name"] for f in everyone] == ["disc-a1", "disc-a2", "disc-b1", "disc-n1"]
    assert all(f["objects"] == ["peer"] and f["connected"] for f in everyone)
    assert everyone[0]["agent_id"] == a1.agent_id and everyone[0]["labels"] == {"group": "a"}
    assert len(result(endpoint, "disc-a1", "peer.find", capability="Lookup")) == 1
    assert result(endpoint, "disc-a1", "peer.find", capability="look", all=True) == []
    ticking = result(endpoint, "disc-a1", "peer.find", capability="ticking", all=True)
    assert [(f["name"], f["objects"]) for f in ticking] == [("disc-n1", ["ticker"])]
    # A bad argument is refused by the endpoint, naming the field.
    status, body = endpoint.api("POST", "/api/v1/call", {"target": "disc-a1", "method": "peer.find",
                                                         "params": {"capability": "x", "how_many": 0}})
    assert body["error"]["code"] == -32603 and "'how_many' must be an integer from 1" in body["error"]["message"]

    # Same group: allowed; the call really runs on the callee.
    assert result(endpoint, "disc-a1", "peer.ask", target="disc-a2", text="hi") == {"result": "peer: hi"}
    assert result(endpoint, "disc-a1", "peer.ask", target=a1.agent_id, text="me") == {"result": "peer: me"}
    # Another group: refused with not_allowed, logged on the endpoint.
    denied = result(endpoint, "disc-a1", "peer.ask", target="disc-b1", text="hi")
    assert denied["error"]["code"] == NOT_ALLOWED
    assert "is in group 'b', not in the caller's group 'a'" in denied["error"]["message"]
    log = wait_for(lambda: "agent_call.denied" in endpoint.log() and endpoint.log(), 10, "the denial logged")
    assert f"caller={a1.agent_id}" in log and "target=disc-b1" in log and "policy=same-group" in log
    # No group: only itself.
    alone = result(endpoint, "disc-n1", "peer.ask", target="disc-a1", text="hi")
    assert alone["error"]["code"] == NOT_ALLOWED and "has no 'group' label" in alone["error"]["message"]
    # Unknown target.
    assert result(endpoint, "disc-a1", "peer.ask", target="nobody", text="x")["error"]["code"] == -32003

    # A selector fans out: per-target results, refused ones reported as such.
    per_target = result(endpoint, "disc-a1", "peer.ask", target="capability:lookup", text="all")["result"]
    assert set(per_target) == {a1.agent_id, a2.agent_id, b1.agent_id, n1.agent_id}
    assert per_target[a1.agent_id] == {"result": "peer: all"} and per_target[a2.agent_id] == {"result": "peer: all"}
    assert per_target[b1.agent_id]["error"]["code"] == NOT_ALLOWED
    assert per_target[n1.agent_id]["error"]["code"] == NOT_ALLOWED
    group = result(endpoint, "disc-a1", "peer.ask", target="group:a", text="g")["result"]
    assert group == {a1.agent_id: {"result": "peer: g"}, a2.agent_id: {"result": "peer: g"}}

    # Disconnected agents are never discovered.
    b1.stop()
    wait_for(lambda: not (endpoint.agent(b1.agent_id) or {}).get("connected", True), 15, "b1 disconnected")
    names = [f["name"] for f in result(endpoint, "disc-a1", "peer.find", capability="lookup", all=True)]
    assert names == ["disc-a1", "disc-a2", "disc-n1"]


def test_policy_any_and_callee_allow_list(tmp_path: Path, any_endpoint: EndpointProc, make_agent: Any) -> None:
    start(make_agent, any_endpoint, tmp_path / "a1", "any-a1", "a")
    start(make_agent, any_endpoint, tmp_path / "b1", "any-b1", "b")
    start(make_agent, any_endpoint, tmp_path / "n1", "any-n1", None)
    locked = start(make_agent, any_endpoint, tmp_path / "l1", "any-locked", "a", extra="[allow]\ncall = false\n")

    assert result(any_endpoint, "any-a1", "peer.ask", target="any-b1", text="x") == {"result": "peer: x"}
    assert result(any_endpoint, "any-n1", "peer.ask", target="any-a1", text="y") == {"result": "peer: y"}
    # The policy lets it through; the callee's own allow-list still refuses (and logs) it.
    refused = result(any_endpoint, "any-a1", "peer.ask", target="any-locked", text="z")
    assert refused["error"]["code"] == NOT_ALLOWED and "kind 'call'" in refused["error"]["message"]
    locked.wait_log("event=call.not_allowed")
    assert "agent_call.denied" not in any_endpoint.log()
