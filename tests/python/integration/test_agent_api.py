"""The agent API through the real host and endpoint: interface at handshake, events, control actions, fan-out."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import BUNDLES, TEST_BUNDLES, AgentProc, EndpointProc, wait_for

pytestmark = pytest.mark.integration

TICKER = TEST_BUNDLES / "ticker"
ALLOW_ALL = "[allow]\nlifecycle = true\nconfig = true\n"


def cli(ep: EndpointProc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyagent.cli", *args, "--state-dir", str(ep.state_dir)],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def events(ep: EndpointProc, query: str) -> list[dict[str, Any]]:
    status, body = ep.api("GET", "/api/v1/events?" + query)
    assert status == 200, body
    return list(body["events"])


def start_agent(make_agent: Any, ep: EndpointProc, workdir: Path, name: str, bundles: list[Path],
                extra: str = "") -> AgentProc:
    agent: AgentProc = make_agent(workdir, [ep], ep.ca, ep.agent_token, bundles=bundles, name=name, extra=extra)
    agent.start()
    ep.wait_connected(agent.agent_id)
    return agent


def test_interface_published_and_described(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    agent = start_agent(make_agent, endpoint, tmp_path / "a", "desc-1", [BUNDLES / "hello", TICKER])
    record = endpoint.agent(agent.agent_id)
    assert record is not None and record["capabilities"] == ["Ticking", "greeting"]

    status, body = endpoint.api("GET", f"/api/v1/agents/{agent.agent_id}/interface")
    assert status == 200 and set(body["agents"]) == {"hello", "ticker"}
    greet = body["agents"]["hello"]["methods"]["greet"]
    assert greet["params"]["properties"]["name"]["type"] == "string" and greet["params"]["required"] == ["name"]
    assert endpoint.api("GET", "/api/v1/agents/nobody/interface")[0] == 404

    out = cli(endpoint, "describe", "desc-1")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "hello.greet(name: str) -> str" in text
    assert "Return a greeting for `name`." in text
    assert 'greeting: str = "Hello"' in text and "the word greet() starts with" in text
    assert "ticker.burst(count: int, tag: str (optional)) -> int  [sync]" in text
    assert "interval: float = 0.2" in text and ">= 0.05" in text
    assert "capabilities: Ticking" in text

    out = cli(endpoint, "describe", agent.agent_id, "hello", "--json")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    methods = schema["properties"]["hello"]["properties"]["methods"]["properties"]
    assert methods["greet"]["properties"]["params"]["properties"]["name"] == {"type": "string"}
    assert schema["properties"]["hello"]["properties"]["config"]["properties"]["greeting"]["maxLength"] == 40
    assert set(schema["properties"]) == {"hello"}

    out = cli(endpoint, "describe", "desc-1", "nosuch")
    assert out.returncode == 1 and "no object 'nosuch'" in out.stderr


def test_events_follow_outage_and_restart(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    agent = start_agent(make_agent, endpoint, tmp_path / "a", "ev-1", [TICKER],
                        extra="[agents.ticker]\ninterval = 0.1\n")
    # Live follow, bounded by --count and --timeout, selecting by agent name and event name.
    follower = subprocess.Popen(
        [sys.executable, "-m", "pyagent.cli", "events", "-f", "--select", "ev-1", "--event", "burst", "--last", "0",
         "--count", "5", "--timeout", "30", "--json", "--state-dir", str(endpoint.state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: endpoint.api("GET", "/api/v1/metrics")[1]["event_followers"] == 1, 20,
                 "the follower to attach")
        assert endpoint.call("ev-1", "ticker.burst", {"count": 5, "tag": "live"}) == {"result": 5}
        out, err = follower.communicate(timeout=40)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    assert [(e["event"], e["data"]) for e in got] == [("burst", {"i": i, "tag": "live"}) for i in range(5)]
    assert all(e["agent_id"] == agent.agent_id and e["name"] == "ev-1" and e["object"] == "ticker" for e in got)

    # The endpoint goes away; ticks go on into the outbox; the worker is restarted meanwhile.
    port = endpoint.port
    before = max(e["seq"] for e in events(endpoint, f"select={agent.agent_id}&last=10000"))
    endpoint.stop()
    time.sleep(1.0)
    assert agent.stop() == 0
    agent.start()
    time.sleep(1.0)
    endpoint.start(listen=f"127.0.0.1:{port}")
    endpoint.wait_connected(agent.agent_id)
    # Everything emitted during the outage arrives, and ticking goes on after it.
    stored = wait_for(lambda: (evs := events(endpoint, f"select={agent.agent_id}&last=10000"))
                      and max(e["seq"] for e in evs) > before + 25 and evs, 20, "the outbox to drain")
    seqs = [e["seq"] for e in stored]
    assert len(seqs) == len(set(seqs)), "an event was stored twice"
    assert sorted(seqs) == list(range(1, max(seqs) + 1)), "an event was lost"
    assert seqs == sorted(seqs)
    metrics = endpoint.api("GET", "/api/v1/metrics")[1]
    assert metrics["events_dropped_by_agents"] == 0

    # Text output of the stored events.
    out = cli(endpoint, "events", "--select", "ev-1", "--event", "burst", "--last", "100")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("ev-1  ticker.burst") == 5
    assert cli(endpoint, "events", "--select", "bad=").returncode == 1


def test_control_actions(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    agent = start_agent(make_agent, endpoint, tmp_path / "a", "ctl-1", [BUNDLES / "hello", TICKER],
                        extra=ALLOW_ALL + "[agents.ticker]\ninterval = 0.1\n")
    ticks = lambda: len(events(endpoint, f"select={agent.agent_id}&event=tick&last=10000"))  # noqa: E731
    wait_for(lambda: ticks() >= 3, 20, "ticks")

    out = cli(endpoint, "agent", "pause", "ctl-1", "ticker")
    assert out.returncode == 0 and "ticker: paused" in out.stdout, out.stderr
    body = endpoint.call("ctl-1", "ticker.ping")
    assert body["error"]["code"] == -32006 and body["error"]["data"]["state"] == "paused"
    assert endpoint.call("ctl-1", "hello.greet", {"name": "x"}) == {"result": "Hello, x!"}  # other objects run
    out = cli(endpoint, "agent", "status", "ctl-1", "ticker", "--json")
    status = json.loads(out.stdout)["result"]
    assert status["state"] == "paused" and not status["periodic"][0]["running"]
    time.sleep(0.5)  # a tick already in the outbox may still arrive
    paused_ticks = ticks()
    time.sleep(1.0)
    assert ticks() == paused_ticks, "periodic tasks ran while paused"

    out = cli(endpoint, "agent", "resume", "ctl-1", "ticker")
    assert out.returncode == 0 and "ticker: running" in out.stdout
    assert endpoint.call("ctl-1", "ticker.ping") == {"result": "pong"}
    wait_for(lambda: ticks() > paused_ticks + 2, 20, "ticks after resume")

    # Status of every object when OBJECT is left out.
    out = cli(endpoint, "agent", "status", "ctl-1")
    assert out.returncode == 0 and "hello: running" in out.stdout and "ticker: running" in out.stdout

    # Config: a bad value names the field and keeps the old config; a good one applies.
    out = cli(endpoint, "agent", "config", "ctl-1", "ticker", "set", "interval=0.01", "label=ok")
    assert out.returncode == 1 and "'interval'" in out.stderr and "-32602" in out.stderr
    out = cli(endpoint, "agent", "config", "ctl-1", "ticker", "get")
    assert out.returncode == 0 and "interval = 0.1" in out.stdout and 'label = "t"' in out.stdout
    out = cli(endpoint, "agent", "config", "ctl-1", "ticker", "set", "label=new")
    assert out.returncode == 0 and 'label = "new"' in out.stdout, out.stderr
    wait_for(lambda: events(endpoint, f"select={agent.agent_id}&event=tick&last=1")[-1]["data"]["label"] == "new",
             10, "a tick with the new label")

    # Restart exits 75 ("restart me"), stop exits 0.
    out = cli(endpoint, "agent", "restart", "ctl-1")
    assert out.returncode == 0 and "restarting" in out.stdout, out.stderr
    assert agent.proc is not None and agent.proc.wait(15) == 75
    agent.start()
    endpoint.wait_connected(agent.agent_id)
    out = cli(endpoint, "agent", "stop", "ctl-1", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["result"]["exit_code"] == 0
    assert agent.proc is not None and agent.proc.wait(15) == 0


LABELS = [
    ("fan-0", {"env": "prod", "role": "web", "group": "blue"}),
    ("fan-1", {"env": "prod", "role": "web", "group": "blue"}),
    ("fan-2", {"env": "prod", "role": "db", "group": "red"}),
    ("fan-3", {"env": "dev", "role": "web", "group": "red"}),
    ("fan-4", {"env": "prod", "role": "web", "group": "blue"}),  # stopped before the calls
]


def test_selectors_and_fanout(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    agents: dict[str, AgentProc] = {}
    for name, labels in LABELS:
        extra = "[labels]\n" + "".join(f'{k} = "{v}"\n' for k, v in labels.items())
        agent: AgentProc = make_agent(tmp_path / name, [endpoint], endpoint.ca, endpoint.agent_token,
                                      bundles=[BUNDLES / "hello"], name=name, extra=extra)
        agents[name] = agent.start()
    for agent in agents.values():
        endpoint.wait_connected(agent.agent_id)
    ids = {name: a.agent_id for name, a in agents.items()}
    agents["fan-4"].stop()
    wait_for(lambda: not endpoint.agent(ids["fan-4"])["connected"], 10, "fan-4 to be disconnected")  # type: ignore[index]

    def fan(target: str, **extra: Any) -> dict[str, Any]:
        status, body = endpoint.api("POST", "/api/v1/call", {"target": target, "method": "hello.greet",
                                                             "params": {"name": "all"}, "timeout": 10, **extra})
        assert status == 200, body
        return dict(body["results"])

    results = fan("env=prod,role=web")
    assert set(results) == {ids["fan-0"], ids["fan-1"], ids["fan-4"]}
    assert results[ids["fan-0"]] == results[ids["fan-1"]] == {"result": "Hello, all!"}
    assert results[ids["fan-4"]]["error"]["code"] == -32003
    assert "not connected" in results[ids["fan-4"]]["error"]["message"]

    assert set(fan("group:red")) == {ids["fan-2"], ids["fan-3"]}
    results = fan("capability:GREETING", concurrency=1)
    assert set(results) == set(ids.values())
    assert sum("result" in r for r in results.values()) == 4
    assert set(fan("*")) == set(ids.values())
    # The machine's host name is every agent's here: a plain target matching several agents fans out too.
    assert set(fan(socket.gethostname())) == set(ids.values())
    assert fan("group:nobody") == {}
    # One agent by id or name keeps the single-result form.
    assert endpoint.call("fan-2", "hello.greet", {"name": "one"}) == {"result": "Hello, one!"}
    status, body = endpoint.api("POST", "/api/v1/call", {"target": "a=", "method": "hello.greet"})
    assert status == 200 and body["error"]["code"] == -32602 and "bad label selector" in body["error"]["message"]
    status, body = endpoint.api("POST", "/api/v1/call", {"target": "*", "method": "hello.greet", "concurrency": 0})
    assert status == 400 and "concurrency" in body["error"]["message"]

    # Control actions fan out too.
    status, body = endpoint.api("POST", "/api/v1/call", {"target": "group:red", "method": "agent.status",
                                                         "params": {"agent": "hello"}})
    assert {r["result"]["state"] for r in body["results"].values()} == {"running"}

    out = cli(endpoint, "call", "env=prod,role=web", "hello.greet", "name=cli")
    assert out.returncode == 1, out.stderr
    assert f"{ids['fan-0']}  ok     Hello, cli!" in out.stdout
    assert f"{ids['fan-4']}  ERROR" in out.stdout and "failed on 1 of 3 agents" in out.stderr
    out = cli(endpoint, "call", "group:red", "hello.greet", "name=cli", "--json")
    assert out.returncode == 0, out.stderr
    assert {r["result"] for r in json.loads(out.stdout)["results"].values()} == {"Hello, cli!"}
