"""The worker's side of updates: `agent.update` (`_update.py`) against a stand-in updater process, the probation's
`healthy` mark, bundle loading from installed versions (`_bundle.py`), and the config keys `upgrades` and
`[supervisor] probation_ms`. The real updater is tested in test_runtime_updater.py."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyagent.protocol import AGENT_BUSY, INVALID_PARAMS, INVALID_REQUEST, NOT_ALLOWED, ProtocolError
from pyagent.runtime._bundle import load_bundles, resolve_bundle_paths
from pyagent.runtime._config import load_config
from pyagent.runtime._control import CONTROL_METHODS, EXIT_UPDATE, Controller
from pyagent.runtime._outbox import Outbox
from pyagent.runtime._update import Updates, parse_offer
from pyagent.runtime.worker import supervisor_settings

OFFER = {"kind": "bundle", "name": "hello", "version": "1.2.0", "target": "bundles/hello/1.2.0.tar.gz",
         "rollout": "r-1"}


def fake_updater(tmp_path: Path, body: str) -> str:
    """An executable standing in for `pyagent-host`; `body` is Python run for `pyagent-host update ...`."""
    exe = tmp_path / "fake-host"
    exe.write_text(f"#!{sys.executable}\nimport json, sys, time\nargs = sys.argv[1:]\n"
                   f"def say(**kw):\n    print(json.dumps(kw), flush=True)\n" + textwrap.dedent(body))
    exe.chmod(0o755)
    return str(exe)


def make_updates(tmp_path: Path, exe: str = "/nonexistent", **kw: Any) -> tuple[Updates, Outbox, list[int]]:
    outbox = Outbox(None)
    exits: list[int] = []
    args: dict[str, Any] = {"config_path": tmp_path / "agent.toml", "state_dir": tmp_path / "state",
                            "upgrades": True, "supervised": True, "host_exe": exe, "outbox": outbox,
                            "request_exit": exits.append}
    args.update(kw)
    return Updates(**args), outbox, exits


def states(outbox: Outbox) -> list[str]:
    return [e["data"]["state"] for e in outbox.pending()]


async def wait_for(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- the offer ---

def test_offer_params_are_checked() -> None:
    assert parse_offer(OFFER).describe() == "bundle hello 1.2.0"
    assert parse_offer({**OFFER, "kind": "host", "name": "x"}).name == "pyagent-host"
    for bad, word in (({**OFFER, "kind": "os"}, "kind"), ({**OFFER, "version": "../1"}, "version"),
                      ({**OFFER, "target": "/etc/passwd"}, "target"), ({**OFFER, "target": "a/../b"}, "target"),
                      ({**OFFER, "name": "no-dash"}, "name"), ({**OFFER, "extra": 1}, "extra"),
                      ({**OFFER, "rollout": 5}, "rollout")):
        with pytest.raises(ProtocolError) as info:
            parse_offer(bad)
        assert info.value.code == INVALID_PARAMS and f"'{word}'" in info.value.message
    missing = {k: v for k, v in OFFER.items() if k != "target"}
    with pytest.raises(ProtocolError, match="missing parameter 'target'"):
        parse_offer(missing)


def test_upgrades_false_refuses_and_reports(tmp_path: Path) -> None:
    updates, outbox, exits = make_updates(tmp_path, upgrades=False)
    with pytest.raises(ProtocolError) as info:
        asyncio.run(updates.offer(OFFER))
    assert info.value.code == NOT_ALLOWED
    assert info.value.message == f"updates are disabled on this agent (upgrades = false in {tmp_path / 'agent.toml'})"
    [event] = outbox.pending()
    assert event["agent"] == "pyagent" and event["event"] == "update.state"
    assert event["data"] == {"kind": "bundle", "name": "hello", "version": "1.2.0", "state": "refused",
                             "detail": info.value.message, "rollout": "r-1"}
    assert exits == []


def test_without_a_supervisor_the_offer_is_refused(tmp_path: Path) -> None:
    updates, outbox, _ = make_updates(tmp_path, supervised=False)
    with pytest.raises(ProtocolError) as info:
        asyncio.run(updates.offer(OFFER))
    assert info.value.code == INVALID_REQUEST and "supervisor" in info.value.message
    assert outbox.pending() == []


def test_staged_update_reports_every_state_then_exits_76(tmp_path: Path) -> None:
    exe = fake_updater(tmp_path, """
        open(sys.argv[0] + ".args", "w").write(json.dumps(args))
        for i in range(0, 101, 5):
            say(state="downloading", bytes=i, total=100)
            time.sleep(0.02)
        say(state="verifying")
        print("not json")
        say(state="staged", dir="/x/hello/1.2.0")
        """)
    updates, outbox, exits = make_updates(tmp_path, exe)

    async def go() -> None:
        assert await updates.offer(OFFER) == {"state": "offered"}
        with pytest.raises(ProtocolError) as info:  # one at a time
            await updates.offer({**OFFER, "version": "1.3.0"})
        assert info.value.code == AGENT_BUSY
        assert info.value.message == "an update is already running (bundle hello 1.2.0)"
        await wait_for(lambda: exits != [])
        await updates.stop()

    asyncio.run(go())
    assert exits == [EXIT_UPDATE]
    seen = states(outbox)
    assert seen[0] == "offered" and seen[-3:] == ["verifying", "staged", "restarting"]
    progress = [e["data"]["progress"] for e in outbox.pending() if e["data"]["state"] == "downloading"]
    # 21 progress lines over ~0.4 s: the first and the last are reported, the rest throttled to one a second
    assert progress[0] == {"bytes": 0, "total": 100} and progress[-1] == {"bytes": 100, "total": 100}
    assert len(progress) <= 3
    assert json.loads(Path(exe + ".args").read_text()) == [
        "update", "--config", str(tmp_path / "agent.toml"), "--kind", "bundle", "--name", "hello", "--version",
        "1.2.0", "--target", "bundles/hello/1.2.0.tar.gz", "--rollout", "r-1"]


def test_failed_update_is_reported_and_the_next_offer_runs(tmp_path: Path) -> None:
    exe = fake_updater(tmp_path, """
        if "2.0.0" in args:
            sys.stderr.write("Traceback: boom\\n")
            sys.exit(3)
        say(state="failed", reason="metadata_expired", detail="timestamp expired")
        sys.exit(1)
        """)
    updates, outbox, exits = make_updates(tmp_path, exe)

    async def go() -> None:
        await updates.offer(OFFER)
        await wait_for(lambda: states(outbox)[-1] == "failed")
        await wait_for(lambda: updates.running is None)
        await updates.offer({**OFFER, "version": "2.0.0", "target": "bundles/hello/2.0.0.tar.gz"})
        await wait_for(lambda: states(outbox).count("failed") == 2)

    asyncio.run(go())
    assert exits == []
    failed = [e["data"] for e in outbox.pending() if e["data"]["state"] == "failed"]
    assert failed[0]["reason"] == "metadata_expired" and failed[0]["detail"] == "metadata_expired: timestamp expired"
    assert failed[1]["version"] == "2.0.0" and failed[1]["detail"] == "the updater exited with code 3: Traceback: boom"


@pytest.mark.parametrize("pending", ["staged.json", "probation.json"])
def test_offer_while_an_update_is_staged_or_in_probation_is_busy(tmp_path: Path, pending: str) -> None:
    """A second swap now would end the first update's probation as a failure: the offer waits (agent_busy)."""
    exe = fake_updater(tmp_path, "say(state='failed', reason='io_error', detail='must not run')\n")
    updates, outbox, exits = make_updates(tmp_path, exe)
    (tmp_path / "state" / "updates").mkdir(parents=True)
    (tmp_path / "state" / "updates" / pending).write_text("{}")
    with pytest.raises(ProtocolError) as info:
        asyncio.run(updates.offer(OFFER))
    assert info.value.code == AGENT_BUSY, info.value
    assert ("staged" if pending == "staged.json" else "in probation") in info.value.message
    assert states(outbox) == [] and exits == [] and updates.running is None


