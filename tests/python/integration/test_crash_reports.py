"""Crash reports end to end with the REAL endpoint and the real host: the worker is crashed on purpose (crasher bundle,
`[crash] allow_test_crashes = true`), restarted by the test (no supervisor here), and its report must be uploaded over
the authenticated session, parsed and shown by `pyagent crashes ls/show`. Also: grouping, crash loops, Python errors
in methods and periodic tasks, hangs, and a crash while the endpoint is down.

Figures (printed with -s): time from the restart of the worker to the report visible in the operator API, and the
bytes uploaded per report.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import REPO, TEST_BUNDLES, AgentProc, EndpointProc, host_binary, wait_for

pytestmark = pytest.mark.integration

EXPECTED = {"segv": signal.SIGSEGV, "abort": signal.SIGABRT, "stack_overflow": signal.SIGSEGV}
BUNDLES = [TEST_BUNDLES / "crasher", TEST_BUNDLES / "faulty"]


def crash_config(hang: float = 0) -> str:
    return f"[crash]\nallow_test_crashes = true\nhang_timeout = {hang}\n"


def cli(ep: EndpointProc, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pyagent.cli", *args, "--state-dir", str(ep.state_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def reports(ep: EndpointProc, **query: str) -> list[dict[str, Any]]:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    status, body = ep.api("GET", "/api/v1/crashes" + (f"?{q}" if q else ""))
    assert status == 200, body
    return list(body["crashes"])


def start(tmp_path: Path, ep: EndpointProc, name: str = "a", hang: float = 0) -> AgentProc:
    agent = AgentProc(tmp_path / name, [ep], ep.ca, ep.agent_token, bundles=BUNDLES, name=f"crashy-{name}",
                      extra=crash_config(hang)).start()
    ep.wait_connected(agent.agent_id)
    return agent


def crash_and_restart(ep: EndpointProc, agent: AgentProc, kind: str, thread: str,
                      known: int) -> tuple[dict[str, Any], float]:
    """Crash the worker through an operator call, restart it, wait for report number `known + 1`; return it and the
    seconds from the restart to the report visible at the endpoint."""
    reply = ep.call(agent.agent_id, "crasher.crash", {"kind": kind, "thread": thread})
    assert reply.get("result") == "crashing", reply
    assert agent.proc is not None
    code = agent.proc.wait(60)
    assert code == -EXPECTED[kind], f"exit {code}:\n{agent.log()[-3000:]}"
    agent.proc = None
    restarted = time.monotonic()
    agent.start()
    found = wait_for(lambda: len(r := reports(ep, agent=agent.agent_id, kind="crash")) > known and r, 30,
                     "the crash report at the endpoint")
    return found[0], time.monotonic() - restarted


@pytest.fixture
def ep(tmp_path: Path) -> Any:
    endpoint = EndpointProc(tmp_path / "ep", heartbeat_interval=1.0).start()
    yield endpoint
    endpoint.stop()


@pytest.mark.parametrize("thread", ["main", "libuv"])
@pytest.mark.parametrize("kind", ["segv", "abort", "stack_overflow"])
def test_crash_reaches_endpoint(tmp_path: Path, ep: EndpointProc, kind: str, thread: str) -> None:
    agent = start(tmp_path, ep)
    try:
        row, seconds = crash_and_restart(ep, agent, kind, thread, 0)
        sig = EXPECTED[kind]
        assert row["signal"] == sig and row["signal_name"] == sig.name
        assert row["host_version"] == "0.1.0" and row["bundles"].get("crasher") == "1.2.3"
        listed = json.loads(cli(ep, "crashes", "ls", "--json"))["crashes"]
        assert [r["id"] for r in listed] == [row["id"]]
        full = json.loads(cli(ep, "crashes", "show", row["id"], "--json"))
        summary = full["summary"]
        assert summary["dump_error"] is None, summary["dump_error"]
        assert summary["annotations"]["agent_id"] == agent.agent_id
        assert "crasher=1.2.3" in summary["annotations"]["bundles"]
        assert summary["record"]["thread"] == thread
        assert any(m["name"].endswith("pyagent-host") for m in summary["modules"])
        dump = next(size for name, size in summary["files"].items() if name.endswith(".dmp"))
        text = cli(ep, "crashes", "show", row["id"][:8])
        assert f"signal:     {int(sig)} {sig.name}" in text
        assert f"agent_id = {agent.agent_id}" in text and "bundles = crasher=1.2.3" in text
        assert "modules (" in text and "pyagent-host" in text
        assert "fallback backtrace (host record):" in text
        if thread == "main":
            assert "crash_here" in full["python_traceback"] and "python traceback:" in text
        # The agent moved it to completed; nothing is pending.
        crash_dir = agent.workdir / "state" / "crash"
        wait_for(lambda: (crash_dir / "completed" / row["report"]).is_dir() and not (crash_dir / row["report"]).exists(),
                 10, "the report to be marked completed")
        assert agent.wait_log("crash.uploaded")
        print(f"\nFIGURE {kind}/{thread}: restart -> report visible {seconds * 1000:.0f} ms; "
              f"uploaded {sum(summary['files'].values())} bytes (minidump {dump})")
    finally:
        agent.stop()


def test_repeated_crashes_group_and_loop(tmp_path: Path, ep: EndpointProc) -> None:
    agent = start(tmp_path, ep)
    try:
        first, _ = crash_and_restart(ep, agent, "segv", "main", 0)
        second, _ = crash_and_restart(ep, agent, "segv", "main", 1)
        assert first["signature"] == second["signature"] and first["id"] != second["id"]
        body = json.loads(cli(ep, "crashes", "ls", "--group", "--json"))
        assert [(g["signature"], g["count"]) for g in body["groups"]] == [(first["signature"], 2)]
        assert body["loops"] == []
        third, _ = crash_and_restart(ep, agent, "segv", "main", 2)
        assert third["signature"] == first["signature"]
        body = json.loads(cli(ep, "crashes", "ls", "--json", "--agent", agent.agent_id))
        assert len(body["crashes"]) == 3
        assert [(loop["agent_id"], loop["crashes"]) for loop in body["loops"]] == [(agent.agent_id, 3)]
        assert "crash.loop" in ep.log()
        text = cli(ep, "crashes", "ls")
        assert f"crash loop: agent {agent.agent_id}" in text
        table = cli(ep, "crashes", "ls", "--group")
        assert first["signature"] in table and " 3 " in table
    finally:
        agent.stop()


def test_python_errors_and_hang_are_reported(tmp_path: Path, ep: EndpointProc) -> None:
    agent = start(tmp_path, ep, hang=0.5)
    try:
        reply = ep.call(agent.agent_id, "faulty.fail", {"message": "boom-123"})
        assert reply["error"]["code"] == -32603, reply
        errors = wait_for(lambda: reports(ep, kind="python_exception"), 20, "the method's error report")
        one = json.loads(cli(ep, "crashes", "show", errors[0]["id"], "--json"))
        assert one["summary"]["where"] == "method" and one["summary"]["method"] == "fail"
        assert one["summary"]["type"] == "ValueError" and one["summary"]["message"] == "boom-123"
        assert "fail_deep" in one["python_traceback"] and "boom-123" in one["python_traceback"]
        assert one["summary"]["annotations"]["agent_id"] == agent.agent_id

        assert ep.call(agent.agent_id, "faulty.arm", {})["result"] == "armed"
        periodic = wait_for(lambda: [r for r in reports(ep, kind="python_exception") if r["id"] != errors[0]["id"]],
                            20, "the periodic task's error report")
        two = json.loads(cli(ep, "crashes", "show", periodic[0]["id"], "--json"))
        assert two["summary"]["where"] == "periodic" and two["summary"]["method"] == "tick"
        assert "periodic tick failed" in two["python_traceback"] and "in tick" in two["python_traceback"]
        text = cli(ep, "crashes", "show", periodic[0]["id"])
        assert "exception:  RuntimeError: periodic tick failed" in text and "python traceback:" in text

        assert ep.call(agent.agent_id, "crasher.block", {"seconds": 1.5})["result"] == 1.5
        hangs = wait_for(lambda: [r for r in reports(ep, kind="hang")
                                  if "in block" in json.loads(cli(ep, "crashes", "show", r["id"], "--json"))
                                  ["python_traceback"]], 20, "the hang report")
        text = cli(ep, "crashes", "show", hangs[0]["id"])
        assert "python tracebacks (event loop blocked):" in text and "in block" in text
        assert agent.alive()  # the runtime kept running through all of it
        assert ep.call(agent.agent_id, "faulty.arm", {})["result"] == "armed"
    finally:
        assert agent.stop() == 0
    # A clean exit leaves nothing pending: each hang was reported on its own.
    crash_dir = agent.workdir / "state" / "crash"
    leftovers = [p.name for p in crash_dir.iterdir() if p.is_dir() and p.name != "completed"]
    assert all("-py-" in name for name in leftovers), leftovers  # at most the last periodic error, not yet sent


def test_crash_while_endpoint_down_is_reported_later(tmp_path: Path, ep: EndpointProc) -> None:
    agent = start(tmp_path, ep)
    try:
        reply = ep.call(agent.agent_id, "faulty.crash_later", {"kind": "abort", "seconds": 2.0})
        assert reply.get("result") == "scheduled", reply
        port = ep.port
        ep.stop()
        assert agent.proc is not None
        assert agent.proc.wait(30) == -signal.SIGABRT
        agent.proc = None
        agent.start()  # the endpoint is still down: the report stays pending
        time.sleep(1.0)
        crash_dir = agent.workdir / "state" / "crash"
        pending = [p for p in crash_dir.iterdir() if p.is_dir() and (p / "record.txt").exists()]
        assert len(pending) == 1, pending
        back = time.monotonic()
        ep.start(listen=f"127.0.0.1:{port}")
        rows = wait_for(lambda: reports(ep, kind="crash"), 30, "the report after the endpoint came back")
        print(f"\nFIGURE endpoint back -> report visible {(time.monotonic() - back) * 1000:.0f} ms")
        assert rows[0]["signal_name"] == "SIGABRT" and rows[0]["agent_id"] == agent.agent_id
        assert rows[0]["report"] == pending[0].name
        wait_for(lambda: not pending[0].exists(), 10, "the report to be marked completed")
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def noptrace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "noptrace"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(REPO / "tests" / "c" / "noptrace.c")], check=True)
    return out


class NoPtraceAgent(AgentProc):
    """The real host started under tests/c/noptrace.c: ptrace(2) fails with EPERM (a seccomp filter the host and its
    crashpad_handler child inherit), so Crashpad cannot write a minidump and only the host's record is left."""

    wrapper: list[str] = []

    def start(self, wait: bool = True) -> "NoPtraceAgent":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.wrapper, host_binary(), "--foreground", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if wait:
            wait_for(lambda: (self.workdir / "state" / "agent-id").exists() or self._died(), 20, "the agent to start")
        return self


