"""Security, second part (issue 3): certificate renewal over the live session, the agent's local allow-list, and the
endpoint's per-agent limits (request rate, calls in flight, connections) while a real agent keeps working.

Real `pyagent-host`, real endpoint, real TLS, 127.0.0.1 only.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import ssl
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness import AgentProc, EndpointProc, host_binary, wait_for

pytestmark = pytest.mark.integration

CERT_DAYS = 0.0002  # 17.28 s: renewal at ~11.5 s


def enrolled(endpoint: EndpointProc, make_agent: Any, workdir: Path, extra: str = "",
             name: str = "agent-1") -> AgentProc:
    a: AgentProc = make_agent(workdir, [endpoint], endpoint.ca, endpoint.agent_token, name=name, extra=extra).start()
    endpoint.wait_connected(a.agent_id)
    return a


def read_info(state: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads((state / "agent.crt.json").read_text())
    return info


# -- renewal ---------------------------------------------------------------------------------------------------------

def test_renewal_over_the_live_session(tmp_path: Path, make_agent: Any) -> None:
    endpoint = EndpointProc(tmp_path / "ep", heartbeat_interval=0.5, extra_args=["--cert-days", str(CERT_DAYS)])
    endpoint.start()
    try:
        a = enrolled(endpoint, make_agent, tmp_path / "a")
        state = a.workdir / "state"
        first = read_info(state)
        lifetime_ms = first["not_after"] - first["received"]
        assert 15_000 < lifetime_ms < 18_000, first
        assert endpoint.agent(a.agent_id)["cert_not_after"] == first["not_after"]  # type: ignore[index]
        key0, crt0 = (state / "agent.key").read_bytes(), (state / "agent.crt").read_bytes()

        a.wait_log("event=cert.renewed", timeout=lifetime_ms / 1000 + 5)
        renewed_after_ms = time.time() * 1000 - first["received"]
        assert renewed_after_ms >= 0.6 * lifetime_ms, (renewed_after_ms, lifetime_ms)  # at ~2/3, not at once
        second = read_info(state)
        assert second["serial"] != first["serial"] and second["not_after"] > first["not_after"]
        assert (state / "agent.key").read_bytes() != key0 and (state / "agent.crt").read_bytes() != crt0
        assert stat.S_IMODE((state / "agent.key").stat().st_mode) == 0o600
        assert not (state / "agent.key.next").exists()
        # The registry records the certificate it issued last.
        wait_for(lambda: endpoint.agent(a.agent_id)["cert_not_after"] == read_info(state)["not_after"],  # type: ignore[index]
                 10, "the registry to show the renewed certificate")
        assert "event=cert.renewed" in endpoint.log()

        # The session survives: no reconnect, calls keep working, even after the first certificate has expired.
        wait_for(lambda: time.time() * 1000 > first["not_after"] + 1000, 30, "the first certificate to expire")
        assert endpoint.call(a.agent_id, "hello.greet", {"name": "renewed"}) == {"result": "Hello, renewed!"}
        assert a.log().count("logger=pyagent.runtime event=session.up") == 1, a.log()
        assert f"event=session.closed agent={a.agent_id}" not in endpoint.log()

        # A new connection must present the new certificate (the first one has expired: TLS would refuse it).
        listen = endpoint.listen
        endpoint.stop()
        endpoint.start(listen=listen)
        endpoint.wait_connected(a.agent_id)
        assert endpoint.call(a.agent_id, "hello.greet", {"name": "again"}) == {"result": "Hello, again!"}
        assert a.log().count("logger=pyagent.runtime event=session.up") == 2
        log = endpoint.log()
        assert "certificate has expired" not in log and "event=tls.failed" not in log, log
        assert a.alive()
    finally:
        endpoint.stop()


def test_renewal_install_checks_the_certificate(tmp_path: Path, make_agent: Any) -> None:
    """The install step refuses a certificate that is not for the new key or not for this agent."""
    endpoint = EndpointProc(tmp_path / "ep", heartbeat_interval=0.5).start()
    try:
        a = enrolled(endpoint, make_agent, tmp_path / "a")
        a.stop()
        state = a.workdir / "state"
        crt0 = (state / "agent.crt").read_bytes()
        host = host_binary()
        new_key = subprocess.run([host, "enroll", "--new-key", "--state-dir", str(state)], capture_output=True,
                                 text=True, timeout=60)
        assert new_key.returncode == 0 and "BEGIN CERTIFICATE REQUEST" in new_key.stdout, new_key.stderr
        # The current certificate is for the old key: --install must refuse it and leave the files alone.
        bad = subprocess.run([host, "enroll", "--install", "--state-dir", str(state)], capture_output=True, text=True,
                             input=json.dumps({"agent_id": a.agent_id, "certificate": crt0.decode()}), timeout=60)
        assert bad.returncode == 1 and "certificate for another key" in bad.stderr, bad.stderr
        other = subprocess.run([host, "enroll", "--install", "--state-dir", str(state)], capture_output=True,
                               text=True, input=json.dumps({"agent_id": "someone-else", "certificate": "x"}),
                               timeout=60)
        assert other.returncode == 1 and "is for agent someone-else" in other.stderr, other.stderr
        assert (state / "agent.crt").read_bytes() == crt0
    finally:
        endpoint.stop()


# -- the agent's local allow-list ------------------------------------------------------------------------------------

def test_allow_list_refusals_logged_on_both_sides(tmp_path: Path, make_agent: Any) -> None:
    endpoint = EndpointProc(tmp_path / "ep", heartbeat_interval=0.5).start()
    try:
        locked = enrolled(endpoint, make_agent, tmp_path / "locked", name="locked",
                          extra="[allow]\ncall = false\n")
        default = enrolled(endpoint, make_agent, tmp_path / "default", name="default")
        # call = false: no bundle method runs; reads still work.
        refused = endpoint.call(locked.agent_id, "hello.greet", {"name": "x"})
        assert refused["error"]["code"] == -32007, refused
        assert refused["error"]["data"] == {"kind": "call", "method": "bundle.call"}
        assert "allow-list refuses bundle.call (kind 'call')" in refused["error"]["message"]
        # The defaults: risky kinds are off, calls on.
        assert endpoint.call(default.agent_id, "hello.greet", {"name": "y"}) == {"result": "Hello, y!"}
        for method_name, params, kind in (("agent.stop", {}, "lifecycle"), ("agent.restart", {}, "lifecycle"),
                                          ("agent.config.set", {"agent": "hello", "values": {}}, "config")):
            reply = endpoint.call(default.agent_id, method_name, params)
            assert reply["error"]["code"] == -32007 and reply["error"]["data"]["kind"] == kind, reply
        status = endpoint.call(default.agent_id, "agent.status", {"agent": "hello"})
        assert status["result"]["state"] == "running", status
        # Logged on the agent and on the endpoint; nobody stopped.
        locked.wait_log("event=call.not_allowed")
        assert "kind=call" in locked.log()
        default.wait_log("event=call.not_allowed")
        assert default.log().count("event=call.not_allowed") == 3
        log = endpoint.log()
        assert f"event=call.not_allowed agent={locked.agent_id}" in log and "method=agent.stop" in log
        assert locked.alive() and default.alive()
        assert endpoint.call(default.agent_id, "hello.greet", {"name": "z"}) == {"result": "Hello, z!"}
    finally:
        endpoint.stop()


# -- limits ----------------------------------------------------------------------------------------------------------

def enroll_identity(endpoint: EndpointProc, state: Path) -> str:
    """A second enrolled identity (key + certificate) for a hand-made client."""
    result = subprocess.run([host_binary(), "enroll", "--endpoint", endpoint.listen, "--ca", str(endpoint.ca),
                             "--token", endpoint.create_token(uses=1), "--state-dir", str(state), "--name", "raw"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return (state / "agent-id").read_text().strip()


def mtls_session(endpoint: EndpointProc, state: Path, agent_id: str) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(endpoint.ca))
    ctx.load_cert_chain(str(state / "agent.crt"), str(state / "agent.key"))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", endpoint.port), timeout=10),
                           server_hostname="127.0.0.1")
    sock.sendall(json.dumps({"v": "1", "id": 1, "method": "handshake.hello", "params": {
        "agent_id": agent_id, "name": "raw", "host": {"version": "x", "python": "3"}}}).encode() + b"\n")
    replies = read_replies(sock, {1})
    assert "result" in replies[1], replies
    return sock


def read_replies(sock: ssl.SSLSocket, ids: set[int], timeout: float = 10) -> dict[int, dict[str, Any]]:
    """Read until every id in `ids` has its response (heartbeats from the endpoint are skipped)."""
    out: dict[int, dict[str, Any]] = {}
    buf = b""
    deadline = time.monotonic() + timeout
    while set(out) != ids:
        assert time.monotonic() < deadline, f"no replies for {sorted(ids - set(out))}"
        chunk = sock.recv(65536)
        assert chunk, f"closed by the endpoint; got {sorted(out)}"
        buf += chunk
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            msg = json.loads(line)
            if "method" not in msg and msg.get("id") in ids:
                out[msg["id"]] = msg
    return out


def test_per_agent_request_rate(tmp_path: Path, make_agent: Any) -> None:
    endpoint = EndpointProc(tmp_path / "ep", heartbeat_interval=2,
                            extra_args=["--rate", "5", "--rate-burst", "5"]).start()
    try:
        a = enrolled(endpoint, make_agent, tmp_path / "a")
        state = tmp_path / "raw"
        raw_id = enroll_identity(endpoint, state)
        sock = mtls_session(endpoint, state, raw_id)
        ids = set(range(2, 22))
        sock.sendall(b"".join(json.dumps({"v": "1", "id": i, "method": "raw.noise", "params": {}}).encode() + b"\n"
                              for i in sorted(ids)))
        replies = read_replies(sock, ids)
        limited = [r for r in replies.values() if r["error"]["code"] == -32001]
        served = [r for r in replies.values() if r["error"]["code"] == -32601]
        assert 5 <= len(served) <= 7 and len(limited) == 20 - len(served), replies  # the burst, then refusals
        for r in limited:
            assert 0 < r["error"]["data"]["retry_after"] <= 1, r
            assert f"too many requests from agent {raw_id}" in r["error"]["message"]
        # The session stays up and a request is served again once the bucket refills.
        time.sleep(max(r["error"]["data"]["retry_after"] for r in limited) + 0.05)
        sock.sendall(json.dumps({"v": "1", "id": 99, "method": "raw.noise", "params": {}}).encode() + b"\n")
        assert read_replies(sock, {99})[99]["error"]["code"] == -32601
        sock.close()
        # Another agent's bucket is its own: the real agent keeps working.
        for i in range(10):
            assert endpoint.call(a.agent_id, "hello.greet", {"name": str(i)}) == {"result": f"Hello, {i}!"}
        assert endpoint.api("GET", "/api/v1/metrics")[1]["rate_limited"] == len(limited)
        assert a.alive()
    finally:
        endpoint.stop()


def test_calls_in_flight_cap(tmp_path: Path, make_agent: Any) -> None:
    endpoint = EndpointProc(tmp_path / "ep", heartbeat_interval=0.5, extra_args=["--max-in-flight", "2"]).start()
    try:
        a = enrolled(endpoint, make_agent, tmp_path / "a")
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(endpoint.call, a.agent_id, "probe.sleep", {"seconds": 1.5}) for _ in range(2)]
            wait_for(lambda: endpoint.agent(a.agent_id), 5, "the agent record")
            time.sleep(0.3)  # both slow calls are in flight
            extra = [pool.submit(endpoint.call, a.agent_id, "probe.echo", {"value": i}) for i in range(3)]
            refused = [f.result(timeout=30) for f in extra]
            done = [f.result(timeout=30) for f in slow]
        assert done == [{"result": 1.5}, {"result": 1.5}]
        for r in refused:
            assert r["error"]["code"] == -32001 and r["error"]["data"] == {"retry_after": 1}, r
            assert "2 calls already in flight" in r["error"]["message"]
        assert endpoint.api("GET", "/api/v1/metrics")[1]["in_flight_refused"] == 3
        assert endpoint.call(a.agent_id, "probe.echo", {"value": "after"}) == {"result": "after"}
        assert a.alive()
    finally:
        endpoint.stop()


def test_max_connections(tmp_path: Path, make_agent: Any) -> None:
    endpoint = EndpointProc(tmp_path / "ep", heartbeat_interval=0.5,
                            extra_args=["--max-connections", "3", "--tls-handshake-timeout", "5"]).start()
    try:
        a = enrolled(endpoint, make_agent, tmp_path / "a")  # connection 1
        idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(2)]
        time.sleep(0.3)
        for _ in range(3):  # over the limit: closed at accept
            with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as extra:
                extra.settimeout(5)
                try:
                    assert extra.recv(1) == b""
                except ConnectionResetError:
                    pass
        metrics = endpoint.api("GET", "/api/v1/metrics")[1]
        assert metrics["connections_refused"] == 3 and metrics["connections_open"] == 3, metrics
        assert "max_connections (3) reached" in endpoint.log()
        assert endpoint.call(a.agent_id, "hello.greet", {"name": "busy"}) == {"result": "Hello, busy!"}
        for sock in idle:
            sock.close()
        # Freed slots are usable again: a TLS handshake completes.
        wait_for(lambda: endpoint.api("GET", "/api/v1/metrics")[1]["connections_open"] == 1, 10,
                 "the idle connections to be counted closed")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(endpoint.ca))
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", endpoint.port), timeout=5),
                             server_hostname="127.0.0.1") as tls:
            assert tls.version() is not None
        assert endpoint.call(a.agent_id, "hello.greet", {"name": "end"}) == {"result": "Hello, end!"}
        assert a.alive()
    finally:
        endpoint.stop()
