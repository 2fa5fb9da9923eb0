"""State directory: development CA, server certificate, tokens, reuse on later runs, endpoint.json."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fakeagent import FakeAgent, endpoint_config

from pyagent.endpoint import Endpoint, StateError
from pyagent.endpoint._state import prepare_state, server_ssl_context


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def san(path: Path) -> tuple[set[str], set[str]]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(ext.get_values_for_type(x509.DNSName)), {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}


def test_first_run_creates_everything_private(tmp_path: Path) -> None:
    root = tmp_path / "a" / "state"
    state = prepare_state(root, "127.0.0.1", allow_shared_token=True)
    assert state.created == {"state_dir", "ca", "server_cert", "agent_token", "operator_token"}
    assert mode(root) == 0o700
    for private in (state.paths.ca_key, state.paths.server_key, state.paths.agent_token,
                    state.paths.operator_token):
        assert mode(private) == 0o600, private
    assert len(state.agent_token) >= 32 and len(state.operator_token) >= 32
    assert state.agent_token != state.operator_token
    assert state.paths.agent_token.read_text().strip() == state.agent_token

    ca = x509.load_pem_x509_certificate(state.paths.ca_cert.read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(state.paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert san(state.paths.server_cert) == ({"localhost"}, {"127.0.0.1", "::1"})


def test_second_run_reuses_everything(tmp_path: Path) -> None:
    first = prepare_state(tmp_path, "127.0.0.1")
    files = {p: p.read_bytes() for p in tmp_path.iterdir()}
    second = prepare_state(tmp_path, "127.0.0.1")
    assert second.created == frozenset()
    assert (second.agent_token, second.operator_token) == (first.agent_token, first.operator_token)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == files


def test_listen_name_is_added_by_reissuing_the_server_cert_from_the_same_ca(tmp_path: Path) -> None:
    first = prepare_state(tmp_path, "127.0.0.1")
    ca_before = first.paths.ca_cert.read_bytes()
    second = prepare_state(tmp_path, "endpoint.example.test")
    assert second.created == {"server_cert"}
    assert first.paths.ca_cert.read_bytes() == ca_before
    dns, ips = san(second.paths.server_cert)
    assert dns == {"localhost", "endpoint.example.test"} and ips == {"127.0.0.1", "::1"}
    # A specific IP is covered too; wildcards are not names.
    third = prepare_state(tmp_path, "10.1.2.3")
    assert "10.1.2.3" in san(third.paths.server_cert)[1]
    assert prepare_state(tmp_path, "0.0.0.0").created == frozenset()


def test_half_a_ca_is_an_error_not_a_silent_new_ca(tmp_path: Path) -> None:
    state = prepare_state(tmp_path, "127.0.0.1")
    state.paths.ca_key.unlink()
    with pytest.raises(StateError, match="ca.pem exists but .*ca.key does not"):
        prepare_state(tmp_path, "127.0.0.1")


def test_empty_token_file_is_an_error(tmp_path: Path) -> None:
    state = prepare_state(tmp_path, "127.0.0.1")
    state.paths.operator_token.write_text("\n")
    with pytest.raises(StateError, match="operator-token is empty"):
        prepare_state(tmp_path, "127.0.0.1")


def test_token_file_option_must_exist(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="does not exist"):
        prepare_state(tmp_path / "s", "127.0.0.1", tmp_path / "missing-token", allow_shared_token=True)
    token_file = tmp_path / "my-token"
    token_file.write_text("s3cret-agent-token\n")
    os.chmod(token_file, 0o600)
    state = prepare_state(tmp_path / "s", "127.0.0.1", token_file, allow_shared_token=True)
    assert state.agent_token == "s3cret-agent-token" and state.agent_token_file == token_file
    assert not state.paths.agent_token.exists()


def test_server_context_is_tls12_minimum(tmp_path: Path) -> None:
    ctx = server_ssl_context(prepare_state(tmp_path, "127.0.0.1").paths)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


async def test_endpoint_json_has_the_bound_ports(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        info = json.loads((tmp_path / "endpoint.json").read_text())
        assert info == {"pid": os.getpid(), "listen": f"127.0.0.1:{ep.listen_port}",
                        "api": f"http://127.0.0.1:{ep.api_port}", "ca": str(tmp_path / "ca.pem"),
                        "version": "0.1.0", "shared_token": True}
        assert ep.listen_port != 0 and ep.api_port != 0
    # Nothing is removed on exit.
    assert (tmp_path / "endpoint.json").exists() and (tmp_path / "endpoint.db").exists()


async def test_agents_verify_the_server_by_ip_and_by_name(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        for host, name in (("127.0.0.1", None), ("127.0.0.1", "localhost")):
            agent = await FakeAgent.connect(host, ep.listen_port, ep.paths.ca_cert, server_hostname=name)
            await agent.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert, server_hostname="wrong.test")


def _has_ipv6_loopback() -> bool:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_listen(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path, listen_host="::1", api_host="::1")) as ep:
        assert ep.listen_address == f"[::1]:{ep.listen_port}"
        assert ep.api_url == f"http://[::1]:{ep.api_port}"
        agent = await FakeAgent.connect("::1", ep.listen_port, ep.paths.ca_cert)
        reply = await agent.hello(ep.state.agent_token)
        assert reply["result"]["agent_id"] == "agent-0001"
        await agent.close()
