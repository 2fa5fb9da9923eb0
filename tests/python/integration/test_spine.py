"""The spine end to end: the real `pyagent-host` binary against the real endpoint over TLS on 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest

from harness import AgentProc, EndpointProc, wait_for

pytestmark = pytest.mark.integration


def error_code(body: dict[str, Any]) -> int:
    assert "error" in body, body
    return int(body["error"]["code"])


def test_handshake_registers_agent(endpoint: EndpointProc, agent: AgentProc) -> None:
    record = endpoint.wait_connected(agent.agent_id)
    assert record["name"] == "agent-1"
    assert record["host_version"] == "0.1.0"
    assert {b["name"] for b in record["bundles"]} == {"hello", "probe"}
    assert "session.up" in agent.log()


def test_heartbeat_latency_recorded(endpoint: EndpointProc, agent: AgentProc) -> None:
    record = wait_for(lambda: (a := endpoint.agent(agent.agent_id)) and a["latency_ms"] is not None and a, 10,
                      "a heartbeat latency in the registry")
    assert 0 < record["latency_ms"] < 1000
    assert record["skew_ms"] is not None


def test_call_with_params(endpoint: EndpointProc, agent: AgentProc) -> None:
    assert endpoint.call(agent.agent_id, "hello.greet", {"name": "world"}) == {"result": "Hello, world!"}
    # by name as well as by id
    assert endpoint.call("agent-1", "hello.greet", {"name": "ünïcode"}) == {"result": "Hello, ünïcode!"}
    facts = endpoint.call(agent.agent_id, "hello.sysinfo")["result"]
    assert facts["hostname"] == socket.gethostname()


def test_error_codes(endpoint: EndpointProc, agent: AgentProc) -> None:
    assert error_code(endpoint.call("no-such-agent", "hello.greet", {"name": "x"})) == -32003
    body = endpoint.call(agent.agent_id, "nosuch.greet", {"name": "x"})
    assert error_code(body) == -32601 and "nosuch" in body["error"]["message"]
    body = endpoint.call(agent.agent_id, "hello.nosuch")
    assert error_code(body) == -32601 and "nosuch" in body["error"]["message"]
    body = endpoint.call(agent.agent_id, "hello.greet", {"nom": "x"})
    assert error_code(body) == -32602 and "nom" in body["error"]["message"]
    body = endpoint.call(agent.agent_id, "probe.fail", {"message": "boom"})
    assert error_code(body) == -32603 and "ValueError" in json.dumps(body["error"])
    # the runtime survived the exception
    assert endpoint.call(agent.agent_id, "hello.greet", {"name": "again"}) == {"result": "Hello, again!"}


def test_concurrent_calls(endpoint: EndpointProc, agent: AgentProc) -> None:
    from concurrent.futures import ThreadPoolExecutor

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: endpoint.call(agent.agent_id, "probe.sleep", {"seconds": 0.5}), range(8)))
    elapsed = time.monotonic() - start
    assert all(r == {"result": 0.5} for r in results)
    # eight 0.5 s sleeps that ran one after another would take 4 s
    assert elapsed < 4, f"calls did not run concurrently ({elapsed:.2f} s)"


def test_worker_stays_lean(endpoint: EndpointProc, agent: AgentProc) -> None:
    modules = endpoint.call(agent.agent_id, "probe.modules")["result"]
    for heavy in ("ssl", "_ssl", "cryptography", "tuf", "urllib3", "securesystemslib", "starlette", "uvicorn"):
        assert heavy not in modules, f"{heavy} is loaded in the worker"
    assert "_pyagent_host" in modules and "asyncio" in modules


def test_wrong_ca_refused(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    other = EndpointProc(tmp_path / "other").start()  # only for its unrelated CA
    other.stop()
    a: AgentProc = make_agent(tmp_path / "a", [endpoint], other.ca, endpoint.agent_token).start(wait=False)
    a.wait_log("certificate verify failed")  # enrollment cannot even start: the endpoint is not trusted
    time.sleep(0.5)
    assert a.alive()
    assert endpoint.agents() == []
    assert not (a.workdir / "state" / "agent.crt").exists()
    assert "session.up" not in a.log()


def test_bad_token_refused(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a: AgentProc = make_agent(tmp_path / "a", [endpoint], endpoint.ca, "not-the-token").start(wait=False)
    assert a.proc is not None
    assert a.proc.wait(20) == 3  # enrollment refused: a clear exit, not a crash
    assert "enrollment refused by the endpoint (code -32000): unauthorized: unknown enrollment token" in a.log()
    assert "event=enroll.refused" in endpoint.log() and "unknown enrollment token" in endpoint.log()
    assert endpoint.agents() == []


def test_sigterm_exits_cleanly(endpoint: EndpointProc, agent: AgentProc) -> None:
    assert agent.proc is not None
    start = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    code = agent.proc.wait(2)
    assert code == 0, agent.log()
    assert time.monotonic() - start < 2
    wait_for(lambda: not endpoint.agent(agent.agent_id)["connected"], 10,  # type: ignore[index]
             "the endpoint to see the agent gone")


def test_endpoint_restart_reconnects(tmp_path: Path, endpoint: EndpointProc, agent: AgentProc) -> None:
    port = endpoint.port
    endpoint.stop(signal.SIGKILL)
    agent.wait_log("session.down")
    endpoint.start(listen=f"127.0.0.1:{port}")
    endpoint.wait_connected(agent.agent_id)
    assert agent.log().count("session.up") >= 2
    assert endpoint.call(agent.agent_id, "hello.greet", {"name": "back"}) == {"result": "Hello, back!"}


def test_two_endpoints_one_killed(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    # A second endpoint of the same deployment: same CA and server certificate.
    second_dir = tmp_path / "endpoint2"
    second_dir.mkdir()
    # The agent enrolls with the first; the second trusts its certificate through the shared CA.
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "operator-token"):
        shutil.copy2(endpoint.state_dir / name, second_dir / name)
    second = EndpointProc(second_dir, heartbeat_interval=0.5).start()
    try:
        a: AgentProc = make_agent(tmp_path / "a", [endpoint, second], endpoint.ca, endpoint.agent_token).start()
        endpoint.wait_connected(a.agent_id)
        second.wait_connected(a.agent_id)
        endpoint.stop(signal.SIGKILL)
        for i in range(5):
            assert second.call(a.agent_id, "hello.greet", {"name": str(i)}) == {"result": f"Hello, {i}!"}
        assert a.alive()
    finally:
        second.stop()


# ---- bad input from the agent's side, to the real endpoint -----------------------------------------------------------


def raw_client(endpoint: EndpointProc) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(endpoint.ca))
    sock = socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1")


def read_reply(conn: ssl.SSLSocket) -> tuple[Any, bool]:
    """The first line the endpoint answered, and whether it then closed the connection."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    closed = False
    try:
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                closed = True
                break
    except (ssl.SSLError, ConnectionError):
        closed = True
    return json.loads(line), closed