def test_offer_of_the_running_version_is_committed_at_once(tmp_path: Path) -> None:
    exe = fake_updater(tmp_path, "say(state='failed', reason='io_error', detail='must not run')\n")
    updates, outbox, exits = make_updates(tmp_path, exe, installed={("bundle", "hello"): "1.2.0",
                                                                    ("host", "pyagent-host"): "0.1.0"})
    assert asyncio.run(updates.offer(OFFER)) == {"state": "committed"}
    assert asyncio.run(updates.offer({**OFFER, "kind": "host", "version": "0.1.0"})) == {"state": "committed"}
    assert states(outbox) == ["committed", "committed"] and exits == [] and updates.running is None


def test_controller_routes_agent_update(tmp_path: Path) -> None:
    assert "agent.update" in CONTROL_METHODS
    controller = Controller({}, request_exit=lambda code: None)
    with pytest.raises(ProtocolError) as info:
        asyncio.run(controller.handle("agent.update", OFFER))
    assert info.value.code == INVALID_REQUEST
    updates, outbox, _ = make_updates(tmp_path, upgrades=False)
    controller.update = updates.offer
    with pytest.raises(ProtocolError) as info:
        asyncio.run(controller.handle("agent.update", OFFER))
    assert info.value.code == NOT_ALLOWED