def test_ptrace_denied_record_reaches_endpoint_and_crash_loop_flag(tmp_path: Path, noptrace: Path) -> None:
    """With ptrace denied, the minimal record alone (signal, address, backtrace) is reported, and `crashes show` says
    there is no minidump. The endpoint runs with `--crash-loop-count 2`: the second crash flags a crash loop, which
    the agent's record shows (API, `agents ls`, `agents show`) until `pyagent crashes clear-loop` clears it."""
    ep = EndpointProc(tmp_path / "ep", heartbeat_interval=1.0,
                      extra_args=["--crash-loop-count", "2", "--crash-loop-window", "600"]).start()
    agent = NoPtraceAgent(tmp_path / "a", [ep], ep.ca, ep.agent_token, bundles=BUNDLES, name="crashy-noptrace",
                          extra=crash_config())
    agent.wrapper = [str(noptrace)]
    try:
        agent.start()
        ep.wait_connected(agent.agent_id)
        assert (Path("/proc") / str(agent.proc.pid if agent.proc else 0) / "status").read_text().count(
            "Seccomp:\t2") == 1  # the host itself runs under the filter
        row, seconds = crash_and_restart(ep, agent, "segv", "main", 0)
        assert row["signal"] == signal.SIGSEGV and row["signal_name"] == "SIGSEGV"
        assert row["host_version"] == "0.1.0" and row["bundles"].get("crasher") == "1.2.3"
        full = json.loads(cli(ep, "crashes", "show", row["id"], "--json"))
        summary = full["summary"]
        assert not any(name.endswith(".dmp") for name in summary["files"]), summary["files"]
        assert "record.txt" in summary["files"] and summary["modules"] == []
        assert summary["dump_error"] and "minidump" in summary["dump_error"]
        assert summary["address"] == 0  # the crasher's SEGV is a NULL write: the fault address comes from the record
        assert "ptrace denied" in summary["dump_error"] and "exited_nonzero" in summary["dump_error"]
        assert summary["record"]["thread"] == "main" and "pyagent-host" in summary["record"]["backtrace"]
        assert summary["annotations"]["agent_id"] == agent.agent_id
        assert "crash_here" in full["python_traceback"]
        text = cli(ep, "crashes", "show", row["id"])
        assert "signal:     11 SIGSEGV" in text and f"address:    {hex(summary['address'])}" in text
        assert "minidump:   none: crashpad_handler could not write one" in text, text
        assert "fallback backtrace (host record):" in text and "pyagent-host" in text
        assert "modules (" not in text
        print(f"\nFIGURE ptrace denied: restart -> report visible {seconds * 1000:.0f} ms; "
              f"uploaded {sum(summary['files'].values())} bytes (no minidump)")

        # Not a loop yet; the second crash (count 2 from the serve flag) makes one.
        status, record = ep.api("GET", f"/api/v1/agents/{agent.agent_id}")
        assert status == 200 and record["crash_loop"] is False and record["crash_loop_since"] is None
        second, _ = crash_and_restart(ep, agent, "abort", "main", 1)
        assert second["signal_name"] == "SIGABRT" and second["signature"] != row["signature"]
        status, body = ep.api("GET", "/api/v1/agents")
        mine = next(a for a in body["agents"] if a["agent_id"] == agent.agent_id)
        assert mine["crash_loop"] is True and mine["crash_loop_crashes"] == 2
        assert abs(mine["crash_loop_since"] - time.time() * 1000) < 60_000
        assert json.loads(cli(ep, "agents", "show", agent.agent_id, "--json"))["crash_loop"] is True
        assert "crash loop: 2 crashes, flagged since" in cli(ep, "agents", "show", agent.agent_id)
        assert f"crash loop: agent {agent.agent_id} (crashy-noptrace) 2 crashes" in cli(ep, "agents", "ls")

        cleared = cli(ep, "crashes", "clear-loop", "crashy-noptrace")
        assert f"cleared the crash-loop flag of agent {agent.agent_id} (2 crashes" in cleared
        status, record = ep.api("GET", f"/api/v1/agents/{agent.agent_id}")
        assert record["crash_loop"] is False and record["crash_loop_crashes"] == 0
        assert "crash loop: no" in cli(ep, "agents", "show", agent.agent_id)
        assert "crash loop" not in cli(ep, "agents", "ls")
        assert json.loads(cli(ep, "crashes", "ls", "--json"))["loops"] == []
        again = subprocess.run([sys.executable, "-m", "pyagent.cli", "crashes", "clear-loop", agent.agent_id,
                                "--state-dir", str(ep.state_dir)], capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "is not flagged as in a crash loop" in again.stderr, again
        assert "crash.loop.cleared" in ep.log()
    finally:
        agent.stop()
        ep.stop()
