"""The agent API of issue 6 through a real Runtime over FakeHost: typed config, schema-checked calls, control
actions, periodic tasks, events and the outbox, SharedService, describe, and the example bundles."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest
from runtime_helpers import REPO, run, running

from pyagent.protocol import INVALID_PARAMS
from pyagent.runtime import (
    AGENT_PAUSED,
    EXIT_RESTART,
    Agent,
    FakeHost,
    Outbox,
    Runtime,
    SharedService,
    describe,
    expo,
    gamma,
    load_bundle,
    method,
    minmax,
    pareto,
    periodic,
    setting,
)
from pyagent.runtime._agentconfig import ConfigValueError, apply_config


class Thing(Agent):
    """A test agent."""

    capabilities = ("test", "Web")
    max_concurrent_calls = 4

    interval: float = setting(10.0, ge=0.1, help="seconds")
    mode: Literal["fast", "slow"] = setting("fast")
    lo: int = setting(1, ge=0)
    hi: int = setting(5, ge=0)

    def __init__(self) -> None:
        super().__init__()
        self.inits = self.finis = 0
        self.ticks = 0
        self.inside = 0
        self.peak = 0

    def confirm_config(self, values: Any) -> None:
        if values["lo"] > values["hi"]:
            raise ValueError("lo must not exceed hi")

    async def init(self) -> None:
        self.inits += 1

    async def fini(self) -> None:
        self.finis += 1

    @method
    def add(self, a: int, b: Annotated[int, msgspec.Meta(ge=0)] = 0) -> int:
        """Add two numbers."""
        return a + b

    @method(exclusive=True)
    async def one_at_a_time(self) -> int:
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        await asyncio.sleep(0.01)
        self.inside -= 1
        return self.peak

    @method
    def shout(self, event: str) -> None:
        self.emit(event, {"n": 1})

    @periodic(0.01)
    def tick(self) -> None:
        self.ticks += 1


def obj(host: FakeHost, msg_id: int) -> dict[str, Any]:
    return host.response_to(msg_id)[1]


async def control(host: FakeHost, msg_id: int, method_name: str, params: dict[str, Any]) -> dict[str, Any]:
    host.inject(1, {"v": "1", "id": msg_id, "method": method_name, "params": params})
    for _ in range(500):
        try:
            return obj(host, msg_id)
        except KeyError:
            await asyncio.sleep(0.005)
    raise AssertionError(f"no reply to {method_name}")


async def call(host: FakeHost, msg_id: int, agent: str, name: str, params: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    host.call(1, msg_id, agent, name, params)
    for _ in range(500):
        try:
            return obj(host, msg_id)
        except KeyError:
            await asyncio.sleep(0.005)
    raise AssertionError(f"no reply to {agent}.{name}")


# --- typed config ---

def test_config_defaults_validation_and_confirm() -> None:
    t = Thing()
    assert t.interval == 10.0 and dict(t.config) == {"interval": 10.0, "mode": "fast", "lo": 1, "hi": 5}
    assert apply_config(t, {"interval": 2}, "thing")["interval"] == 2.0  # an int is accepted for a float
    with pytest.raises(ConfigValueError, match="config field 'interval': Expected `float` >= 0.1") as info:
        apply_config(t, {"interval": 0.0}, "thing")
    assert info.value.field == "interval"
    with pytest.raises(ConfigValueError, match="config field 'mode'"):
        apply_config(t, {"mode": "medium"}, "thing")
    with pytest.raises(ConfigValueError, match=r"unknown config field 'intervall' \(did you mean 'interval'\?\)"):
        apply_config(t, {"intervall": 1}, "thing")
    with pytest.raises(ConfigValueError, match="confirm_config: lo must not exceed hi"):
        apply_config(t, {"lo": 9}, "thing")
    assert t.interval == 2.0 and t.lo == 1  # the refused changes left the config alone
    with pytest.raises(AttributeError, match="read-only"):
        t.interval = 3.0


def test_bad_default_and_reserved_name_are_refused_at_class_level() -> None:
    from pyagent.runtime._agentconfig import config_spec

    class BadDefault(Agent):
        n: int = setting(-1, ge=0)

    with pytest.raises(TypeError, match="BadDefault.n: the default -1 is invalid"):
        config_spec(BadDefault)

    class Reserved(Agent):
        name: str = setting("x")  # type: ignore[assignment]

    with pytest.raises(TypeError, match="'name' is reserved"):
        config_spec(Reserved)


def test_live_config_set_and_get(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        thing = Thing()
        thing._pyagent_bind("thing")
        async with running(fake_host, {"thing": thing}):
            ok = await control(fake_host, 1, "agent.config.set", {"agent": "thing", "values": {"interval": 0.5}})
            assert ok["result"]["values"]["interval"] == 0.5
            bad = await control(fake_host, 2, "agent.config.set",
                                {"agent": "thing", "values": {"interval": 0.2, "mode": "warp"}})
            assert bad["error"]["code"] == INVALID_PARAMS
            assert "config field 'mode'" in bad["error"]["message"]
            assert bad["error"]["data"] == {"parameter": "values.mode", "field": "mode"}
            got = await control(fake_host, 3, "agent.config.get", {"agent": "thing"})
            assert got["result"]["values"] == {"interval": 0.5, "mode": "fast", "lo": 1, "hi": 5}
            # also through bundle.call
            via_call = await call(fake_host, 4, "thing", "agent.config.get")
            assert via_call["result"] == got["result"]

    run(scenario())


# --- methods ---

def test_call_params_are_checked_and_name_the_field(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        thing = Thing()
        thing._pyagent_bind("thing")
        async with running(fake_host, {"thing": thing}):
            assert (await call(fake_host, 1, "thing", "add", {"a": 1, "b": 2}))["result"] == 3
            wrong = (await call(fake_host, 2, "thing", "add", {"a": "1"}))["error"]
            assert wrong["code"] == INVALID_PARAMS and "parameter 'a' must be int, got str" in wrong["message"]
            assert wrong["data"] == {"parameter": "a", "expected": "int"}
            neg = (await call(fake_host, 3, "thing", "add", {"a": 1, "b": -1}))["error"]
            assert neg["code"] == INVALID_PARAMS and neg["data"]["parameter"] == "b"
            assert "parameter 'b' is invalid: Expected `int` >= 0" in neg["message"]
            results = await asyncio.gather(*(call(fake_host, 10 + i, "thing", "one_at_a_time") for i in range(5)))
            assert [r["result"] for r in results] == [1] * 5

    run(scenario())


# --- control ---

def test_pause_resume_status(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        thing = Thing()
        thing._pyagent_bind("thing")
        async with running(fake_host, {"thing": thing}):
            for _ in range(200):
                if thing.ticks >= 2:
                    break
                await asyncio.sleep(0.01)
            assert thing.ticks >= 2
            assert (await control(fake_host, 1, "agent.pause", {"agent": "thing"}))["result"]["state"] == "paused"
            ticks = thing.ticks
            refused = (await call(fake_host, 2, "thing", "add", {"a": 1}))["error"]
            assert refused["code"] == AGENT_PAUSED and "paused" in refused["message"]
            await asyncio.sleep(0.08)
            assert thing.ticks == ticks  # periodic tasks stopped
            status = (await control(fake_host, 3, "agent.status", {"agent": "thing"}))["result"]
            assert status["state"] == "paused" and status["periodic"][0]["name"] == "tick"
            assert (await control(fake_host, 4, "agent.resume", {"agent": "thing"}))["result"]["state"] == "running"
            assert (await call(fake_host, 5, "thing", "add", {"a": 1}))["result"] == 1
            for _ in range(200):
                if thing.ticks > ticks:
                    break
                await asyncio.sleep(0.01)
            assert thing.ticks > ticks
            unknown = await control(fake_host, 6, "agent.status", {"agent": "nobody"})
            assert "no agent object 'nobody'" in unknown["error"]["message"]

    run(scenario())


@pytest.mark.parametrize(("action", "code"), [("agent.stop", 0), ("agent.restart", EXIT_RESTART)])
def test_stop_and_restart_exit_codes_and_fini(fake_host: FakeHost, action: str, code: int) -> None:
    async def scenario() -> None:
        thing = Thing()
        thing._pyagent_bind("thing")
        from runtime_helpers import host_config

        runtime = Runtime(fake_host, {"thing": thing}, host_config())
        task = asyncio.create_task(runtime.run(install_signals=False))
        await runtime.wait_started()
        fake_host.inject(1, {"v": "1", "id": 1, "method": action, "params": {}})
        assert await asyncio.wait_for(task, 5) == code
        assert obj(fake_host, 1)["result"]["exit_code"] == code
        assert thing.inits == 1 and thing.finis == 1

    run(scenario())


def test_fini_runs_after_a_failed_init(fake_host: FakeHost) -> None:
    class Half(Thing):
        async def init(self) -> None:
            self.inits += 1
            raise RuntimeError("half-way")

    async def scenario() -> None:
        half = Half()
        half._pyagent_bind("half")
        from runtime_helpers import host_config

        assert await Runtime(fake_host, {"half": half}, host_config()).run(install_signals=False) == 1
        assert half.inits == 1 and half.finis == 1

    run(scenario())


# --- events and the outbox ---

def test_outbox_survives_a_restart_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.jsonl"

    async def scenario() -> None:
        box = Outbox(path, max_events=3)
        for i in range(5):
            box.put("a", "e", i)
        assert [e["data"] for e in box.pending()] == [2, 3, 4] and box.dropped_unreported == 2
        box.close()
        with open(path, "a") as f:
            f.write('{"seq": 99, "agent"')  # a torn last line
        again = Outbox(path, max_events=3)
        assert [e["data"] for e in again.pending()] == [2, 3, 4] and again.dropped_unreported == 2
        batch = again.next_batch()
        assert batch is not None and batch["dropped"] == 2 and [e["seq"] for e in batch["events"]] == [3, 4, 5]
        again.ack(4, 2)
        assert again.put("a", "e", 5) == 6
        again.close()
        third = Outbox(path, max_events=3)
        assert [(e["seq"], e["data"]) for e in third.pending()] == [(5, 4), (6, 5)]
        assert third.dropped_unreported == 0
        third.close()

    run(scenario())


def test_events_are_delivered_with_acks_after_a_worker_restart(fake_host: FakeHost, tmp_path: Path) -> None:
    async def scenario() -> None:
        from runtime_helpers import host_config

        async def one_run(host: FakeHost, emit: list[str], ack: bool) -> list[dict[str, Any]]:
            thing = Thing()
            thing._pyagent_bind("thing")
            runtime = Runtime(host, {"thing": thing}, host_config(), state_dir=tmp_path)
            task = asyncio.create_task(runtime.run(install_signals=False))
            await runtime.wait_started()
            for name in emit:
                thing.emit(name, {"n": name})
            host.session_up(1)
            batches: list[dict[str, Any]] = []
            for _ in range(400):
                batches = [m for _, m in host.sent_messages() if m.get("method") == "event.batch"]
                if batches:
                    break
                await asyncio.sleep(0.005)
            assert batches, "no event.batch sent"
            first = batches[0]
            if ack:
                host.inject(1, {"v": "1", "id": first["id"],
                                "result": {"acked": first["params"]["events"][-1]["seq"]}})
                for _ in range(200):
                    if len(runtime.outbox) == 0:
                        break
                    await asyncio.sleep(0.005)
                assert len(runtime.outbox) == 0
            runtime.stop()
            assert await asyncio.wait_for(task, 5) == 0
            return batches

        # First run: two events, the endpoint never acks, the worker stops.
        sent = await one_run(fake_host, ["a", "b"], ack=False)
        assert [e["event"] for e in sent[0]["params"]["events"]] == ["a", "b"]
        # Second run on the same state dir: the same events come first, in order, then the new one.
        with FakeHost() as host2:
            sent2 = await one_run(host2, ["c"], ack=True)
        events = sent2[0]["params"]["events"]
        assert [(e["seq"], e["event"]) for e in events] == [(1, "a"), (2, "b"), (3, "c")]
        with FakeHost() as host3:
            runtime = Runtime(host3, {}, host_config(), state_dir=tmp_path)
            assert len(runtime.outbox) == 0  # acknowledged events are gone for good
            runtime.outbox.close()

    run(scenario())


# --- periodic distributions ---

@pytest.mark.parametrize("dist", [minmax(1, 3), expo(2, cap=10), gamma(2, 1.5, cap=20), pareto(1.5, 0.5, cap=30)])
def test_distributions_stay_within_bounds_and_are_seeded(dist: Any) -> None:
    rng = random.Random(42)
    samples = [dist.sample(rng) for _ in range(5000)]
    lo, hi = dist.bounds()
    assert all(lo <= s <= hi for s in samples)
    assert samples[:20] == [dist.sample(r) for r in [random.Random(42)] for _ in range(20)]
    mean = sum(samples) / len(samples)
    expected = {"minmax": 2.0, "expo": 2.0, "gamma": 3.0, "pareto": 1.5}[dist.describe()["distribution"]]
    assert abs(mean - expected) / expected < 0.15  # statistical, with a fixed seed


def test_distribution_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="hi"):
        minmax(3, 1)
    with pytest.raises(ValueError, match="mean must be a positive number"):
        expo(0)
    with pytest.raises(TypeError, match="@periodic needs"):
        periodic("often")  # type: ignore[arg-type]


def test_periodic_may_return_its_next_interval(fake_host: FakeHost) -> None:
    class Magi(Agent):
        def __init__(self) -> None:
            super().__init__()
            self.times: list[float] = []

        @periodic(3600)
        async def beat(self) -> float:
            self.times.append(asyncio.get_running_loop().time())
            return 0.01

    async def scenario() -> None:
        magi = Magi()
        magi._pyagent_bind("magi")
        async with running(fake_host, {"magi": magi}) as runtime:
            assert magi.times == []
            status = runtime.controller.status("magi")["periodic"][0]
            assert 3590 < status["next_in"] <= 3600

    run(scenario())


# --- SharedService ---

def test_shared_service_starts_once_and_stops_after_the_last_user() -> None:
    async def scenario() -> None:
        svc = SharedService("echo", [sys.executable, "-u", "-c", "import time; print('ready 42'); time.sleep(60)"],
                            ready=r"ready (\d+)")
        matches = await asyncio.gather(svc.acquire(), svc.acquire(), svc.acquire())
        assert svc.starts == 1 and svc.users == 3 and all(m is not None and m.group(1) == "42" for m in matches)
        proc = svc.process
        assert proc is not None and proc.returncode is None
        await svc.release()
        await svc.release()
        assert svc.running
        await svc.release()
        assert not svc.running and proc.returncode is not None
        await svc.release()  # an extra release is ignored
        assert svc.users == 0

    run(scenario())


# --- describe and the example bundles ---

def test_describe_publishes_schemas_help_and_capabilities() -> None:
    thing = Thing()
    thing._pyagent_bind("thing")
    out = describe({"thing": thing})
    json.dumps(out)
    iface = out["agents"]["thing"]
    assert iface["capabilities"] == ["test", "Web"] and iface["help"] == "A test agent."
    add = iface["methods"]["add"]
    assert add["help"] == "Add two numbers." and add["returns"] == {"type": "integer"}
    assert add["params"]["required"] == ["a"] and add["params"]["properties"]["b"]["minimum"] == 0
    assert iface["methods"]["one_at_a_time"]["exclusive"] is True
    interval = iface["config"]["schema"]["properties"]["interval"]
    assert interval == {"type": "number", "minimum": 0.1, "description": "seconds", "default": 10.0}
    assert iface["config"]["schema"]["properties"]["mode"]["enum"] == ["fast", "slow"]
    assert iface["periodic"]["tick"]["interval"] == 0.01


def test_example_bundles(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        agents: dict[str, Agent] = {}
        for name in ("hello", "sysinfo", "traffic", "shared_web"):
            agents.update(load_bundle(REPO / "bundles" / name).agents)
        apply_config(agents["traffic"], {"command": [sys.executable, "-c", "import sys; print(sys.argv[1])",
                                                     "{target}"], "targets": ["x", "y"]}, "traffic")
        async with running(fake_host, agents):
            assert (await call(fake_host, 1, "hello", "greet", {"name": "w"}))["result"] == "Hello, w!"
            snap = (await call(fake_host, 2, "sysinfo", "snapshot"))["result"]
            assert snap["memory"]["total"] > 0 and "/" in snap["disks"]
            runs = (await call(fake_host, 3, "traffic", "run_once"))["result"]
            assert [(r["target"], r["ok"], r["output"].strip()) for r in runs] == [("x", True, "x"), ("y", True, "y")]
            bad = await control(fake_host, 4, "agent.config.set",
                                {"agent": "traffic", "values": {"distribution": "gamma", "params": [1.0]}})
            assert "confirm_config" in bad["error"]["message"]
            assert (await call(fake_host, 5, "web_a", "users"))["result"] == 2
            assert (await call(fake_host, 6, "web_a", "url"))["result"] == \
                (await call(fake_host, 7, "web_b", "url"))["result"]
            assert (await call(fake_host, 8, "web_b", "fetch", {"path": "/"}))["result"] == 200
        from pyagent_bundle_shared_web.web import WEB  # type: ignore[import-not-found]

        assert WEB.users == 0 and not WEB.running

    run(scenario())
