"""Helpers for CLI tests: run `pyagent` as a subprocess, and `pyagent endpoint serve` as a real endpoint process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[4]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a `pyagent` subprocess: this checkout importable, no inherited endpoint settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYAGENT_API", "PYAGENT_TOKEN", "PYAGENT_STATE_DIR", "PYAGENT_HOST")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def run_cli(*args: Any, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyagent.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, stdin=subprocess.DEVNULL)


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie no one reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class ServeProc:
    """`pyagent endpoint serve` on 127.0.0.1 with kernel-chosen ports, output captured to files."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.state_dir = state_dir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.stdout_path = state_dir.parent / f"{state_dir.name}.stdout"
        self.stderr_path = state_dir.parent / f"{state_dir.name}.stderr"

    def start(self, timeout: float = 20) -> ServeProc:
        info_file = self.state_dir / "endpoint.json"
        info_file.unlink(missing_ok=True)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyagent.cli", "endpoint", "serve", "--state-dir", str(self.state_dir),
                 "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0", "--heartbeat-interval", "1", *self.extra],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=cli_env())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"endpoint exited with {self.proc.returncode}: {self.stderr()}")
            try:
                info = json.loads(info_file.read_text())
                if info.get("pid") == self.proc.pid:
                    self.info = info
                    return self
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no endpoint.json after {timeout} s: {self.stderr()}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def port(self) -> int:
        return int(str(self.info["listen"]).rsplit(":", 1)[1])

    @property
    def ca(self) -> Path:
        return Path(self.info["ca"])

    @property
    def agent_token(self) -> str:
        return (self.state_dir / "agent-token").read_text().strip()

    @property
    def operator_token(self) -> str:
        return (self.state_dir / "operator-token").read_text().strip()
