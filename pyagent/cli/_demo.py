"""`pyagent demo`: an endpoint and one real agent (`pyagent-host` with the hello bundle) in a temporary directory.

Every step is bounded; both processes are always stopped, by PID, whatever happens. On failure the demo says which
step failed and shows the tail of each process's stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import pyagent
from pyagent.cli._call import describe_error
from pyagent.cli._client import ApiClient, ApiTarget
from pyagent.cli._errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CliError, UnreachableError
from pyagent.cli._format import millis

STARTUP_TIMEOUT = 15.0
CONNECT_TIMEOUT = 15.0
LATENCY_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.1
TAIL_LINES = 25
AGENT_NAME = "demo-agent"

T = TypeVar("T")


class DemoError(CliError):
    """A step of the demo failed; the message says which."""


def find_host() -> Path:
    """$PYAGENT_HOST if set, else `pyagent-host` on PATH, else next to this interpreter (a venv's bin/)."""
    explicit = os.environ.get("PYAGENT_HOST")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return Path(explicit)
        raise DemoError(f"cannot find pyagent-host: PYAGENT_HOST={explicit} is not an executable file")
    found = shutil.which("pyagent-host")
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / "pyagent-host"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    raise DemoError(f"cannot find pyagent-host: it is not on PATH nor next to {sys.executable} "
                    "(build and install it with `bash scripts/dev.sh setup`)")


def find_bundles() -> Path:
    """The example bundles: a repository checkout's bundles/, else the installed share/pyagent/bundles."""
    candidates = [Path(pyagent.__file__).resolve().parent.parent / "bundles",
                  Path(sys.prefix) / "share" / "pyagent" / "bundles"]
    for candidate in candidates:
        if (candidate / "hello").is_dir():
            return candidate
    raise DemoError("cannot find the hello bundle in " + " or ".join(str(c) for c in candidates))


def toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes), except that TOML has no \/ (json.dumps never
    # writes it).
    return json.dumps(value, ensure_ascii=False)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class Child:
    """A child process whose output goes to files in the demo directory; stopped by its PID."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.stdout_path = workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._files: list[IO[bytes]] = [open(self.stdout_path, "wb"), open(self.stderr_path, "wb")]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._files[0],
                                         stderr=self._files[1], env=env, cwd=workdir)
        except OSError:
            self._close_files()
            raise
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        self.returncode = self.proc.poll()
        return self.returncode

    def stop(self, timeout: float = STOP_TIMEOUT) -> tuple[int | None, bool]:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns (exit status, whether it had to be killed)."""
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                self.proc.wait(timeout)
        self.returncode = self.proc.returncode
        self._close_files()
        return self.returncode, killed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self._close_files()

    def _close_files(self) -> None:
        for f in self._files:
            f.close()

    def tail(self, lines: int = TAIL_LINES) -> str:
        parts = []
        for label, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            try:
                text = path.read_text(encoding="utf-8", errors="replace").rstrip()
            except OSError:
                continue
            if text:
                body = "\n".join("    " + line for line in text.splitlines()[-lines:])
                parts.append(f"--- {self.name} {label} (last {lines} lines) ---\n{body}")
        return "\n".join(parts) or f"--- {self.name}: no output ---"


class Demo:
    def __init__(self, workdir: Path, host: Path, bundles: Path) -> None:
        self.workdir = workdir
        self.host = host
        self.bundles = bundles
        self.endpoint: Child | None = None
        self.agent: Child | None = None
        self.env = dict(os.environ)
        package_root = str(Path(pyagent.__file__).resolve().parent.parent)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, self.env.get("PYTHONPATH")) if p)
        self.env["PYTHONUNBUFFERED"] = "1"

    def say(self, text: str) -> None:
        print(text, flush=True)

    def _wait(self, what: str, timeout: float, probe: Callable[[], T | None]) -> T:
        """Poll `probe` until it returns something, a child dies, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            for child in (self.endpoint, self.agent):
                if child is not None and child.poll() is not None:
                    raise DemoError(f"{child.name} exited ({describe_exit(child.returncode)}) while waiting "
                                    f"for {what}")
            value = probe()
            if value is not None:
                return value
            if time.monotonic() >= deadline:
                raise DemoError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(POLL_INTERVAL)

    def run(self) -> None:
        state_dir = self.workdir / "endpoint"
        self.endpoint = Child("endpoint", [
            sys.executable, "-m", "pyagent.cli", "endpoint", "serve", "--state-dir", str(state_dir),
            "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--heartbeat-interval", "1",
        ], self.workdir, self.env)

        def endpoint_info() -> dict[str, Any] | None:
            try:
                info = json.loads((state_dir / "endpoint.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return info if isinstance(info, dict) else None

        info = self._wait("the endpoint to write endpoint.json", STARTUP_TIMEOUT, endpoint_info)
        self.say(f"endpoint: pid {self.endpoint.pid}, agents dial {info['listen']}, API {info['api']}")
        client = ApiClient(ApiTarget(str(info["api"]), (state_dir / "operator-token").read_text().strip()))
        # A one-use enrollment token: the agent makes its key, gets its certificate, then uses mutual TLS.
        enroll_token = str(client.post("/api/v1/tokens", {"uses": 1, "expires": "10m"})["token"])
        self.say("enrollment token created (1 use, 10 minutes)")

        agent_state = self.workdir / "agent"
        agent_state.mkdir(mode=0o700)
        config = self.workdir / "agent.toml"
        config.write_text("\n".join([
            f"name = {toml_string(AGENT_NAME)}",
            f"state_dir = {toml_string(str(agent_state))}",
            f"endpoints = [{toml_string(str(info['listen']))}]",
            f"ca = {toml_string(str(info['ca']))}",
            f"token = {toml_string(enroll_token)}",
            f"bundles = [{toml_string(str(self.bundles / 'hello'))}]",
            'log_level = "info"',
            "",
        ]), encoding="utf-8")
        os.chmod(config, 0o600)
        self.agent = Child("agent", [str(self.host), "--foreground", "--config", str(config)], self.workdir,
                           self.env)
        self.say(f"agent: {self.host} pid {self.agent.pid}, bundle {self.bundles / 'hello'}")

        def connected_agent() -> dict[str, Any] | None:
            try:
                agents = client.agents()
            except UnreachableError:
                return None
            return next((a for a in agents if a.get("name") == AGENT_NAME and a.get("connected")), None)

        record = self._wait(f"agent {AGENT_NAME!r} to connect", CONNECT_TIMEOUT, connected_agent)
        agent_id = str(record["agent_id"])
        self.say(f"agent connected: {AGENT_NAME} (id {agent_id}, host {record.get('host_version')})")

        reply = client.call(agent_id, "hello.greet", {"name": "world"}, 10.0)
        if "error" in reply:
            raise DemoError(f"hello.greet(name=\"world\") failed: {describe_error(reply['error'])}")
        self.say(f"hello.greet(name=\"world\") -> {json.dumps(reply.get('result'), ensure_ascii=False)}")

        def latency() -> float | None:
            value = client.agent(agent_id).get("latency_ms")
            return float(value) if isinstance(value, (int, float)) else None

        self.say(f"heartbeat latency: {millis(self._wait('a heartbeat latency', LATENCY_TIMEOUT, latency))}")

        for child in (self.agent, self.endpoint):
            code, killed = child.stop()
            if killed:
                raise DemoError(f"{child.name} did not exit within {STOP_TIMEOUT:g} s of SIGTERM; killed it")
            if code != 0:
                raise DemoError(f"{child.name} ended with {describe_exit(code)} after SIGTERM, expected exit code 0")
        self.say("stopped the agent and the endpoint: demo ok")

    def stop_all(self) -> None:
        for child in (self.agent, self.endpoint):
            if child is None:
                continue
            try:
                child.stop()
            except KeyboardInterrupt:
                child.kill()

    def tails(self) -> str:
        return "\n".join(child.tail() for child in (self.agent, self.endpoint) if child is not None)


def run_demo(args: argparse.Namespace) -> int:
    try:
        host = find_host()
        bundles = find_bundles()
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.keep:
        workdir = Path(tempfile.mkdtemp(prefix="pyagent-demo-"))
        print(f"demo files (kept): {workdir}", flush=True)
        return _run_in(workdir, host, bundles)
    with tempfile.TemporaryDirectory(prefix="pyagent-demo-") as tmp:
        return _run_in(Path(tmp), host, bundles)


def _run_in(workdir: Path, host: Path, bundles: Path) -> int:
    demo = Demo(workdir, host, bundles)
    code = EXIT_OK
    try:
        demo.run()
    except KeyboardInterrupt:
        print("demo interrupted; stopping the agent and the endpoint", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except (CliError, OSError) as exc:
        demo.stop_all()
        print(f"demo failed: {exc}\n{demo.tails()}", file=sys.stderr)
        code = EXIT_FAILED
    finally:
        demo.stop_all()
    return code
