"""The agent's local allow-list (`_allow.py`): config parsing, defaults, and enforcement in the dispatcher for every
path a remote operation can take (a request of its own, or `bundle.call` with `method: "agent.…"`). Also the
renewal schedule of `_renew.py` against a stand-in `pyagent-host enroll`."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import run, running

from pyagent.protocol import METHOD_NOT_FOUND, NOT_ALLOWED, RemoteError
from pyagent.runtime import Agent, ConfigError, FakeHost, load_config, method
from pyagent.runtime._allow import DEFAULTS, KINDS, AllowList, kind_of
from pyagent.runtime._renew import RenewError, Renewer, renewal_due

WriteConfig = Callable[[str], Path]


class Thing(Agent):
    @method
    def ping(self) -> str:
        return "pong"


def reply(host: FakeHost, msg_id: int) -> dict[str, Any]:
    return host.response_to(msg_id)[1]


async def wait_reply(host: FakeHost, msg_id: int) -> dict[str, Any]:
    for _ in range(500):
        try:
            return reply(host, msg_id)
        except KeyError:
            await asyncio.sleep(0.005)
    raise AssertionError(f"no reply to request {msg_id}")


# --- config ---

def test_defaults_are_safe(write_config: WriteConfig) -> None:
    config = load_config(write_config('endpoints = ["ep:1"]\nca = "ca.pem"\n'), environ={})
    assert config.allow.as_dict() == dict(DEFAULTS)
    assert config.allow.permits("call") and config.allow.permits("read") and config.allow.permits("control")
    for risky in ("config", "lifecycle", "packages", "tunnels"):
        assert not config.allow.permits(risky)


def test_allow_table(write_config: WriteConfig) -> None:
    config = load_config(write_config("""\
        endpoints = ["ep:1"]
        ca = "ca.pem"
        [allow]
        call = false
        config = true
        lifecycle = true
        packages = false
        """), environ={})
    assert config.allow.as_dict() == {**DEFAULTS, "call": False, "config": True, "lifecycle": True}


@pytest.mark.parametrize(("table", "message"), [
    ("shell = true", "unknown key 'allow.shell'"),
    ('config = "yes"', "key 'allow.config' must be true or false, got str"),
    ("packages = true", "key 'allow.packages': remote package management does not exist in this version"),
    ("tunnels = true", "key 'allow.tunnels': remote tunnels does not exist"),
])
def test_bad_allow_table_names_the_key(write_config: WriteConfig, table: str, message: str) -> None:
    path = write_config(f'endpoints = ["ep:1"]\nca = "ca.pem"\n[allow]\n{table}\n')
    with pytest.raises(ConfigError, match="agent.toml") as info:
        load_config(path, environ={})
    assert message in str(info.value)


def test_allow_must_be_a_table(write_config: WriteConfig) -> None:
    with pytest.raises(ConfigError, match="key 'allow' must be a table"):
        load_config(write_config('endpoints = ["ep:1"]\nca = "ca.pem"\nallow = true\n'), environ={})


def test_every_kind_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[4] / "docs" / "security.md").read_text()
    for kind in KINDS:
        assert f"| `{kind}` |" in doc, f"allow-list kind {kind} is not in docs/security.md"


def test_kinds_of_methods() -> None:
    assert kind_of("bundle.call") == "call"
    assert kind_of("agent.config.set") == "config" and kind_of("agent.config.get") == "read"
    assert kind_of("agent.stop") == "lifecycle" and kind_of("agent.pause") == "control"
    assert kind_of("package.install") == "packages" and kind_of("tunnel.open") == "tunnels"
    assert kind_of("something.else") is None


# --- enforcement ---

def test_refusals_on_every_path(fake_host: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        thing = Thing()
        thing._pyagent_bind("thing")
        async with running(fake_host, {"thing": thing}, allow=AllowList()) as runtime:
            fake_host.inject(1, {"v": "1", "id": 1, "method": "agent.config.set",
                                 "params": {"agent": "thing", "values": {}}})
            fake_host.call(1, 2, "thing", "agent.config.set", {"values": {}})  # the same, through bundle.call
            fake_host.inject(1, {"v": "1", "id": 3, "method": "agent.stop", "params": {}})
            fake_host.call(1, 4, "thing", "agent.restart")
            fake_host.inject(1, {"v": "1", "id": 5, "method": "package.install", "params": {"name": "x"}})
            fake_host.inject(1, {"v": "1", "id": 6, "method": "tunnel.open", "params": {}})
            # Allowed by default: calls, reads, pause/resume.
            fake_host.call(1, 7, "thing", "ping")
            fake_host.inject(1, {"v": "1", "id": 8, "method": "agent.status", "params": {"agent": "thing"}})
            fake_host.inject(1, {"v": "1", "id": 9, "method": "agent.pause", "params": {"agent": "thing"}})
            fake_host.inject(1, {"v": "1", "id": 10, "method": "agent.resume", "params": {"agent": "thing"}})
            fake_host.inject(1, {"v": "1", "id": 11, "method": "no.such", "params": {}})
            replies = {i: await wait_reply(fake_host, i) for i in range(1, 12)}
            for i, kind, method_name in ((1, "config", "agent.config.set"), (2, "config", "agent.config.set"),
                                         (3, "lifecycle", "agent.stop"), (4, "lifecycle", "agent.restart"),
                                         (5, "packages", "package.install"), (6, "tunnels", "tunnel.open")):
                err = replies[i]["error"]
                assert err["code"] == NOT_ALLOWED, (i, err)
                assert err["data"] == {"kind": kind, "method": method_name}
                assert f"kind '{kind}'" in err["message"] and "not allowed" in err["message"]
            assert "[allow]" in replies[1]["error"]["message"]
            assert "does not offer" in replies[5]["error"]["message"]
            assert replies[7]["result"] == "pong"
            assert replies[8]["result"]["state"] == "running"
            assert replies[9]["result"]["state"] == "paused" and replies[10]["result"]["state"] == "running"
            assert replies[11]["error"]["code"] == METHOD_NOT_FOUND
            stats = runtime.stats()
            assert stats["calls_not_allowed"] == 6 and stats["allow"]["config"] is False
            # The worker did not stop: agent.stop was refused.
            assert not runtime._stop_requested

    with caplog.at_level(logging.WARNING, logger="pyagent.runtime"):
        run(scenario())
    refused = [r for r in caplog.records if getattr(r, "event", "") == "call.not_allowed"]
    assert len(refused) == 6
    assert "refused thing.agent.config.set" in refused[1].getMessage()


def test_call_kind_off_refuses_bundle_methods(fake_host: FakeHost) -> None:
    async def scenario() -> None:
        thing = Thing()
        thing._pyagent_bind("thing")
        async with running(fake_host, {"thing": thing}, allow=AllowList.from_table({"call": False})):
            fake_host.call(1, 1, "thing", "ping")
            fake_host.call(1, 2, "thing", "agent.status")  # a read, not a call
            assert (await wait_reply(fake_host, 1))["error"]["code"] == NOT_ALLOWED
            assert (await wait_reply(fake_host, 2))["result"]["agent"] == "thing"

    run(scenario())


def test_remote_config_cannot_change_the_allow_list(fake_host: FakeHost) -> None:
    """agent.config.set (when allowed) changes agent objects' fields only; `allow` is no agent object."""
    async def scenario() -> None:
        thing = Thing()
        thing._pyagent_bind("thing")
        allow = AllowList.from_table({"config": True})
        async with running(fake_host, {"thing": thing}, allow=allow) as runtime:
            fake_host.inject(1, {"v": "1", "id": 1, "method": "agent.config.set",
                                 "params": {"agent": "allow", "values": {"lifecycle": True}}})
            assert (await wait_reply(fake_host, 1))["error"]["code"] != NOT_ALLOWED
            fake_host.inject(1, {"v": "1", "id": 2, "method": "agent.stop", "params": {}})
            assert (await wait_reply(fake_host, 2))["error"]["code"] == NOT_ALLOWED
            assert runtime.stats()["allow"]["lifecycle"] is False

    run(scenario())


