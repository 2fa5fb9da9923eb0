"""Real processes for integration tests: an endpoint (`pyagent endpoint serve`) and agents (`pyagent-host`).

Everything listens on 127.0.0.1 with ports chosen by the kernel, every wait is bounded, and every process is stopped
by PID when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, TypeVar

# Protocol v1 allows 2,048 levels of nesting; importing the protocol raises this process's recursion limit to fit,
# so the tests' own json.dumps/loads of deep messages work whatever ran first.
import pyagent.protocol  # noqa: F401

REPO = Path(__file__).resolve().parents[3]
BUNDLES = REPO / "bundles"
TEST_BUNDLES = Path(__file__).resolve().parent / "bundles"

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll until predicate() is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not exist yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> int:
    """Send `sig` (if it still runs), wait up to `timeout`, then SIGKILL; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def host_binary() -> str:
    found = shutil.which("pyagent-host") or str(Path(sys.executable).parent / "pyagent-host")
    if not os.access(found, os.X_OK):
        raise AssertionError("pyagent-host is not installed: run `scripts/dev.sh setup` (pip install . builds it)")
    return found


class EndpointProc:
    """`pyagent endpoint serve` in a subprocess."""

    def __init__(self, state_dir: Path, heartbeat_interval: float = 1.0, listen: str = "127.0.0.1:0",
                 extra_args: list[str] | None = None) -> None:
        self.state_dir = state_dir
        self.extra_args = list(extra_args or [])
        self._enroll_token: str | None = None
        self.heartbeat_interval = heartbeat_interval
        self.listen_arg = listen
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir.parent / f"{state_dir.name}.log"
        self.info: dict[str, Any] = {}

    def start(self, listen: str | None = None) -> "EndpointProc":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        info_file = self.state_dir / "endpoint.json"
        if info_file.exists():
            info_file.unlink()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pyagent.cli", "endpoint", "serve", "--state-dir", str(self.state_dir),
             "--listen", listen or self.listen_arg, "--api", "127.0.0.1:0",
             "--heartbeat-interval", str(self.heartbeat_interval), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"endpoint exited with {self.proc.returncode}:\n{self.log()}")
            if not info_file.exists():
                return None
            info: dict[str, Any] = json.loads(info_file.read_text())
            return info if info.get("pid") == self.proc.pid else None

        self.info = wait_for(ready, 20, "the endpoint to write endpoint.json")
        return self

    @property
    def listen(self) -> str:
        return str(self.info["listen"])

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def ca(self) -> Path:
        return self.state_dir / "ca.pem"

    @property
    def agent_token(self) -> str:
        """An enrollment token (unlimited uses) for agents of this endpoint, created on first use."""
        if self._enroll_token is None:
            self._enroll_token = self.create_token()
        return self._enroll_token

    def create_token(self, **body: Any) -> str:
        """`POST /api/v1/tokens`: a new enrollment token (body: uses, expires, labels, approve)."""
        status, reply = self.api("POST", "/api/v1/tokens", body)
        assert status == 201, reply
        return str(reply["token"])

    @property
    def operator_token(self) -> str:
        return (self.state_dir / "operator-token").read_text().strip()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.info["api"] + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token if token is not None else self.operator_token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            payload = err.read()
            err.close()
            return err.code, json.loads(payload) if payload else None

    def agents(self) -> list[dict[str, Any]]:
        status, body = self.api("GET", "/api/v1/agents")
        assert status == 200, body
        return list(body["agents"])

    def agent(self, agent_id: str) -> dict[str, Any] | None:
        for a in self.agents():
            if a["agent_id"] == agent_id:
                return a
        return None

    def call(self, target: str, method: str, params: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        status, body = self.api("POST", "/api/v1/call",
                                {"target": target, "method": method, "params": params or {}, "timeout": timeout})
        assert status == 200, body
        return body

    def wait_connected(self, agent_id: str, timeout: float = 20) -> dict[str, Any]:
        return wait_for(lambda: (a := self.agent(agent_id)) and a["connected"] and a, timeout,
                        f"agent {agent_id} to be connected to the endpoint on {self.listen}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        code = stop_process(self.proc, sig, timeout) if self.proc is not None else 0
        self.proc = None
        return code


class AgentProc:
    """`pyagent-host --foreground` with a config written by the test."""

    def __init__(self, workdir: Path, endpoints: list[EndpointProc] | list[str], ca: Path, token: str,
                 bundles: list[Path] | None = None, name: str = "agent-1", extra: str = "") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "agent.toml"
        eps = [e.listen if isinstance(e, EndpointProc) else e for e in endpoints]
        bundle_paths = bundles if bundles is not None else [BUNDLES / "hello", TEST_BUNDLES / "probe"]
        self.config.write_text(
            f'name = "{name}"\n'
            f'state_dir = "{workdir / "state"}"\n'
            f"endpoints = {json.dumps(eps)}\n"
            f'ca = "{ca}"\n'
            f'token = "{token}"\n'
            f"bundles = {json.dumps([str(b) for b in bundle_paths])}\n"
            'log_level = "debug"\n'
            f"{extra}\n"
            "[reconnect]\nmin_ms = 100\nmax_ms = 1000\n")
        self.log_path = workdir / "host.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def agent_id(self) -> str:
        return (self.workdir / "state" / "agent-id").read_text().strip()

    def start(self, wait: bool = True) -> "AgentProc":
        """Start the host; with `wait`, until it knows its agent id (enrolled, or pending approval)."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([host_binary(), "--foreground", "--config", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        if not wait:
            return self
        wait_for(lambda: (self.workdir / "state" / "agent-id").exists() or self._died(), 20, "the agent to start")
        return self

    def _died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"pyagent-host exited with {self.proc.returncode}:\n{self.log()}")
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 20) -> str:
        return wait_for(lambda: text in self.log() and self.log(), timeout, f"{text!r} in the host log")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        code = stop_process(self.proc, sig, timeout) if self.proc is not None else 0
        self.proc = None
        return code


class SupervisorProc:
    """`pyagent-host --config FILE`: the supervisor, with a config written by the test."""

    def __init__(self, workdir: Path, endpoint: str, ca: Path, token: str, bundles: list[Path],
                 extra: str = "", auth: str = "certificate") -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.state = workdir / "state"
        self.config = workdir / "agent.toml"
        self.config.write_text(
            f'name = "{workdir.name}"\nstate_dir = "{self.state}"\nendpoints = ["{endpoint}"]\nca = "{ca}"\n'
            f'token = "{token}"\nauth = "{auth}"\nbundles = {json.dumps([str(b) for b in bundles])}\n'
            'log_level = "debug"\n' + extra + "\n[reconnect]\nmin_ms = 100\nmax_ms = 1000\n")
        self.log_path = workdir / "supervisor.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "SupervisorProc":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([host_binary(), "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: "event=supervisor.worker.started" in self.log() or self._died(), 30,
                 "the supervisor to start a worker")
        return self

    def _died(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"the supervisor exited with {self.proc.returncode}:\n{self.log()}")
        return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self, event: str) -> list[dict[str, str]]:
        """The key=value pairs of every log line with `event=<event>` (values without quotes or spaces)."""
        out = []
        for line in self.log().splitlines():
            if f" event={event} " in line + " ":
                out.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
        return out

    def worker_pids(self) -> list[int]:
        return [int(e["pid"]) for e in self.events("supervisor.worker.started")]

    def restarts(self) -> list[dict[str, Any]]:
        path = self.state / "restarts.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    @property
    def agent_id(self) -> str:
        return (self.state / "agent-id").read_text().strip()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        code = stop_process(self.proc, sig, timeout)
        # Workers die with their supervisor (PR_SET_PDEATHSIG); make sure of it so no test leaves one behind.
        for pid in self.worker_pids():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc = None
        return code


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie of ours counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