@pytest.mark.parametrize("payload,code", [
    (b"{not json\n", -32700),
    (b'{"v":"2","id":1,"method":"handshake.hello","params":{}}\n', -32002),
    (b"x" * (1 << 20) + b"y\n", -32005),
    (b"[1,2,3]\n", -32600),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", -32700),
])
def test_endpoint_refuses_bad_frames(endpoint: EndpointProc, agent: AgentProc, payload: bytes, code: int) -> None:
    with raw_client(endpoint) as conn:
        conn.sendall(payload)
        reply, closed = read_reply(conn)
    assert reply["id"] is None and reply["error"]["code"] == code, reply
    assert closed
    # the endpoint still serves the real agent
    assert endpoint.call(agent.agent_id, "hello.greet", {"name": "still"}) == {"result": "Hello, still!"}


# ---- bad input from the endpoint's side, to the real host ------------------------------------------------------------


@pytest.mark.parametrize("garbage,code", [
    (b"{not json\n", -32700),
    (b'{"v":"9","id":5,"method":"bundle.call","params":{}}\n', -32002),
    (b"z" * ((1 << 20) + 1) + b"\n", -32005),
    (b"[" * 3000 + b"]" * 3000 + b"\n", -32700),
])
def test_host_refuses_bad_frames(tmp_path: Path, endpoint: EndpointProc, make_agent: Any, garbage: bytes,
                                 code: int) -> None:
    from fake_endpoint import FakeEndpoint, FakeSession

    answers: list[Any] = []

    async def misbehave(session: FakeSession) -> None:
        await session.send_raw(garbage)
        answers.append(await session.recv())
        assert await session.closed_by_peer()

    async def behave(session: FakeSession) -> None:
        await session.send({"v": "1", "id": 1, "method": "bundle.call",
                            "params": {"agent": "hello", "method": "greet", "params": {"name": "next"}}})
        answers.append(await session.recv())

    fake = FakeEndpoint(endpoint.state_dir / "server.pem", endpoint.state_dir / "server.key",
                        [misbehave, behave]).start()
    try:
        a: AgentProc = make_agent(tmp_path / "a", [fake.listen], endpoint.ca, "t", extra='auth = "shared-token"').start()
        wait_for(lambda: len(answers) >= 2, 20, "a refusal, then a call answered on the next session")
        refusal, reply = answers[0], answers[1]
        assert refusal["id"] is None and refusal["error"]["code"] == code, refusal
        assert reply["id"] == 1 and reply["result"] == "Hello, next!", reply
        assert a.alive()
        assert "protocol violation" in a.log()
    finally:
        fake.stop()
    assert not fake.errors, fake.errors