# --- renewal schedule (a stand-in for `pyagent-host enroll`) ---

FAKE_ENROLL = textwrap.dedent("""\
    import json, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    state = Path(args[args.index("--state-dir") + 1])
    log = state / "calls.log"
    log.open("a").write(args[0] + "\\n")
    if args[0] == "--new-key":
        print("-----BEGIN CERTIFICATE REQUEST-----\\nx\\n-----END CERTIFICATE REQUEST-----")
    elif args[0] == "--install":
        result = json.load(sys.stdin)
        now = int(time.time() * 1000)
        info = {"serial": result["serial"], "not_before": now, "not_after": now + 600, "received": now}
        (state / "agent.crt.json").write_text(json.dumps(info))
        print(json.dumps(info))
    elif args[0] == "--cert-info":
        now = int(time.time() * 1000)
        info = {"serial": "s0", "not_before": now, "not_after": now + 300, "received": now}
        (state / "agent.crt.json").write_text(json.dumps(info))
    sys.exit(0)
    """)


def test_renewal_at_two_thirds_and_retry(tmp_path: Path) -> None:
    fake = tmp_path / "fake_enroll.py"
    fake.write_text(FAKE_ENROLL)
    (tmp_path / "agent.crt").write_text("cert")
    sent: list[dict[str, Any]] = []
    fail_next = [True]

    async def request(method_name: str, params: Any, timeout: float) -> Any:
        assert method_name == "enroll.renew" and "BEGIN CERTIFICATE REQUEST" in params["csr"]
        sent.append(dict(params))
        if fail_next[0]:
            fail_next[0] = False
            raise RemoteError(-32000, "unauthorized: try later")
        return {"agent_id": "a", "certificate": "c", "serial": f"s{len(sent)}"}

    async def scenario() -> Renewer:
        renewer = Renewer(tmp_path, [sys.executable, str(fake)])
        task = asyncio.create_task(renewer.run(request, lambda: True))
        # No agent.crt.json: --cert-info writes it (300 ms lifetime, renewal at ~200 ms); the first attempt fails
        # and is retried after RETRY_MIN_S; then one renewal per 600 ms certificate.
        for _ in range(800):
            if renewer.renewals >= 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait({task})
        return renewer

    renewer = run(scenario())
    assert renewer.failures == 1 and renewer.renewals >= 2
    calls = (tmp_path / "calls.log").read_text().split()
    assert calls[0] == "--cert-info" and calls.count("--new-key") == len(sent) and "--install" in calls
    assert json.loads((tmp_path / "agent.crt.json").read_text())["serial"] == f"s{len(sent)}"


def test_renewal_due_and_bad_info() -> None:
    assert renewal_due({"received": 0, "not_after": 3000}) == 2.0
    with pytest.raises(RenewError, match="must be integers"):
        renewal_due({"received": "x", "not_after": 1})
