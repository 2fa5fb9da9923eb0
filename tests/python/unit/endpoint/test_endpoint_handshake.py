"""handshake.hello: token, parameters, ordering, deadline, replacing an older session."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from fakeagent import FakeAgent, endpoint_config, greet, hello_params

from pyagent.endpoint import Endpoint
from pyagent.protocol import encode, request


async def connect(ep: Endpoint, **kw: Any) -> FakeAgent:
    return await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert, **kw)


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Bounded polling for a condition the test cannot await directly."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_hello_ok(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path, heartbeat_interval=7)) as ep:
        async with await connect(ep) as agent:
            reply = await agent.hello(ep.state.agent_token, agent_id="id-1", name="web-1")
            result = reply["result"]
            assert reply["id"] == 1 and reply["v"] == "1"
            assert result["agent_id"] == "id-1" and result["heartbeat_interval"] == 7
            assert isinstance(result["endpoint_time"], int) and result["endpoint_time"] > 1_600_000_000_000
            rec = ep.agent("web-1")
            assert rec is not None
            assert rec["connected"] and rec["agent_id"] == "id-1" and rec["host_version"] == "0.1.0-fake"
            assert rec["features"] == {"bundle.call": 1} and rec["platform"]["system"] == "Linux"
            assert ep.is_connected("id-1") and ep.connected_count == 1
        await wait_for(lambda: not ep.is_connected("id-1"))
        rec = ep.agent("id-1")
        assert rec is not None and rec["connected"] is False


@pytest.mark.parametrize("token", ["wrong-token", None, ""])
async def test_bad_or_missing_token_is_refused_and_closed(tmp_path: Path, token: str | None,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            reply = await agent.hello(token)
            assert reply["id"] == 1
            assert reply["error"]["code"] == -32000
            assert "unauthorized" in reply["error"]["message"]
            await agent.wait_closed()
        assert ep.agents() == []
    assert any("event=handshake.refused" in r.getMessage() and "code=-32000" in r.getMessage()
               for r in caplog.records)


async def test_wrong_version_is_refused(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            msg = request(1, "handshake.hello", hello_params(ep.state.agent_token))
            msg["v"] = "2"
            await agent.send(msg)
            received = await agent.wait_closed()
            assert len(received) == 1
            error = received[0]
            assert error["id"] is None and error["error"]["code"] == -32002
            assert error["error"]["data"] == {"supported": ["1"]}
            assert "'2'" in error["error"]["message"]


async def test_nothing_before_hello(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            reply = await agent.heartbeat()
            assert reply["error"]["code"] == -32600
            assert "handshake required" in reply["error"]["message"]
            await agent.wait_closed()
        # A response before the hello is refused the same way, with id null.
        async with await connect(ep) as agent:
            await agent.send({"v": "1", "id": 5, "result": 1})
            received = await agent.wait_closed()
            assert [m["error"]["code"] for m in received] == [-32600] and received[0]["id"] is None
        # And a hello sent as a notification.
        async with await connect(ep) as agent:
            await agent.send({"v": "1", "method": "handshake.hello", "params": hello_params(ep.state.agent_token)})
            received = await agent.wait_closed()
            assert received[0]["error"]["code"] == -32600 and "id" in received[0]["error"]["message"]


@pytest.mark.parametrize(("change", "field"), [
    ({"agent_id": ""}, "'agent_id'"),
    ({"name": 5}, "'name'"),
    ({"host": {"version": "1"}}, "'host.python'"),
    ({"bundles": [{"name": "x"}]}, "'bundles[0].version'"),
    ({"labels": {"env": 1}}, "'labels.env'"),
    ({"features": {"bundle.call": "1"}}, "'features.bundle.call'"),
    ({"colour": "blue"}, "unknown parameter 'colour'"),
])
async def test_bad_hello_params_name_the_field(tmp_path: Path, change: dict[str, Any], field: str) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            reply = await agent.hello(ep.state.agent_token, **change)
            assert reply["error"]["code"] == -32602
            assert field in reply["error"]["message"]
            await agent.wait_closed()


async def test_missing_hello_param(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            params = hello_params(ep.state.agent_token)
            del params["host"]
            await agent.send(request(1, "handshake.hello", params))
            received = await agent.wait_closed()
            assert received[0]["id"] == 1
            assert received[0]["error"] == {"code": -32602, "message": "handshake.hello: missing parameter 'host'"}


async def test_optional_hello_params_may_be_left_out(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            params = hello_params(ep.state.agent_token)
            for key in ("bundles", "labels", "platform", "features"):
                del params[key]
            reply = await agent.request("handshake.hello", params)
            assert reply["result"]["agent_id"] == "agent-0001"
        rec = ep.agent("agent-0001")
        assert rec is not None and rec["bundles"] == [] and rec["labels"] == {}


async def test_handshake_deadline(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path, handshake_timeout=0.3)) as ep:
        async with await connect(ep) as agent:
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert await agent.wait_closed(timeout=5) == []
            assert 0.25 <= loop.time() - started < 3
    assert any("event=handshake.timeout" in r.getMessage() for r in caplog.records)


async def test_second_session_replaces_the_first(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        token = ep.state.agent_token
        first = await connect(ep, on_call=greet)
        assert "result" in await first.hello(token, agent_id="same")
        second = await connect(ep, on_call=greet)
        assert "result" in await second.hello(token, agent_id="same")
        await first.wait_closed()
        # The old session's close must not mark the agent disconnected or unroute it.
        assert ep.is_connected("same")
        rec = ep.agent("same")
        assert rec is not None and rec["connected"] is True
        assert await ep.call("same", "hello.greet", {"name": "b"}, 5) == "Hello, b!"
        assert (first.calls_received, second.calls_received) == (0, 1)
        await first.close()
        await second.close()


async def test_hello_twice_on_one_connection(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            assert "result" in await agent.hello(ep.state.agent_token)
            reply = await agent.hello(ep.state.agent_token)
            assert reply["error"]["code"] == -32600
            # Not a violation: the session goes on.
            assert "result" in await agent.heartbeat()


async def test_trailing_cr_is_kept_and_read_as_json_whitespace(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connect(ep) as agent:
            await agent.send_raw(encode(request(1, "handshake.hello", hello_params(ep.state.agent_token))) + b"\r\n")
            # A trailing \r is part of the frame, which json accepts as whitespace: the hello succeeds.
            received = await agent.recv()
            assert received.get("result", {}).get("agent_id") == "agent-0001"

