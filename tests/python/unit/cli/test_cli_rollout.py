"""`pyagent rollout` and `pyagent updates`: parsing, rendering (progress bars are pure functions), and the commands
as subprocesses against a real endpoint in this process with scripted fake agents."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from clihelp import cli_env, run_cli
from fakeagent import endpoint_config
from rolloutagents import COMMIT, FakeRepo, ScriptedAgent, close_all

from pyagent.cli._errors import UsageError
from pyagent.cli._main import build_parser
from pyagent.cli._rollout import parse_bundle_spec, progress_bar, render_status, start_body
from pyagent.endpoint import Endpoint


def test_bundle_spec_and_start_body() -> None:
    assert parse_bundle_spec("hello==1.2.0") == ("hello", "1.2.0")
    for bad in ("hello", "hello==", "==1.0", "hello=1.0"):
        with pytest.raises(UsageError, match="NAME==VERSION"):
            parse_bundle_spec(bad)
    args = build_parser().parse_args(["rollout", "start", "--bundle", "hello==2.0.0", "--select", "env=prod",
                                      "--waves", "10%,100%", "--max-crash-rate", "1%"])
    assert start_body(args) == {"kind": "bundle", "name": "hello", "version": "2.0.0", "select": "env=prod",
                                "waves": "10%,100%", "max_failure_rate": "5%", "max_crash_rate": "1%"}
    args = build_parser().parse_args(["rollout", "start", "--host", "0.2.0"])
    assert start_body(args) == {"kind": "host", "name": "pyagent-host", "version": "0.2.0", "select": "*",
                                "waves": "1%,10%,50%,100%", "max_failure_rate": "5%"}
    args = build_parser().parse_args(["rollout", "start", "--host", "0.2.0", "--stall-timeout", "120"])
    assert start_body(args)["stall_timeout"] == 120.0
    with pytest.raises(SystemExit):  # one of --bundle / --host, not both
        build_parser().parse_args(["rollout", "start", "--host", "1", "--bundle", "a==1"])
    assert isinstance(build_parser().parse_args(["updates", "unpin", "web-1", "--host"]), argparse.Namespace)


def test_progress_bar_is_a_pure_function() -> None:
    assert progress_bar(0, 10, 10) == "[..........] 0/10"
    assert progress_bar(5, 10, 10) == "[#####.....] 5/10"
    assert progress_bar(10, 10, 10) == "[##########] 10/10"
    assert progress_bar(3, 7, 7) == "[###....] 3/7"
    assert progress_bar(0, 0, 4) == "[####] 0/0"  # an empty wave is done
    assert progress_bar(12, 10, 5) == "[#####] 12/10" and progress_bar(-1, 10, 5) == "[.....] 0/10"


ROLLOUT: dict[str, Any] = {
    "id": "ro-1", "kind": "bundle", "name": "hello", "version": "2.0.0", "state": "halted",
    "reason": "failure rate 40% (2 of 5 ended) is above the limit 5%", "wave": 1, "waves": ["50%", "100%"],
    "members": 10, "failure_rate": 0.4, "max_failure_rate": 0.05, "crash_rate": 0.0, "max_crash_rate": 0.05,
    "wave_progress": [
        {"wave": 1, "percent": "50%", "members": 5, "ended": 5, "failed": 2, "in_progress": 0, "waiting": 0},
        {"wave": 2, "percent": "100%", "members": 5, "ended": 0, "failed": 0, "in_progress": 0, "waiting": 1}]}


def test_render_status_with_and_without_bars() -> None:
    plain = render_status(ROLLOUT, bars=False).splitlines()
    assert plain[0] == ("rollout ro-1: bundle hello 2.0.0, halted (failure rate 40% (2 of 5 ended) is above the "
                        "limit 5%), wave 1/2, 10 agents")
    assert plain[1] == "failure rate 40% (limit 5%), crash rate 0% (limit 5%)"
    assert plain[2:] == ["wave 1 (50%): 5/5 ended, 2 failed", "wave 2 (100%): 0/5 ended, 1 waiting"]
    assert render_status({**ROLLOUT, "stall_timeout": 900.0}, bars=False).splitlines()[1] == (
        "failure rate 40% (limit 5%), crash rate 0% (limit 5%), stall timeout 900 s")
    bars = render_status(ROLLOUT, bars=True).splitlines()
    assert bars[2] == f"{'wave 1 (50%)':<16} {progress_bar(5, 5)}  2 failed"
    assert bars[3].endswith("[..............................] 0/5  1 waiting")


def test_watch_prints_plain_lines_when_not_a_tty() -> None:
    from pyagent.cli._rollout import watch

    states = iter([{**ROLLOUT, "state": "running", "reason": ""}, {**ROLLOUT, "state": "running", "reason": ""},
                   {**ROLLOUT, "state": "completed", "reason": ""}])

    class Client:
        def get(self, path: str) -> dict[str, Any]:
            assert path == "/api/v1/rollouts/ro-1"
            return next(states)

    out = io.StringIO()
    assert watch(Client(), "ro-1", 10, out, interval=0) == 0  # type: ignore[arg-type]
    text = out.getvalue()
    assert text.count("rollout ro-1:") == 2 and "\x1b[" not in text and "completed" in text
    out = io.StringIO()
    forever = {**ROLLOUT, "state": "running", "reason": ""}

    class Stuck:
        def get(self, path: str) -> dict[str, Any]:
            return forever

    assert watch(Stuck(), "ro-1", 0, out, interval=0) == 1  # type: ignore[arg-type]
    assert "stopped watching" in out.getvalue()


async def cli(ep: Endpoint, *args: Any) -> subprocess.CompletedProcess[str]:
    assert ep.api_url is not None
    env = cli_env(PYAGENT_API=ep.api_url, PYAGENT_TOKEN=ep.state.operator_token)
    return await asyncio.to_thread(run_cli, *args, env=env)


async def test_rollout_and_updates_commands(tmp_path: Path) -> None:
    ep = Endpoint(endpoint_config(tmp_path / "state"))
    await ep.start()
    ep.rollouts.repo = FakeRepo(("bundle", "hello", "2.0.0", None))
    agents = [await ScriptedAgent.start(ep, f"agent-{i}", COMMIT) for i in range(3)]
    try:
        res = await cli(ep, "updates", "opt-out", "agent-2")
        assert res.returncode == 0 and "opted out of updates" in res.stdout, res.stderr
        res = await cli(ep, "updates", "pin", "agent-1", "--bundle", "hello==2.0.0")
        assert res.returncode == 0 and "pins: hello 2.0.0" in res.stdout, res.stderr
        res = await cli(ep, "rollout", "start", "--bundle", "hello==2.0.0", "--waves", "50%,100%", "--watch",
                        "--timeout", "30")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0].startswith("rollout ro-") and "to 2 agents in waves 50%,100%" in lines[0]
        assert "completed" in lines[-4] and lines[-2:] == ["wave 1 (50%): 1/1 ended", "wave 2 (100%): 1/1 ended"]
        rollout_id = lines[0].split()[1]
        res = await cli(ep, "rollout", "status", "--json", rollout_id)
        body = json.loads(res.stdout)
        assert body["state"] == "completed" and body["counts"] == {"committed": 2}
        assert body["stall_timeout"] == 900
        res = await cli(ep, "rollout", "status")
        assert res.returncode == 0 and rollout_id in res.stdout and "2/2" in res.stdout
        res = await cli(ep, "rollout", "halt", rollout_id[:5])
        assert res.returncode == 0 and res.stdout.strip() == f"rollout {rollout_id} is halted"
        res = await cli(ep, "rollout", "halt", rollout_id)
        assert res.returncode == 1 and "only a running or completed rollout" in res.stderr
        res = await cli(ep, "rollout", "resume", rollout_id)
        assert res.returncode == 0 and ("is running" in res.stdout or "is completed" in res.stdout)
        res = await cli(ep, "updates", "ls")
        assert res.returncode == 0 and "agent-0" in res.stdout and "committed" in res.stdout
        assert "agent agent-2: opted out of updates; pins: none" in res.stdout
        res = await cli(ep, "updates", "unpin", "agent-1", "--bundle", "hello")
        assert res.returncode == 0 and res.stdout.startswith("removed 1 pin(s)")
        res = await cli(ep, "updates", "opt-in", "agent-2")
        assert res.returncode == 0 and "takes updates" in res.stdout
        res = await cli(ep, "rollout", "start", "--bundle", "hello==2.0.0", "--waves", "50%,20%")
        assert res.returncode == 2 and "wave 2 '20%' is not larger" in res.stderr
        res = await cli(ep, "rollout", "start", "--bundle", "hello==2.0.0", "--stall-timeout", "0")
        assert res.returncode == 2 and "'stall_timeout' must be a number of seconds above 0" in res.stderr
        res = await cli(ep, "rollout", "start", "--bundle", "hello==9.0.0")
        assert res.returncode == 1 and "pyagent release bundle PATH" in res.stderr
        res = await cli(ep, "rollout", "status", "ro-nothing")
        assert res.returncode == 1 and "no rollout 'ro-nothing'" in res.stderr
    finally:
        await close_all(agents)
        await ep.aclose()
