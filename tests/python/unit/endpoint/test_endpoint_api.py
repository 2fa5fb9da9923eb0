"""The operator HTTP API: bearer token on every route, agent records, calls, 400s naming the field."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fakeagent import FakeAgent, endpoint_config, greet

from pyagent.endpoint import Endpoint

_NO_TOKEN = object()
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _opener.open(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())


async def api(ep: Endpoint, method: str, path: str, body: Any = None, *, token: Any = None,
              raw: bytes | None = None, auth: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = auth
    elif token is not _NO_TOKEN:
        headers["Authorization"] = f"Bearer {ep.state.operator_token if token is None else token}"
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    assert ep.api_url is not None
    return await asyncio.to_thread(_http, ep.api_url + path, method, data, headers)


@pytest.mark.parametrize("path", ["/api/v1/agents", "/api/v1/agents/x", "/api/v1/call", "/nope"])
async def test_every_route_needs_the_token(tmp_path: Path, path: str, caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        for kw in ({"token": _NO_TOKEN}, {"token": "wrong"}, {"auth": f"Basic {ep.state.operator_token}"},
                   {"auth": "Bearer"}, {"token": ep.state.operator_token + "x"}):
            status, headers, body = await api(ep, "GET", path, **kw)
            assert status == 401, kw
            assert body["error"]["code"] == -32000 and "unauthorized" in body["error"]["message"]
            assert headers["www-authenticate"] == "Bearer"
    assert any("event=api.unauthorized" in r.getMessage() for r in caplog.records)


async def test_scheme_is_case_insensitive(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        status, _, body = await api(ep, "GET", "/api/v1/agents", auth=f"bearer {ep.state.operator_token}")
        assert (status, body) == (200, {"agents": []})


async def test_agents_list_and_show(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert) as agent:
            await agent.hello(ep.state.agent_token, agent_id="0123456789abcdef", name="web-1")
            await agent.heartbeat(rtt_ms=0.3)
            status, _, body = await api(ep, "GET", "/api/v1/agents")
            assert status == 200 and len(body["agents"]) == 1
            record = body["agents"][0]
            assert set(record) == {"agent_id", "name", "connected", "host_version", "python_version", "bundles",
                                   "labels", "platform", "features", "first_seen", "last_seen", "latency_ms",
                                   "skew_ms", "py_lag_ms", "peer", "status", "cert_not_after", "capabilities",
                                   "crash_loop", "crash_loop_since", "crash_loop_crashes"}
            assert record["crash_loop"] is False and record["crash_loop_since"] is None
            assert record["connected"] is True and record["latency_ms"] == 0.3
            for ref in ("0123456789abcdef", "web-1"):
                status, _, body = await api(ep, "GET", f"/api/v1/agents/{ref}")
                assert status == 200 and body == record
            status, _, body = await api(ep, "GET", "/api/v1/agents/nobody")
            assert status == 404 and body["error"]["code"] == -32003 and "nobody" in body["error"]["message"]


async def test_call(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert, on_call=greet) as agent:
            await agent.hello(ep.state.agent_token, name="web-1")
            status, _, body = await api(ep, "POST", "/api/v1/call",
                                        {"target": "web-1", "method": "hello.greet", "params": {"name": "world"},
                                         "timeout": 5})
            assert (status, body) == (200, {"result": "Hello, world!"})
            status, _, body = await api(ep, "POST", "/api/v1/call", {"target": "web-1", "method": "hello.nope"})
            assert status == 200 and body["error"]["code"] == -32601
            status, _, body = await api(ep, "POST", "/api/v1/call", {"target": "ghost", "method": "hello.greet"})
            assert status == 200 and body["error"]["code"] == -32003


async def test_agent_update_is_not_a_plain_call(tmp_path: Path) -> None:
    """Offers come from rollouts (admin; waves, gates, pins and opt-outs apply): a `call` cannot send one."""
    offered: list[Any] = []

    async def record(obj: str, method: str, params: dict[str, Any]) -> Any:
        offered.append((obj, method, params))
        return {"state": "offered"}

    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert, on_call=record) as agent:
            await agent.hello(ep.state.agent_token, name="web-1")
            status, _, body = await api(ep, "POST", "/api/v1/call", {
                "target": "*", "method": "agent.update",
                "params": {"kind": "bundle", "name": "hello", "version": "0.1", "target": "bundles/hello/0.1.tar.gz"}})
            assert status == 403 and body["error"]["code"] == -32007, body
            assert "rollout" in body["error"]["message"]
            assert offered == []


@pytest.mark.parametrize(("body", "needle"), [
    ([], "JSON object"),
    ({"method": "hello.greet"}, "'target'"),
    ({"target": "", "method": "hello.greet"}, "'target'"),
    ({"target": "a", "method": "greet"}, "'method'"),
    ({"target": "a", "method": 3}, "'method'"),
    ({"target": "a", "method": "hello.greet", "params": [1]}, "'params'"),
    ({"target": "a", "method": "hello.greet", "timeout": 0}, "'timeout'"),
    ({"target": "a", "method": "hello.greet", "timeout": True}, "'timeout'"),
    ({"target": "a", "method": "hello.greet", "timeout": "5"}, "'timeout'"),
    ({"target": "a", "method": "hello.greet", "colour": 1}, "unknown field 'colour'"),
])
async def test_bad_call_bodies_name_the_field(tmp_path: Path, body: Any, needle: str) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        status, _, reply = await api(ep, "POST", "/api/v1/call", body)
        assert status == 400 and reply["error"]["code"] == -32602 and needle in reply["error"]["message"]


async def test_misuse_is_answered_in_json(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path, max_frame_bytes=1024)) as ep:
        status, _, reply = await api(ep, "POST", "/api/v1/call", raw=b"{not json")
        assert status == 400 and "not valid JSON" in reply["error"]["message"]
        status, _, reply = await api(ep, "POST", "/api/v1/call", raw=b" " * 2000)
        assert status == 413
        status, _, reply = await api(ep, "GET", "/api/v1/call")
        assert status == 405 and "error" in reply
        status, _, reply = await api(ep, "GET", "/api/v2/agents")
        assert status == 404 and "error" in reply