# --- probation ---

def test_healthy_is_written_only_during_a_probation(tmp_path: Path) -> None:
    updates, _, _ = make_updates(tmp_path)
    marks = tmp_path / "state" / "updates"
    assert updates.mark_healthy() is False
    assert not (marks / "healthy").exists()
    marks.mkdir(parents=True)
    (marks / "probation.json").write_text("{}")
    assert updates.mark_healthy() is True
    assert (marks / "healthy").read_text() == f"{os.getpid()}\n"


# --- loading installed bundles ---

def _bundle(where: Path, name: str, version: str) -> Path:
    where.mkdir(parents=True)
    (where / "bundle.toml").write_text(f'name = "{name}"\nversion = "{version}"\nentry = "mod:Thing"\n')
    (where / "mod.py").write_text("from pyagent.runtime import Agent\n\nclass Thing(Agent):\n    pass\n")
    return where


def test_installed_current_version_replaces_the_configured_one(tmp_path: Path) -> None:
    configured = _bundle(tmp_path / "etc" / "hello", "hello", "1.0.0")
    other = _bundle(tmp_path / "etc" / "other", "other", "1.0.0")
    state = tmp_path / "state"
    assert resolve_bundle_paths([configured, other], state) == [configured, other]
    new = _bundle(state / "bundles" / "hello" / "1.2.0", "hello", "1.2.0")
    _bundle(state / "bundles" / "hello" / "1.1.0", "hello", "1.1.0")
    (state / "bundles" / "hello" / "current").symlink_to("1.2.0")
    extra = _bundle(state / "bundles" / "extra" / "0.5.0", "extra", "0.5.0")
    (state / "bundles" / "extra" / "current").symlink_to(extra)
    _bundle(state / "bundles" / "staged_only" / "1.0.0", "staged_only", "1.0.0")  # no current link: not loaded
    paths = resolve_bundle_paths([configured, other], state)
    assert paths == [new, other, extra]
    loaded = load_bundles(paths)
    assert [(b.name, b.version) for b in loaded] == [("hello", "1.2.0"), ("other", "1.0.0"), ("extra", "0.5.0")]


# --- config ---

def test_upgrades_and_probation_ms_config(write_config: Callable[[str], Path]) -> None:
    config = load_config(write_config('endpoints = ["127.0.0.1:1"]\nca = "ca.pem"\n'))
    assert config.upgrades is True and config.supervisor.probation_ms == 30_000
    assert supervisor_settings(config)["supervisor"]["probation_ms"] == 30_000
    assert supervisor_settings(config)["supervisor"]["probation_handshake_ms"] == 120_000
    config = load_config(write_config('endpoints = ["127.0.0.1:1"]\nca = "ca.pem"\nupgrades = false\n'
                                      '[supervisor]\nprobation_ms = 5000\n'))
    assert config.upgrades is False and supervisor_settings(config)["supervisor"]["probation_ms"] == 5000
    from pyagent.runtime._errors import ConfigError

    with pytest.raises(ConfigError, match="key 'upgrades' must be true or false, got string"):
        load_config(write_config('endpoints = ["127.0.0.1:1"]\nca = "ca.pem"\nupgrades = "no"\n'))
    with pytest.raises(ConfigError, match="key 'supervisor.probation_ms' must be between 1000 and 3600000, got 10"):
        load_config(write_config('endpoints = ["127.0.0.1:1"]\nca = "ca.pem"\n[supervisor]\nprobation_ms = 10\n'))
