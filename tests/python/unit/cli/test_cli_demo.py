"""`pyagent demo` with a stand-in `pyagent-host` (fake_host.py) first on PATH: success and failure paths."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from clihelp import REPO, cli_env, pid_gone, run_cli

FAKE_HOST = Path(__file__).resolve().parent / "fake_host.py"

pytestmark = pytest.mark.skipif(not (REPO / "bundles" / "hello").is_dir(), reason="bundles/hello is not there")


def fake_host_env(tmp_path: Path, mode: str = "") -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    host = bin_dir / "pyagent-host"
    host.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_HOST}" "$@"\n')
    host.chmod(0o755)
    return cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_HOST_MODE=mode)


def pids(stdout: str) -> list[int]:
    return [int(p) for p in re.findall(r"\bpid (\d+)", stdout)]


def test_demo_succeeds(tmp_path: Path) -> None:
    result = run_cli("demo", env=fake_host_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert 'hello.greet(name="world") -> "Hello, world!"' in lines
    assert any(re.fullmatch(r"heartbeat latency: \d+\.\d\d ms", line) for line in lines), lines
    assert lines[-1] == "stopped the agent and the endpoint: demo ok"
    assert len(pids(result.stdout)) == 2 and all(pid_gone(p) for p in pids(result.stdout))


def test_demo_reports_a_host_that_fails(tmp_path: Path) -> None:
    result = run_cli("demo", env=fake_host_env(tmp_path, "crash"))
    assert result.returncode == 1
    assert "demo failed: agent exited (exit code 7) while waiting for agent 'demo-agent' to connect" in result.stderr
    assert "fake host: boom, cannot start" in result.stderr  # the tail of the host's stderr
    assert "--- endpoint stderr" in result.stderr and "event=endpoint.started" in result.stderr
    assert pids(result.stdout) and all(pid_gone(p) for p in pids(result.stdout))


def test_demo_kills_a_host_that_ignores_sigterm(tmp_path: Path) -> None:
    result = run_cli("demo", env=fake_host_env(tmp_path, "hang"))
    assert result.returncode == 1
    assert "agent did not exit within 5 s of SIGTERM; killed it" in result.stderr
    assert len(pids(result.stdout)) == 2 and all(pid_gone(p) for p in pids(result.stdout))


def test_demo_without_a_host(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-host"
    result = run_cli("demo", env=cli_env(PYAGENT_HOST=str(missing)))
    assert result.returncode == 1
    assert f"cannot find pyagent-host: PYAGENT_HOST={missing} is not an executable file" in result.stderr
