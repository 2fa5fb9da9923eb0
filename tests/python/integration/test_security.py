"""Enrollment, mutual TLS, revocation, operator scopes and hostile connections, with the real `pyagent-host`, the
real endpoint and real TLS on 127.0.0.1 (issue 3's Tests list)."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness import AgentProc, EndpointProc, host_binary, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[3]


def cli(endpoint: EndpointProc, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYAGENT_API", "PYAGENT_TOKEN", "PYAGENT_STATE_DIR")}
    env["PYTHONPATH"] = str(REPO)
    if token is not None:
        env["PYAGENT_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "pyagent.cli", *args, "--state-dir", str(endpoint.state_dir)],
                          capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)


def tls_client(endpoint: EndpointProc, cert: Path | None = None, key: Path | None = None) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(endpoint.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    raw = socket.create_connection(("127.0.0.1", endpoint.port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def exchange(sock: ssl.SSLSocket, msg: dict[str, Any]) -> dict[str, Any]:
    """Send one message, return the first line that is not a heartbeat (TLS 1.3 reports a refused client
    certificate only on the first read, so this raises ssl.SSLError then)."""
    sock.sendall(json.dumps(msg).encode() + b"\n")
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by the endpoint; received {buf!r}")
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        if reply.get("method") != "heartbeat.post":
            return reply


def hello(agent_id: str) -> dict[str, Any]:
    return {"v": "1", "id": 1, "method": "handshake.hello",
            "params": {"agent_id": agent_id, "name": "intruder", "host": {"version": "x", "python": "3"}}}


def enrolled(endpoint: EndpointProc, make_agent: Any, workdir: Path, name: str = "agent-1",
             token: str | None = None) -> AgentProc:
    a: AgentProc = make_agent(workdir, [endpoint], endpoint.ca, token or endpoint.agent_token, name=name).start()
    endpoint.wait_connected(a.agent_id)
    return a


def make_cert(ca_key: Any, ca_cert: x509.Certificate, agent_id: str, not_before: dt.datetime,
              not_after: dt.datetime, out: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after).sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "c.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    (out / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out / "c.crt", out / "c.key"


def refused_exit(a: AgentProc, text: str) -> None:
    assert a.proc is not None
    assert a.proc.wait(30) == 3, a.log()
    assert text in a.log(), a.log()


# -- enrollment ------------------------------------------------------------------------------------------------------

def test_enroll_and_call(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a = enrolled(endpoint, make_agent, tmp_path / "a")
    state = a.workdir / "state"
    assert stat.S_IMODE((state / "agent.key").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((state / "agent.crt").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == a.agent_id
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=29) < lifetime < dt.timedelta(days=31)  # the 30-day default
    key_pem = (state / "agent.key").read_bytes()
    assert key_pem not in endpoint.log().encode() and b"PRIVATE KEY" not in (endpoint.state_dir / "endpoint.db").read_bytes()
    assert endpoint.call(a.agent_id, "hello.greet", {"name": "mtls"}) == {"result": "Hello, mtls!"}
    assert endpoint.agent(a.agent_id)["status"] == "active"  # type: ignore[index]
    assert "event=enroll.issued" in endpoint.log()
    # The token is stored hashed only.
    assert endpoint.agent_token.encode() not in (endpoint.state_dir / "endpoint.db").read_bytes()
    # A restart reuses the certificate: no second enrollment.
    a.stop()
    a.start()
    endpoint.wait_connected(a.agent_id)
    assert a.log().count("event=enroll.started") == 1


def test_enroll_subcommand(tmp_path: Path, endpoint: EndpointProc) -> None:
    state = tmp_path / "s"
    result = subprocess.run([host_binary(), "enroll", "--endpoint", endpoint.listen, "--ca", str(endpoint.ca),
                             "--token", endpoint.create_token(uses=1), "--state-dir", str(state), "--name", "cli"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    agent_id = (state / "agent-id").read_text().strip()
    assert f"enrolled with {endpoint.listen} as agent {agent_id}" in result.stderr
    assert (state / "agent.crt").exists() and stat.S_IMODE((state / "agent.key").stat().st_mode) == 0o600


def test_token_uses_exhausted(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    token = endpoint.create_token(uses=1)
    enrolled(endpoint, make_agent, tmp_path / "a", token=token)
    b: AgentProc = make_agent(tmp_path / "b", [endpoint], endpoint.ca, token, name="b").start(wait=False)
    refused_exit(b, "is used up (1 of 1 uses)")
    assert "is used up" in endpoint.log() and "event=enroll.refused" in endpoint.log()


def test_expired_token(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    token = endpoint.create_token(expires="1s")
    time.sleep(1.2)
    a: AgentProc = make_agent(tmp_path / "a", [endpoint], endpoint.ca, token).start(wait=False)
    refused_exit(a, "expired")
    assert "expired" in endpoint.log()


def test_revoked_token(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    token = endpoint.create_token()
    token_id = endpoint.api("GET", "/api/v1/tokens")[1]["tokens"][-1]["token_id"]
    result = cli(endpoint, "token", "revoke", token_id)
    assert result.returncode == 0, result.stderr
    a: AgentProc = make_agent(tmp_path / "a", [endpoint], endpoint.ca, token).start(wait=False)
    refused_exit(a, f"enrollment token {token_id} was revoked")
    assert "was revoked" in endpoint.log()


def test_token_cli(endpoint: EndpointProc) -> None:
    result = cli(endpoint, "token", "create", "--uses", "3", "--expires", "2h", "--label", "env=prod", "--approve")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pae_")
    listing = cli(endpoint, "token", "ls")
    assert "0/3" in listing.stdout and "env=prod" in listing.stdout and result.stdout.strip() not in listing.stdout
    bad = cli(endpoint, "token", "create", "--expires", "soon")
    assert bad.returncode == 2 and "bad duration 'soon'" in bad.stderr


def test_pending_until_approved(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    token = endpoint.create_token(approve=True)
    a: AgentProc = make_agent(tmp_path / "a", [endpoint], endpoint.ca, token).start()  # waits for the agent id
    a.wait_log("pending")
    assert endpoint.agent(a.agent_id)["status"] == "pending"  # type: ignore[index]
    assert "pending" in cli(endpoint, "agents", "ls").stdout
    body = endpoint.call(a.agent_id, "hello.greet", {"name": "x"})
    assert body["error"]["code"] == -32003
    time.sleep(1.5)  # it keeps asking, politely, with the same key: one token use
    assert a.alive() and not (a.workdir / "state" / "agent.crt").exists()
    result = cli(endpoint, "agents", "approve", a.agent_id)
    assert result.returncode == 0 and "approved (was pending)" in result.stdout, result.stderr
    endpoint.wait_connected(a.agent_id)
    assert endpoint.call(a.agent_id, "hello.greet", {"name": "ok"}) == {"result": "Hello, ok!"}
    assert endpoint.api("GET", "/api/v1/tokens")[1]["tokens"][-1]["uses"] == 1


def test_rejected_agent(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    token = endpoint.create_token(approve=True)
    a: AgentProc = make_agent(tmp_path / "a", [endpoint], endpoint.ca, token).start()
    a.wait_log("pending")
    assert cli(endpoint, "agents", "reject", a.agent_id).returncode == 0
    refused_exit(a, f"enrollment of agent {a.agent_id} was rejected by an operator")
    assert endpoint.agent(a.agent_id)["status"] == "rejected"  # type: ignore[index]


# -- mutual TLS ------------------------------------------------------------------------------------------------------

def test_no_certificate_can_do_nothing(endpoint: EndpointProc) -> None:
    with tls_client(endpoint) as sock:
        reply = exchange(sock, hello("anyone"))
    assert reply["error"]["code"] == -32000 and "no client certificate" in reply["error"]["message"]
    with tls_client(endpoint) as sock:
        reply = exchange(sock, {"v": "1", "id": 2, "method": "bundle.call", "params": {}})
    assert reply["error"]["code"] == -32600
    assert "event=handshake.refused" in endpoint.log() and "no client certificate" in endpoint.log()
    assert endpoint.agents() == []


def test_certificate_from_another_ca(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a = enrolled(endpoint, make_agent, tmp_path / "a")
    other_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue CA")])
    now = dt.datetime.now(dt.timezone.utc)
    other_ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(other_key.public_key())
                .serial_number(1).not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .sign(other_key, hashes.SHA256()))
    cert, key = make_cert(other_key, other_ca, a.agent_id, now - dt.timedelta(hours=1), now + dt.timedelta(days=1),
                          tmp_path / "rogue")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_client(endpoint, cert, key) as sock:
            exchange(sock, hello(a.agent_id))
    wait_for(lambda: "event=tls.failed" in endpoint.log(), 10, "the TLS refusal in the endpoint log")
    assert "unable to get local issuer certificate" in endpoint.log()
    assert endpoint.call(a.agent_id, "hello.greet", {"name": "still"}) == {"result": "Hello, still!"}


def test_expired_client_certificate(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a = enrolled(endpoint, make_agent, tmp_path / "a")
    ca_key = serialization.load_pem_private_key((endpoint.state_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(endpoint.ca.read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = make_cert(ca_key, ca_cert, a.agent_id, now - dt.timedelta(days=2), now - dt.timedelta(days=1),
                          tmp_path / "old")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_client(endpoint, cert, key) as sock:
            exchange(sock, hello(a.agent_id))
    wait_for(lambda: "certificate has expired" in endpoint.log(), 10, "the expiry refusal in the endpoint log")
    assert endpoint.agent(a.agent_id)["connected"]  # type: ignore[index]


def test_certificate_claiming_another_id(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a = enrolled(endpoint, make_agent, tmp_path / "a", name="a")
    b = enrolled(endpoint, make_agent, tmp_path / "b", name="b")
    state = a.workdir / "state"
    with tls_client(endpoint, state / "agent.crt", state / "agent.key") as sock:
        reply = exchange(sock, hello(b.agent_id))
    assert reply["error"]["code"] == -32000
    assert f"the client certificate is for agent {a.agent_id} but the hello claims agent_id '{b.agent_id}'" \
        in reply["error"]["message"]
    assert "event=handshake.refused" in endpoint.log()
    assert endpoint.call(b.agent_id, "hello.greet", {"name": "b"}) == {"result": "Hello, b!"}


def test_revoked_agent_dropped_and_refused(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a = enrolled(endpoint, make_agent, tmp_path / "a", name="a")
    b = enrolled(endpoint, make_agent, tmp_path / "b", name="b")
    result = cli(endpoint, "agents", "revoke", a.agent_id)
    assert result.returncode == 0 and "revoked (was active)" in result.stdout, result.stderr
    a.wait_log(f"unauthorized: agent {a.agent_id} was revoked by an operator", timeout=10)
    wait_for(lambda: not endpoint.agent(a.agent_id)["connected"], 10, "the revoked session to be gone")  # type: ignore[index]
    # Its reconnection attempts are refused at the handshake, with the reason on both sides.
    a.wait_log(f"unauthorized: agent {a.agent_id} is revoked", timeout=20)
    assert "event=session.revoked" in endpoint.log() and "event=handshake.refused" in endpoint.log()
    assert a.alive()
    assert endpoint.call(a.agent_id, "hello.greet", {"name": "x"})["error"]["code"] == -32003
    assert endpoint.call(b.agent_id, "hello.greet", {"name": "b"}) == {"result": "Hello, b!"}


# -- operator API ----------------------------------------------------------------------------------------------------

def test_operator_scopes(tmp_path: Path, endpoint: EndpointProc, make_agent: Any) -> None:
    a = enrolled(endpoint, make_agent, tmp_path / "a")
    tokens = {}
    for scope in ("read", "call"):
        result = cli(endpoint, "operator-token", "create", "--scope", scope, "--label", f"{scope} test")
        assert result.returncode == 0, result.stderr
        tokens[scope] = result.stdout.strip()
    # No token, a wrong token: 401.
    assert endpoint.api("GET", "/api/v1/agents", token="")[0] == 401
    assert endpoint.api("GET", "/api/v1/agents", token="pao_wrong")[0] == 401
    # read: may list, may not call or administer.
    assert endpoint.api("GET", "/api/v1/agents", token=tokens["read"])[0] == 200
    status, body = endpoint.api("POST", "/api/v1/call", {"target": a.agent_id, "method": "hello.greet"},
                                token=tokens["read"])
    assert status == 403 and "needs the 'call' scope" in body["error"]["message"]
    denied = cli(endpoint, "call", a.agent_id, "hello.greet", "name=x", token=tokens["read"])
    assert denied.returncode == 1 and "needs the 'call' scope" in denied.stderr
    # call: may call, may not create tokens or revoke agents.
    allowed = cli(endpoint, "call", a.agent_id, "hello.greet", "name=x", token=tokens["call"])
    assert allowed.returncode == 0 and allowed.stdout.strip() == "Hello, x!", allowed.stderr
    assert endpoint.api("POST", "/api/v1/tokens", {}, token=tokens["call"])[0] == 403
    assert endpoint.api("POST", f"/api/v1/agents/{a.agent_id}/revoke", {}, token=tokens["call"])[0] == 403
    assert "event=api.forbidden" in endpoint.log() and "event=api.unauthorized" in endpoint.log()
    # A revoked operator token stops working.
    token_id = [t for t in endpoint.api("GET", "/api/v1/operator-tokens")[1]["tokens"] if t["label"] == "call test"]
    assert cli(endpoint, "operator-token", "revoke", token_id[0]["token_id"]).returncode == 0
    assert endpoint.api("GET", "/api/v1/agents", token=tokens["call"])[0] == 401


# -- hostile connections ---------------------------------------------------------------------------------------------

@pytest.fixture
def strict_endpoint(tmp_path: Path) -> Any:
    ep = EndpointProc(tmp_path / "strict", heartbeat_interval=0.5,
                      extra_args=["--tls-handshake-timeout", "1", "--handshake-timeout", "1",
                                  "--max-frame-bytes", "65536"]).start()
    yield ep
    ep.stop()


def test_garbage_oversized_and_slow_connections(tmp_path: Path, strict_endpoint: EndpointProc,
                                                make_agent: Any) -> None:
    endpoint = strict_endpoint
    a = enrolled(endpoint, make_agent, tmp_path / "a")
    # Garbage instead of a TLS ClientHello.
    for junk in (b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096), b"\x16\x03\x01\xff\xff" + b"\0" * 100):
        with socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) as raw:
            raw.sendall(junk)
            raw.settimeout(5)
            try:
                while raw.recv(4096):
                    pass
            except ConnectionError:
                pass
    # Slowloris: TCP open, nothing sent (TLS deadline); TLS up, no hello (handshake deadline); a dribbled line.
    idle = [socket.create_connection(("127.0.0.1", endpoint.port), timeout=5) for _ in range(20)]
    quiet = tls_client(endpoint)
    slow = tls_client(endpoint)
    slow.sendall(b'{"v": "1", "id": 1, "method": ')
    # An oversized frame.
    big = tls_client(endpoint)
    big.sendall(b"x" * 70000 + b"\n")
    reply = json.loads(big.recv(65536).split(b"\n")[0])
    assert reply["error"]["code"] == -32005 and reply["error"]["data"]["limit"] == 65536
    # Meanwhile the real agent keeps working.
    for i in range(5):
        assert endpoint.call(a.agent_id, "hello.greet", {"name": str(i)}) == {"result": f"Hello, {i}!"}
    for sock in idle:
        sock.settimeout(5)
        assert sock.recv(1) == b""  # closed by the endpoint after the TLS deadline
        sock.close()
    for sock in (quiet, slow):
        sock.settimeout(5)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
    big.close()
    metrics = endpoint.api("GET", "/api/v1/metrics")[1]
    assert metrics["tls_failed"] >= 23 and metrics["handshake_timeout"] >= 2 and metrics["frame_too_large"] == 1
    log = endpoint.log()
    assert "TLS handshake deadline (1 s) passed" in log and "event=handshake.timeout" in log
    assert endpoint.proc is not None and endpoint.proc.poll() is None and a.alive()
    assert endpoint.call(a.agent_id, "hello.greet", {"name": "end"}) == {"result": "Hello, end!"}
