"""Endpoint.call: routing, pipelining, errors, timeouts, lost sessions; heartbeats and the idle timeout."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from fakeagent import FakeAgent, endpoint_config, greet

from pyagent.endpoint import Endpoint
from pyagent.protocol import RemoteError


async def connected(ep: Endpoint, agent_id: str = "agent-1", name: str = "web-1", on_call: Any = greet) -> FakeAgent:
    agent = await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert, on_call=on_call)
    assert "result" in await agent.hello(ep.state.agent_token, agent_id=agent_id, name=name)
    return agent


async def remote_error(coro: Any) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        await coro
    return info.value


async def test_round_trip_by_id_and_by_name(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        seen: list[tuple[str, str, dict[str, Any]]] = []

        def handler(obj: str, method: str, params: dict[str, Any]) -> Any:
            seen.append((obj, method, params))
            return {"echo": params, "n": len(seen)}

        async with await connected(ep, on_call=handler):
            assert await ep.call("agent-1", "hello.greet", {"name": "world"}, 5) == {"echo": {"name": "world"}, "n": 1}
            assert await ep.call("web-1", "pkg.tool.run", {}, 5) == {"echo": {}, "n": 2}
            assert await ep.call("web-1", "hello.greet") == {"echo": {}, "n": 3}
        assert seen[1] == ("pkg.tool", "run", {})  # the method is the last dotted part


async def test_pipelined_calls_answered_out_of_order(tmp_path: Path) -> None:
    rng = random.Random(7)

    async def slow_echo(obj: str, method: str, params: dict[str, Any]) -> Any:
        await asyncio.sleep(rng.random() * 0.05)
        return params["i"]

    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep, on_call=slow_echo) as agent:
            results = await asyncio.gather(*(ep.call("web-1", "x.echo", {"i": i}, 10) for i in range(300)))
            assert results == list(range(300))
            assert agent.calls_received == 300


async def test_remote_errors_pass_through(tmp_path: Path) -> None:
    def failing(obj: str, method: str, params: dict[str, Any]) -> Any:
        if method == "missing":
            raise RemoteError(-32601, "no method hello.missing", {"available": ["greet"]})
        raise ValueError("boom")

    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep, on_call=failing):
            err = await remote_error(ep.call("web-1", "hello.missing", {}, 5))
            assert (err.code, err.message, err.data) == (-32601, "no method hello.missing", {"available": ["greet"]})
            err = await remote_error(ep.call("web-1", "hello.greet", {}, 5))
            assert err.code == -32603 and err.message == "boom"


async def test_unknown_and_disconnected_targets(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        err = await remote_error(ep.call("nobody", "hello.greet", {}, 5))
        assert err.code == -32003 and "nobody" in err.message
        agent = await connected(ep)
        await agent.close()
        async with asyncio.timeout(5):
            while ep.is_connected("web-1"):
                await asyncio.sleep(0.01)
        err = await remote_error(ep.call("web-1", "hello.greet", {}, 5))
        assert err.code == -32003 and "not connected" in err.message


async def test_bad_method_and_params(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep):
            for method in ("greet", ".greet", "hello."):
                err = await remote_error(ep.call("web-1", method, {}, 5))
                assert err.code == -32602 and "object.method" in err.message
            err = await remote_error(ep.call("web-1", "hello.greet", {"x": object()}, 5))
            assert err.code == -32602
            err = await remote_error(ep.call("web-1", "hello.greet", {}, 0))
            assert err.code == -32602


async def test_call_larger_than_the_frame_limit_is_not_sent(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path, max_frame_bytes=1024)) as ep:
        async with await connected(ep) as agent:
            err = await remote_error(ep.call("web-1", "hello.echo", {"blob": "x" * 2000}, 5))
            assert err.code == -32005 and err.data == {"limit": 1024}
            assert agent.calls_received == 0
            assert await ep.call("web-1", "hello.greet", {}, 5) == "Hello, world!"


async def test_ambiguous_name(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep, "id-a", "twin"), await connected(ep, "id-b", "twin"):
            err = await remote_error(ep.call("twin", "hello.greet", {}, 5))
            assert err.code == -32602 and err.data == {"agents": ["id-a", "id-b"]}
            assert await ep.call("id-b", "hello.greet", {}, 5) == "Hello, world!"


async def test_timeout_then_late_reply_is_ignored(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def stuck(obj: str, method: str, params: dict[str, Any]) -> Any:
        if method == "wait":
            await release.wait()
        return method

    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep, on_call=stuck):
            loop = asyncio.get_running_loop()
            started = loop.time()
            err = await remote_error(ep.call("web-1", "x.wait", {}, 0.2))
            assert err.code == -32004 and "0.2" in err.message
            assert 0.15 < loop.time() - started < 2
            release.set()  # the late reply arrives and must not disturb anything
            assert await ep.call("web-1", "x.after", {}, 5) == "after"
            assert ep.is_connected("web-1")


async def test_session_lost_while_waiting(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def hang(obj: str, method: str, params: dict[str, Any]) -> Any:
        await never.wait()

    async with Endpoint(endpoint_config(tmp_path)) as ep:
        agent = await connected(ep, on_call=hang)
        calls = [asyncio.ensure_future(ep.call("web-1", "x.hang", {}, 30)) for _ in range(3)]
        async with asyncio.timeout(5):
            while agent.calls_received < 3:
                await asyncio.sleep(0.01)
        await agent.close()
        for call in calls:
            err = await remote_error(call)
            assert err.code == -32003 and "closed" in err.message


async def test_endpoint_shutdown_fails_calls_in_flight(tmp_path: Path) -> None:
    never = asyncio.Event()

    async def hang(obj: str, method: str, params: dict[str, Any]) -> Any:
        await never.wait()

    ep = Endpoint(endpoint_config(tmp_path))
    await ep.start()
    agent = await connected(ep, on_call=hang)
    call = asyncio.ensure_future(ep.call("web-1", "x.hang", {}, 30))
    async with asyncio.timeout(5):
        while agent.calls_received < 1:
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await ep.aclose()
    assert loop.time() - started < 2
    err = await remote_error(call)
    assert err.code == -32003
    await agent.wait_closed()
    await agent.close()
    err = await remote_error(ep.call("web-1", "x.y", {}, 1))
    assert err.code == -32003


async def test_heartbeat_answers_and_stores_measurements(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path)) as ep:
        async with await connected(ep) as agent:
            reply = await agent.heartbeat(seq=1, rtt_ms=None, skew_ms=None, py_lag_ms=0)
            assert isinstance(reply["result"]["timestamp"], int)
            rec = ep.agent("web-1")
            assert rec is not None and rec["latency_ms"] is None and rec["py_lag_ms"] == 0
            before = rec["last_seen"]
            await agent.heartbeat(seq=2, rtt_ms=0.21, skew_ms=-3.5, py_lag_ms=12)
            rec = ep.agent("web-1")
            assert rec is not None
            assert (rec["latency_ms"], rec["skew_ms"], rec["py_lag_ms"]) == (0.21, -3.5, 12)
            assert rec["last_seen"] >= before
            # A heartbeat notification is stored too, and not answered.
            await agent.send({"v": "1", "method": "heartbeat.post", "params": {"rtt_ms": 0.5}})
            assert "result" in await agent.heartbeat(seq=3)  # ordered after the notification
            rec = ep.agent("web-1")
            assert rec is not None and rec["latency_ms"] == 0.5


async def test_idle_session_is_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with Endpoint(endpoint_config(tmp_path, heartbeat_interval=0.2)) as ep:
        async with await connected(ep) as agent:
            loop = asyncio.get_running_loop()
            started = loop.time()
            # Heartbeats keep it open past the idle timeout (0.3 s)...
            for _ in range(5):
                await asyncio.sleep(0.1)
                assert "result" in await agent.heartbeat()
            assert ep.is_connected("web-1")
            # ... silence closes it.
            silent = loop.time()
            await agent.wait_closed()
            assert loop.time() - silent >= 0.25 and loop.time() - started < 5
            assert not ep.is_connected("web-1")
    assert any("event=session.idle" in r.getMessage() for r in caplog.records)
