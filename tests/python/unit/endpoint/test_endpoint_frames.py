"""Protocol violations: one error with "id": null naming the problem, this connection closed, others served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fakeagent import FakeAgent, endpoint_config, greet

from pyagent.endpoint import Endpoint
from pyagent.protocol import DEFAULT_MAX_FRAME_BYTES, encode, request


def padded(msg: dict[str, Any], size: int) -> bytes:
    """`msg` as a JSON frame of exactly `size` bytes (spaces before the closing brace), newline excluded."""
    body = encode(msg)
    assert len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def connected(ep: Endpoint, agent_id: str) -> FakeAgent:
    agent = await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert, on_call=greet)
    assert "result" in await agent.hello(ep.state.agent_token, agent_id=agent_id, name=agent_id)
    return agent


async def assert_still_served(ep: Endpoint, bystander: FakeAgent) -> None:
    """The agent that did nothing wrong keeps working, and new agents can connect."""
    assert await ep.call("bystander", "hello.greet", {"name": "still"}, 5) == "Hello, still!"
    assert "result" in await bystander.heartbeat()
    newcomer = await connected(ep, "newcomer")
    assert await ep.call("newcomer", "hello.greet", {}, 5) == "Hello, world!"
    await newcomer.close()


async def refused(ep: Endpoint, data: bytes, caplog: pytest.LogCaptureFixture) -> dict[str, Any]:
    """Send `data` from a handshaken agent; return the one error it gets before the connection closes."""
    bystander = await connected(ep, "bystander")
    offender = await connected(ep, "offender")
    try:
        await offender.send_raw(data)
        received = await offender.wait_closed()
        assert len(received) == 1, received
        error = received[0]
        assert error["v"] == "1" and error["id"] is None and set(error) == {"v", "id", "error"}
        assert not ep.is_connected("offender")
        await assert_still_served(ep, bystander)
    finally:
        await offender.close()
        await bystander.close()
    code = error["error"]["code"]
    assert any("event=frame.refused" in r.getMessage() and f"code={code}" in r.getMessage()
               and "agent=offender" in r.getMessage() for r in caplog.records)
    return error["error"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("limit", [4096, DEFAULT_MAX_FRAME_BYTES])
async def test_frame_of_exactly_the_limit_is_accepted(tmp_path: Path, limit: int) -> None:
    async with Endpoint(endpoint_config(tmp_path, max_frame_bytes=limit)) as ep:
        async with await connected(ep, "a") as agent:
            frame = padded(request(99, "heartbeat.post", {"seq": 1}), limit)
            assert len(frame) == limit
            await agent.send_raw(frame + b"\n")
            reply = await agent.recv()
            assert reply["id"] == 99 and "timestamp" in reply["result"]
            assert ep.is_connected("a")


@pytest.mark.parametrize("limit", [4096, DEFAULT_MAX_FRAME_BYTES])
async def test_frame_one_byte_over_the_limit_is_refused(tmp_path: Path, limit: int,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path, max_frame_bytes=limit)) as ep:
        frame = padded(request(99, "heartbeat.post", {"seq": 1}), limit + 1)
        error = await refused(ep, frame + b"\n", caplog)
        assert error["code"] == -32005 and error["data"] == {"limit": limit}
        assert "too large" in error["message"] and str(limit) in error["message"]


async def test_oversized_frame_is_refused_before_its_newline(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path, max_frame_bytes=4096)) as ep:
        error = await refused(ep, b"[" * 5000, caplog)  # no newline ever comes
        assert error["code"] == -32005


async def test_invalid_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        error = await refused(ep, b'{"v":"1","id":1,\n', caplog)
        assert error["code"] == -32700 and "not valid JSON" in error["message"]


async def test_invalid_utf8(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        error = await refused(ep, b'{"v":"1","method":"x\xff"}\n', caplog)
        assert error["code"] == -32700


@pytest.mark.parametrize(("frame", "needle"), [
    (b"[1,2]\n", "JSON object"),
    (b'"hello"\n', "JSON object"),
    (b'{"v":"1","id":"seven","method":"heartbeat.post"}\n', "'id'"),
    (b'{"v":"1","id":1,"method":"heartbeat.post","params":[1]}\n', "'params'"),
    (b'{"v":"1","id":1}\n', "'result' or 'error'"),
])
async def test_bad_envelope(tmp_path: Path, frame: bytes, needle: str, caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        error = await refused(ep, frame, caplog)
        assert error["code"] == -32600 and needle in error["message"]


@pytest.mark.parametrize("version", ['"2"', "1", "null"])
async def test_wrong_version(tmp_path: Path, version: str, caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        frame = b'{"v":' + version.encode() + b',"id":3,"method":"heartbeat.post","params":{}}\n'
        error = await refused(ep, frame, caplog)
        assert error["code"] == -32002 and error["data"] == {"supported": ["1"]}
        assert "version" in error["message"]


async def test_empty_lines_are_ignored(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep, "a") as agent:
            await agent.send_raw(b"\n\n\n" + encode(request(7, "heartbeat.post", {})) + b"\n\n")
            reply = await agent.recv()
            assert reply["id"] == 7 and "result" in reply


async def test_unknown_method_and_notification(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep, "a") as agent:
            await agent.send({"v": "1", "method": "agent.event", "params": {"x": 1}})  # ignored
            reply = await agent.request("registry.withdraw", {})
            assert reply["error"]["code"] == -32601 and "registry.withdraw" in reply["error"]["message"]
            reply = await agent.heartbeat(rtt_ms="fast")
            assert reply["error"]["code"] == -32602 and "'rtt_ms'" in reply["error"]["message"]
            assert ep.is_connected("a")  # none of these is a protocol violation
