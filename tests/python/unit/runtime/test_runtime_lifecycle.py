"""Runtime lifecycle: init/fini, start/stop of the host, shutdown bounds, and requests the runtime sends."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from runtime_helpers import host_config, run, running

from pyagent.protocol import RemoteError
from pyagent.runtime import (
    Agent,
    FakeHost,
    HostError,
    MessageTooLargeError,
    RequestTimeoutError,
    Runtime,
    RuntimeStoppedError,
    method,
)


class Recorder(Agent):
    """Appends its lifecycle to a shared journal; `fail_init`/`hang_init`/`fail_fini`/`hang_fini` misbehave."""

    def __init__(self, journal: list[str], host: FakeHost | None = None, *, fail_init: bool = False,
                 hang_init: bool = False, fail_fini: bool = False, hang_fini: bool = False) -> None:
        super().__init__()
        self.journal = journal
        self.host = host
        self.fail_init, self.hang_init = fail_init, hang_init
        self.fail_fini, self.hang_fini = fail_fini, hang_fini

    async def init(self) -> None:
        self.journal.append(f"init {self.name} host_started={self.host.started if self.host else None}")
        await asyncio.sleep(0)
        if self.fail_init:
            raise RuntimeError("init failed half-way")
        if self.hang_init:
            await asyncio.sleep(3600)

    async def fini(self) -> None:
        self.journal.append(f"fini {self.name} host_stopped={self.host.stopped if self.host else None}")
        if self.fail_fini:
            raise RuntimeError("fini failed")
        if self.hang_fini:
            await asyncio.sleep(3600)

    @method
    def ping(self) -> str:
        return "pong"


def named(agent: Agent, name: str) -> Agent:
    agent._pyagent_bind(name)
    return agent


def test_init_before_start_fini_before_stop(fake_host: FakeHost) -> None:
    journal: list[str] = []

    async def scenario() -> None:
        agents = {n: named(Recorder(journal, fake_host), n) for n in ("a", "b")}
        async with running(fake_host, agents):
            assert fake_host.started
            journal.append("running")

    run(scenario())
    assert journal == ["init a host_started=False", "init b host_started=False", "running",
                       "fini b host_stopped=False", "fini a host_stopped=False"]
    assert fake_host.stopped and fake_host.stop_timeout_ms == 2000


def test_failed_init_ends_the_run_and_fini_is_still_called(fake_host: FakeHost) -> None:
    journal: list[str] = []
    agents = {"a": named(Recorder(journal), "a"), "b": named(Recorder(journal, fail_init=True), "b"),
              "c": named(Recorder(journal), "c")}

    async def scenario() -> int:
        return await Runtime(fake_host, agents, host_config()).run(install_signals=False)

    assert run(scenario()) == 1
    # c was never initialised, so it is not finalised; b failed half-way and is.
    assert [j.split(" host")[0] for j in journal] == ["init a", "init b", "fini b", "fini a"]
    assert not fake_host.started


def test_stop_during_init(fake_host: FakeHost) -> None:
    journal: list[str] = []
    agents = {"a": named(Recorder(journal, hang_init=True), "a")}

    async def scenario() -> int:
        runtime = Runtime(fake_host, agents, host_config())
        task = asyncio.create_task(runtime.run(install_signals=False))
        await asyncio.sleep(0.02)
        runtime.stop()
        return await asyncio.wait_for(task, 2)

    assert run(scenario()) == 0
    assert [j.split(" host")[0] for j in journal] == ["init a", "fini a"]
    assert not fake_host.started


def test_stop_before_run(fake_host: FakeHost) -> None:
    async def scenario() -> int:
        runtime = Runtime(fake_host, {}, host_config())
        runtime.stop()
        return await runtime.run(install_signals=False)

    assert run(scenario()) == 0


def test_fini_failures_and_hangs_are_bounded(fake_host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    journal: list[str] = []
    agents = {"a": named(Recorder(journal, fail_fini=True), "a"), "b": named(Recorder(journal, hang_fini=True), "b")}

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        async with running(fake_host, agents):
            started = loop.time()
        return loop.time() - started

    elapsed = run(scenario())
    assert elapsed < 1.5  # FINI_TIMEOUT is 0.6 s for all hooks together
    assert [j.split(" host")[0] for j in journal][-2:] == ["fini b", "fini a"]
    assert fake_host.stopped
    events = {getattr(r, "event", None) for r in caplog.records}
    assert {"agent.fini.timeout", "agent.fini.failed"} <= events


def test_host_refusing_the_config(caplog: pytest.LogCaptureFixture) -> None:
    journal: list[str] = []

    async def scenario() -> None:
        with FakeHost(start_error="ca_file: no such file") as host:
            runtime = Runtime(host, {"a": named(Recorder(journal), "a")}, host_config())
            with pytest.raises(HostError, match="the host refused the configuration: ca_file: no such file"):
                await runtime.run(install_signals=False)
            assert not host.stopped  # never started, so never stopped

    run(scenario())
    assert [j.split(" host")[0] for j in journal] == ["init a", "fini a"]


def test_config_json_reaches_the_host(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, {}):
            pass

    run(scenario())
    assert fake_host.config == json.loads(json.dumps(host_config()))


def test_replies_queued_at_stop_are_flushed_before_host_stop(fake_host: FakeHost) -> None:
    sent_before_stop: list[int] = []
    original_stop = fake_host.stop

    def stop(timeout_ms: int) -> None:
        sent_before_stop.append(len(fake_host.sent_messages()))
        original_stop(timeout_ms)

    fake_host.stop = stop  # type: ignore[method-assign]

    async def scenario() -> None:
        async with running(fake_host, {"a": named(Recorder([]), "a")}) as runtime:
            runtime.notify("agent.event", {"n": 1})  # buffered, flushed on the next iteration... or at stop

    run(scenario())
    assert sent_before_stop == [1]
    assert fake_host.sent_messages() == [(0, {"v": "1", "method": "agent.event", "params": {"n": 1}})]


def test_request_round_trip_on_session_zero(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        async with running(fake_host, {}) as runtime:
            task = asyncio.create_task(runtime.request("registry.lookup", {"name": "x"}, timeout=5))
            [(session, msg)] = await fake_host.wait_sent(1)
            assert session == 0
            assert msg == {"v": "1", "id": msg["id"], "method": "registry.lookup", "params": {"name": "x"}}
            fake_host.inject(3, {"v": "1", "id": msg["id"] + 1000, "result": "not mine"})  # ignored
            fake_host.inject(3, {"v": "1", "id": msg["id"], "result": {"found": True}})
            assert await task == {"found": True}

            task = asyncio.create_task(runtime.request("registry.lookup"))
            msgs = await fake_host.wait_sent(2)
            fake_host.inject(1, {"v": "1", "id": msgs[1][1]["id"], "error": {"code": -32003, "message": "gone"}})
            with pytest.raises(RemoteError) as info:
                await task
            assert info.value.code == -32003 and info.value.message == "gone"

            with pytest.raises(RequestTimeoutError, match="registry.lookup: no response within 0.05 s"):
                await runtime.request("registry.lookup", timeout=0.05)
            assert runtime.stats()["requests_pending"] == 0

            with pytest.raises(MessageTooLargeError):
                await runtime.request("x", {"blob": "x" * (2 << 20)})

    run(scenario())


def test_pending_requests_fail_at_shutdown(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        task: asyncio.Task[Any] | None = None
        async with running(fake_host, {}) as runtime:
            task = asyncio.create_task(runtime.request("slow.thing", timeout=30))
            await fake_host.wait_sent(1)
        with pytest.raises(RuntimeStoppedError):
            await task
        with pytest.raises(RuntimeStoppedError):
            await runtime.request("after.stop")

    run(scenario())


def test_request_before_start_is_refused(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        runtime = Runtime(fake_host, {}, host_config())
        with pytest.raises(RuntimeStoppedError):
            await runtime.request("x")

    run(scenario())
