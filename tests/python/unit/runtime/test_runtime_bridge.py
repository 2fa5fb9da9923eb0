"""pyagent.runtime._bridge and FakeHost: framing, batching, errors at the boundary."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from runtime_helpers import host_config, run

from pyagent.runtime import Bridge, FakeHost, FakeHostError, HostError


def test_batches_one_send_per_iteration(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        bridge = Bridge(fake_host, asyncio.get_running_loop(), lambda s, p: None)
        bridge.start(json.dumps(host_config()))
        for i in range(1000):
            bridge.send(i % 3, b'{"n":%d}' % i)
        assert fake_host.send_calls == 0  # nothing crosses until the loop turns
        await asyncio.sleep(0)
        assert fake_host.send_calls == 1
        bridge.send(0, b"{}")
        await asyncio.sleep(0)
        assert fake_host.send_calls == 2
        bridge.stop(100)

    run(scenario())
    messages = fake_host.sent_messages()
    assert len(messages) == 1001 and messages[5] == (2, {"n": 5})


def test_lines_from_another_thread(fake_host: FakeHost) -> None:
    received: list[tuple[int, bytes]] = []

    async def scenario() -> None:
        bridge = Bridge(fake_host, asyncio.get_running_loop(), lambda s, p: received.append((s, p)))
        bridge.start(json.dumps(host_config()))
        bridge.attach()

        def produce() -> None:
            for i in range(500):
                fake_host.inject(i % 4 + 1, {"i": i})

        thread = threading.Thread(target=produce)
        thread.start()
        while len(received) < 500:
            await asyncio.sleep(0.001)
        thread.join()
        bridge.stop(100)

    run(scenario())
    assert [json.loads(p)["i"] for _, p in received] == list(range(500))
    assert fake_host.recv_calls < 500


def test_send_failure_is_logged_not_raised(fake_host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        bridge = Bridge(fake_host, asyncio.get_running_loop(), lambda s, p: None)
        bridge.start(json.dumps(host_config()))
        bridge.send(1, b"not json\nsmuggled")  # FakeHost refuses malformed lines like the C side would
        await asyncio.sleep(0)
        assert bridge.stats()["dropped_out"] == 1
        bridge.stop(100)
        bridge.send(1, b"{}")  # after stop: dropped
        assert bridge.stats()["dropped_out"] == 2

    with caplog.at_level(logging.ERROR, logger="pyagent.runtime"):
        run(scenario())
    assert [getattr(r, "event", None) for r in caplog.records] == ["bridge.send.failed"]
    assert fake_host.sent == []


def test_start_errors_are_translated(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        bridge = Bridge(fake_host, asyncio.get_running_loop(), lambda s, p: None)
        with pytest.raises(HostError, match="config: missing 'hello'"):
            bridge.start(json.dumps({k: v for k, v in host_config().items() if k != "hello"}))

    run(scenario())


@pytest.mark.parametrize(("config", "message"), [
    ({"extra": 1}, "unknown keys"),
    ({"endpoints": []}, "no endpoints"),
    ({"endpoints": [{"host": "a", "port": 1}]}, "bad endpoint"),
    ({"max_frame_bytes": True}, "'max_frame_bytes' has the wrong type"),
    ({"hello": {"token": "x"}}, "must not carry the token"),
])
def test_fake_host_checks_the_config(fake_host: FakeHost, config: dict[str, object], message: str) -> None:
    with pytest.raises(FakeHostError, match=message):
        fake_host.start(json.dumps(host_config(**config)))


def test_fake_host_checks_sends(fake_host: FakeHost) -> None:
    with pytest.raises(FakeHostError, match="not running"):
        fake_host.send(b'1 {}\n')
    fake_host.start(json.dumps(host_config()))
    for bad in (b'1 {}', b'x {}\n', b'01 {}\n', b'1 []\n'):
        with pytest.raises(FakeHostError):
            fake_host.send(bad)
    with pytest.raises(FakeHostError):
        fake_host.send('1 {}\n')  # type: ignore[arg-type]
    fake_host.send(b'0 {}\n12 {"a":1}\n')
    assert fake_host.sent_messages() == [(0, {}), (12, {"a": 1})]
    assert fake_host.stats() == {"sessions": [], "queued_bytes": 0, "dropped_lines": 0}
