"""bundle.call dispatch, replies, concurrency and batching, driven through a real Runtime over FakeHost."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import pytest
from runtime_helpers import HELLO_BUNDLE, run, running

from pyagent.protocol import (
    AGENT_UNAVAILABLE,
    FRAME_TOO_LARGE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    VERSION_MISMATCH,
)
from pyagent.runtime import Agent, Dispatcher, FakeHost, load_bundle, method


class OddError(BaseException):
    pass


class Calc(Agent):
    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.peak = 0

    @method
    async def slow(self, delay: float = 0.01) -> int:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(delay)
        finally:
            self.running -= 1
        return self.peak

    @method
    def add(self, a: int, b: int = 0) -> int:
        """Sync: runs inline on the loop."""
        return a + b

    @method
    async def fail(self, message: str) -> None:
        raise ValueError(message)

    @method
    def fail_sync(self) -> None:
        raise KeyError("k")

    @method
    def exit(self) -> None:
        raise SystemExit(3)

    @method
    async def odd(self) -> None:
        raise OddError("not an Exception")

    @method
    def unserialisable(self) -> Any:
        return {"x": object()}

    @method
    def big(self, n: int) -> str:
        return "x" * n

    @method
    async def forever(self) -> None:
        await asyncio.sleep(3600)

    @method
    def returns_awaitable(self, x: int) -> Awaitable[int]:
        async def later() -> int:
            await asyncio.sleep(0)
            return x * 2
        return later()


def agents() -> dict[str, Agent]:
    calc = Calc()
    calc._pyagent_bind("calc")
    return {"calc": calc, **load_bundle(HELLO_BUNDLE).agents}


def error_of(host: FakeHost, msg_id: int) -> dict[str, Any]:
    _, reply = host.response_to(msg_id)
    assert "result" not in reply, reply
    error: dict[str, Any] = reply["error"]
    return error


def test_greet_replies_on_the_same_session(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.session_up(1, "a:1")
            fake_host.session_up(2, "b:2")
            fake_host.call(2, 41, "hello", "greet", {"name": "world"}, source="endpoint", target="agent-x")
            await fake_host.wait_sent(1)
        assert fake_host.sent_messages() == [
            (2, {"v": "1", "id": 41, "result": "Hello, world!", "source": "agent-x", "target": "endpoint"})]

    run(scenario())


def test_sync_method_and_sysinfo(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.call(3, 1, "calc", "add", {"a": 2, "b": 3})
            fake_host.call(3, 2, "hello", "sysinfo")
            fake_host.call(3, 3, "calc", "add", {"a": 2})
            await fake_host.wait_sent(3)
        assert fake_host.response_to(1) == (3, {"v": "1", "id": 1, "result": 5})
        assert fake_host.response_to(3)[1]["result"] == 2
        info = fake_host.response_to(2)[1]["result"]
        assert {"system", "release", "machine", "hostname", "python", "pid", "cpu_count", "load_average", "uptime_s",
                "memory"} <= set(info)
        assert info["pid"] > 0 and info["memory"]["total_bytes"] > 0

    run(scenario())


@pytest.mark.parametrize(("params", "message"), [
    ({"agent": "nobody", "method": "greet"}, "no agent object 'nobody' (available: calc, hello)"),
    ({"agent": "hello", "method": "shout"}, "agent object 'hello' has no method 'shout' (available: greet, sysinfo)"),
    ({"agent": "hello", "method": "init"}, "agent object 'hello' has no method 'init' (available: greet, sysinfo)"),
])
def test_unknown_object_or_method(fake_host: FakeHost, params: dict[str, Any], message: str) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.inject(1, {"v": "1", "id": 9, "method": "bundle.call", "params": params})
            await fake_host.wait_sent(1)
        assert error_of(fake_host, 9) == {"code": METHOD_NOT_FOUND, "message": message}

    run(scenario())


def test_unknown_request_method(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.inject(4, {"v": "1", "id": 5, "method": "agent.nosuch", "params": {}})
            await fake_host.wait_sent(1)
        assert fake_host.response_to(5) == (4, {"v": "1", "id": 5, "error": {
            "code": METHOD_NOT_FOUND, "message": "method 'agent.nosuch' not found"}})

    run(scenario())


@pytest.mark.parametrize(("params", "message", "data"), [
    ({}, "hello.greet: missing parameter 'name'", {"parameter": "name", "expected": "str"}),
    ({"name": "x", "extra": 1}, "hello.greet: unknown parameter 'extra'", {"parameter": "extra"}),
    ({"nam": "x"}, "hello.greet: unknown parameter 'nam' (did you mean 'name'?)", {"parameter": "nam"}),
    ({"name": 5}, "hello.greet: parameter 'name' must be str, got int", {"parameter": "name", "expected": "str"}),
    ({"name": ["x"]}, "hello.greet: parameter 'name' must be str, got list", {"parameter": "name", "expected": "str"}),
])
def test_invalid_params_name_the_parameter(fake_host: FakeHost, params: dict[str, Any], message: str,
                                           data: dict[str, Any]) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.call(1, 1, "hello", "greet", params)
            await fake_host.wait_sent(1)
        assert error_of(fake_host, 1) == {"code": INVALID_PARAMS, "message": message, "data": data}

    run(scenario())


@pytest.mark.parametrize(("params", "message"), [
    ({"method": "greet"}, "bundle.call: missing parameter 'agent'"),
    ({"agent": "hello"}, "bundle.call: missing parameter 'method'"),
    ({"agent": 1, "method": "greet"}, "bundle.call: parameter 'agent' must be a string"),
    ({"agent": "hello", "method": "greet", "params": []}, "bundle.call: parameter 'params' must be a object"),
    ({"agent": "hello", "method": "greet", "timeout": 3}, "bundle.call: unknown parameter 'timeout'"),
])
def test_invalid_bundle_call_params(fake_host: FakeHost, params: dict[str, Any], message: str) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.inject(1, {"v": "1", "id": 1, "method": "bundle.call", "params": params})
            await fake_host.wait_sent(1)
        error = error_of(fake_host, 1)
        assert error["code"] == INVALID_PARAMS and error["message"] == message

    run(scenario())


@pytest.mark.parametrize(("name", "params", "exc_type", "text"), [
    ("fail", {"message": "boom"}, "ValueError", "calc.fail: ValueError: boom"),
    ("fail_sync", {}, "KeyError", "calc.fail_sync: KeyError: 'k'"),
    ("exit", {}, "SystemExit", "calc.exit: SystemExit: 3"),
    ("odd", {}, "OddError", "calc.odd: OddError: not an Exception"),
])
def test_method_raising_is_an_internal_error_and_the_runtime_keeps_going(
        fake_host: FakeHost, caplog: pytest.LogCaptureFixture, name: str, params: dict[str, Any], exc_type: str,
        text: str) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.call(1, 1, "calc", name, params)
            await fake_host.wait_sent(1)
            fake_host.call(1, 2, "hello", "greet", {"name": "again"})
            await fake_host.wait_sent(2)
        error = error_of(fake_host, 1)
        assert error["code"] == INTERNAL_ERROR
        assert error["message"] == text
        assert error["data"]["type"] == exc_type
        traceback = error["data"]["traceback"]
        assert traceback.startswith("Traceback (most recent call last):")
        assert "test_runtime_dispatch.py" in traceback and f"in {name}" in traceback
        assert "pyagent/runtime/_dispatch.py" not in traceback  # starts in the bundle's method
        assert fake_host.response_to(2)[1]["result"] == "Hello, again!"

    with caplog.at_level(logging.ERROR, logger="pyagent.runtime"):
        run(scenario())
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "call.failed"]
    assert record.levelno == logging.ERROR and f"calc.{name}" in record.getMessage()


def test_concurrency_limit(fake_host: FakeHost) -> None:
    calc = Calc()
    calc._pyagent_bind("calc")

    async def scenario() -> None:
        async with running(fake_host, {"calc": calc}, max_concurrent_calls=8) as runtime:
            for i in range(100):
                fake_host.call(1, i, "calc", "slow", {"delay": 0.005})
            messages = await fake_host.wait_sent(100)
            assert runtime.stats()["calls_peak_running"] == 8
        assert sorted(msg["id"] for _, msg in messages) == list(range(100))
        assert all("result" in msg and msg["result"] <= 8 for _, msg in messages)
        assert calc.peak == 8

    run(scenario())


def test_replies_are_batched(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            # 100 sync calls read in one wakeup -> one send()
            fake_host.inject_raw(b"".join(
                b'1 {"v":"1","id":%d,"method":"bundle.call",'
                b'"params":{"agent":"calc","method":"add","params":{"a":%d}}}\n' % (i, i) for i in range(100)))
            await fake_host.wait_sent(100)
            assert fake_host.recv_calls == 1
            assert fake_host.send_calls == 1
            # 100 async calls: their tasks finish in the same loop iteration -> one or two send()s
            for i in range(100, 200):
                fake_host.call(1, i, "hello", "greet", {"name": str(i)})
            await fake_host.wait_sent(200)
            assert fake_host.send_calls <= 3
        assert [msg["result"] for _, msg in fake_host.sent_messages()[:100]] == list(range(100))

    run(scenario())


def test_sync_method_returning_an_awaitable(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            fake_host.call(1, 1, "calc", "returns_awaitable", {"x": 21})
            await fake_host.wait_sent(1)
        assert fake_host.response_to(1)[1]["result"] == 42

    run(scenario())


def test_unserialisable_and_oversized_results(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents(), max_frame_bytes=4096):
            fake_host.call(1, 1, "calc", "unserialisable")
            fake_host.call(1, 2, "calc", "big", {"n": 5000})
            fake_host.call(1, 3, "calc", "big", {"n": 4000})
            await fake_host.wait_sent(3)
        error = error_of(fake_host, 1)
        assert error["code"] == INTERNAL_ERROR and "not JSON-serialisable" in error["message"]
        error = error_of(fake_host, 2)
        assert error["code"] == FRAME_TOO_LARGE and error["data"] == {"limit": 4096}
        assert len(fake_host.response_to(3)[1]["result"]) == 4000

    run(scenario())


def test_notifications_and_sessions(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()) as runtime:
            fake_host.session_up(1, "a:1")
            fake_host.session_up(2, "[::1]:2")
            fake_host.inject(1, {"v": "1", "method": "something.else", "params": {}})
            fake_host.inject(1, {"v": "1", "method": "bundle.call",
                                 "params": {"agent": "hello", "method": "greet", "params": {"name": "n"}}})
            fake_host.inject(1, {"v": "1", "method": "host.session", "params": {"session": "x"}})
            fake_host.call(1, 1, "calc", "add", {"a": 1})
            await fake_host.wait_sent(1)
            sessions = runtime.stats()["sessions"]
            assert [(s["id"], s["endpoint"]) for s in sessions] == [(1, "a:1"), (2, "[::1]:2")]
            fake_host.session_down(1, "timeout")
            fake_host.call(2, 2, "calc", "add", {"a": 1})
            await fake_host.wait_sent(2)
            assert [s["id"] for s in runtime.stats()["sessions"]] == [2]
            assert runtime.stats()["host"]["sessions"][0]["id"] == 2
        assert [msg["id"] for _, msg in fake_host.sent_messages()] == [1, 2]  # notifications got no reply

    run(scenario())


def test_bad_lines_are_dropped(fake_host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()) as runtime:
            fake_host.inject_raw(b"1 {not json\n")
            fake_host.inject_raw(b"no-session-prefix\n")
            fake_host.inject_raw(b" {}\n")
            fake_host.inject_raw(b"1 [1,2]\n")
            fake_host.inject_raw(b"1 \xff\xfe\n")
            fake_host.inject(1, {"v": "1", "id": None, "result": 1})  # response to nothing
            fake_host.inject(1, {"v": "1", "id": None, "error": {"code": -32700, "message": "bad frame"}})
            fake_host.inject(1, {"v": "2", "id": 7, "method": "bundle.call", "params": {}})
            fake_host.inject(1, {"v": "1", "id": 8, "method": "bundle.call", "params": []})
            fake_host.call(1, 9, "hello", "greet", {"name": "still here"})
            await fake_host.wait_sent(3)
            assert runtime.stats()["lines_dropped"] == 5
        assert error_of(fake_host, 7)["code"] == VERSION_MISMATCH
        assert error_of(fake_host, 8)["code"] == INVALID_REQUEST
        assert fake_host.response_to(9)[1]["result"] == "Hello, still here!"

    with caplog.at_level(logging.DEBUG, logger="pyagent.runtime"):
        run(scenario())
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("line.dropped") == 5
    assert "bridge.line.invalid" in events and "protocol.error" in events


def test_partial_lines_are_joined(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, agents()):
            line = (b'1 {"v":"1","id":1,"method":"bundle.call",'
                    b'"params":{"agent":"calc","method":"add","params":{"a":1}}}\n')
            fake_host.inject_raw(line[:20])
            await asyncio.sleep(0.01)
            fake_host.inject_raw(line[20:])
            await fake_host.wait_sent(1)
        assert fake_host.response_to(1)[1]["result"] == 1

    run(scenario())


def test_shutdown_answers_calls_in_flight(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with running(fake_host, agents(), max_concurrent_calls=2):
            for i in range(5):  # 2 running, 3 waiting for the semaphore
                fake_host.call(1, i, "calc", "forever")
            await asyncio.sleep(0.05)
            assert fake_host.sent == []
            started = loop.time()
        assert loop.time() - started < 1.0
        assert fake_host.stopped and fake_host.stop_timeout_ms == 2000
        for i in range(5):
            error = error_of(fake_host, i)
            assert error["code"] == AGENT_UNAVAILABLE and "shutting down" in error["message"]

    run(scenario())


def test_dispatcher_refuses_calls_once_stopping() -> None:
    sent: list[tuple[int, bytes]] = []

    async def scenario() -> None:
        dispatcher = Dispatcher(agents(), lambda s, p: sent.append((s, p)))
        await dispatcher.shutdown(0.1)
        dispatcher.handle_line(3, b'{"v":"1","id":1,"method":"bundle.call","params":{"agent":"calc","method":"add",'
                                  b'"params":{"a":1}}}')

    run(scenario())
    assert sent == [(3, b'{"v":"1","id":1,"error":{"code":-32003,"message":"the agent is shutting down"}}')]