def test_host_drops_silent_endpoint(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    """An endpoint that stops answering (no heartbeat replies, nothing at all) is dropped after 1.5 x interval."""
    from fake_endpoint import FakeEndpoint, FakeSession

    async def go_silent(session: FakeSession) -> None:
        assert await session.closed_by_peer(timeout=10)  # reads, never answers

    async def behave(session: FakeSession) -> None:
        await session.closed_by_peer(timeout=3)

    fake = FakeEndpoint(endpoint.state_dir / "server.pem", endpoint.state_dir / "server.key",
                        [go_silent, behave], heartbeat_interval=0.4).start()
    try:
        a: AgentProc = make_agent(tmp_path / "a", [fake.listen], endpoint.ca, "t", extra='auth = "shared-token"').start()
        log = a.wait_log("idle timeout")
        wait_for(lambda: len(fake.sessions) >= 2, 10, "the agent to reconnect after the idle timeout")
        assert "limit 600 ms" in log
        assert a.alive()
    finally:
        fake.stop()


def test_deeply_nested_params_reach_the_bundle(endpoint: EndpointProc, agent: AgentProc) -> None:
    """Nesting the host's parser accepts (< 2048) must decode in the Python runtime too, not kill the call."""
    value: object = "leaf"
    for _ in range(1500):
        value = [value]
    body = endpoint.call(agent.agent_id, "probe.echo", {"value": value}, timeout=20)
    assert body == {"result": value}


def test_latency_known_at_once_with_a_long_interval(tmp_path: Path, make_agent: Any) -> None:
    """The first heartbeat has no round trip to report; the host sends a second at once so the registry has a
    latency within moments of the handshake, not one 30 s interval later."""
    ep = EndpointProc(tmp_path / "ep30", heartbeat_interval=30).start()
    try:
        a: AgentProc = make_agent(tmp_path / "a", [ep], ep.ca, ep.agent_token).start()
        ep.wait_connected(a.agent_id)
        record = wait_for(lambda: (r := ep.agent(a.agent_id)) and r["latency_ms"] is not None and r, 5,
                          "a heartbeat latency well before the 30 s interval")
        assert 0 < record["latency_ms"] < 1000
    finally:
        ep.stop()
