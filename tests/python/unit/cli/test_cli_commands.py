"""The CLI against a real `pyagent endpoint serve` subprocess, with a fake agent connected over TLS."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

from clihelp import ServeProc, cli_env, pid_gone, run_cli
from fakeagent import FakeAgent, greet


async def cli(*args: Any, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a thread so that the fake agent keeps answering in this loop meanwhile."""
    return await asyncio.to_thread(run_cli, *args, env=env)


async def agent_for(serve: ServeProc, agent_id: str = "0123456789abcdef0123", name: str = "web-1",
                    on_call: Any = greet) -> FakeAgent:
    agent = await FakeAgent.connect("127.0.0.1", serve.port, serve.ca, on_call=on_call)
    reply = await agent.hello(serve.agent_token, agent_id=agent_id, name=name)
    assert "result" in reply, reply
    return agent


def test_serve_first_and_second_run(tmp_path: Path) -> None:
    proc = ServeProc(tmp_path / "state").start()
    try:
        out = proc.stdout()
        state = tmp_path / "state"
        assert f"CA certificate: {state / 'ca.pem'} (new)" in out
        assert "agents enroll:  `pyagent token create`" in out  # no shared token unless asked for
        assert not (state / "agent-token").exists()
        assert f"agents dial:    {proc.info['listen']} (TLS)" in out
        assert f"operator API:   {proc.info['api']}" in out
        assert proc.port > 0 and not proc.info["listen"].endswith(":0")
        assert "event=endpoint.started" in proc.stderr()
    finally:
        assert proc.stop() == 0
    proc = ServeProc(tmp_path / "state").start()
    try:
        assert "(new)" not in proc.stdout()
    finally:
        assert proc.stop(signal.SIGINT) == 0


async def test_sigterm_is_prompt_and_marks_agents_disconnected(tmp_path: Path) -> None:
    proc = ServeProc(tmp_path / "state", "--allow-shared-token").start()
    try:
        agent = await agent_for(proc)
        assert proc.proc is not None
        pid = proc.proc.pid
        started = time.monotonic()
        code = await asyncio.to_thread(proc.stop)
        assert code == 0 and time.monotonic() - started < 2
        await agent.wait_closed()
        await agent.close()
        assert pid_gone(pid)
    finally:
        proc.stop()
    db = sqlite3.connect(tmp_path / "state" / "endpoint.db")
    try:
        assert db.execute("SELECT agent_id, connected FROM agents").fetchall() == [("0123456789abcdef0123", 0)]
    finally:
        db.close()
    # Files are kept; the CLI reports the endpoint as unreachable (exit 3) and why.
    result = await cli("agents", "ls", "--state-dir", tmp_path / "state")
    assert result.returncode == 3
    assert "cannot reach the endpoint API" in result.stderr and "is not running" in result.stderr


async def test_agents_ls_and_show(serve: ServeProc) -> None:
    async with await agent_for(serve) as agent:
        await agent.heartbeat(rtt_ms=0.21)
        result = await cli("agents", "ls", "--json", "--state-dir", serve.state_dir)
        assert result.returncode == 0, result.stderr
        records = json.loads(result.stdout)["agents"]
        assert [(r["agent_id"], r["name"], r["connected"], r["latency_ms"]) for r in records] == [
            ("0123456789abcdef0123", "web-1", True, 0.21)]

        result = await cli("--state-dir", serve.state_dir, "agents", "ls")
        assert result.returncode == 0, result.stderr
        header, row = result.stdout.splitlines()
        assert header.startswith("ID") and "LATENCY" in header
        assert row.split()[:7] == ["01234567", "web-1", "active", "yes", "0.1.0-fake", "hello@0.1.0", "0.21"]

        for ref in ("web-1", "0123456789abcdef0123", "01234567"):
            result = await cli("agents", "show", ref, "--state-dir", serve.state_dir)
            assert result.returncode == 0, result.stderr
            assert "agent id:   0123456789abcdef0123" in result.stdout
            assert "latency:    0.21 ms" in result.stdout
        result = await cli("agents", "show", "web-1", "--json", "--state-dir", serve.state_dir)
        assert json.loads(result.stdout) == records[0]
        result = await cli("agents", "show", "nobody", "--state-dir", serve.state_dir)
        assert result.returncode == 1 and "nobody" in result.stderr


async def test_call(serve: ServeProc) -> None:
    never = asyncio.Event()

    async def handler(obj: str, method: str, params: dict[str, Any]) -> Any:
        if method == "hang":
            await never.wait()
        return await greet(obj, method, params)

    sd = serve.state_dir
    async with await agent_for(serve, on_call=handler):
        result = await cli("call", "web-1", "hello.greet", "name=world", "--state-dir", sd)
        assert (result.returncode, result.stdout) == (0, "Hello, world!\n"), result.stderr

        result = await cli("call", "web-1", "hello.echo", "n=5", "on=true", "name=world", "--state-dir", sd)
        assert result.returncode == 0 and json.loads(result.stdout) == {"n": 5, "on": True, "name": "world"}

        result = await cli("call", "web-1", "hello.greet", "name=world", "--json", "--state-dir", sd)
        assert result.returncode == 0 and json.loads(result.stdout) == {"result": "Hello, world!"}

        result = await cli("call", "web-1", "hello.nope", "--state-dir", sd)
        assert result.returncode == 1 and result.stdout == ""
        assert "(method_not_found -32601)" in result.stderr

        result = await cli("call", "web-1", "hello.nope", "--json", "--state-dir", sd)
        assert result.returncode == 1 and json.loads(result.stdout)["error"]["code"] == -32601

        result = await cli("call", "ghost", "hello.greet", "--state-dir", sd)
        assert result.returncode == 1 and "(agent_unavailable -32003)" in result.stderr

        result = await cli("call", "web-1", "hello.hang", "--timeout", "0.3", "--state-dir", sd)
        assert result.returncode == 1 and "(timeout -32004)" in result.stderr

        # The API and token from the environment, no state directory at all.
        env = cli_env(PYAGENT_API=serve.info["api"], PYAGENT_TOKEN=serve.operator_token,
                      PYAGENT_STATE_DIR=str(sd.parent / "nowhere"))
        result = await cli("call", "web-1", "hello.greet", "name=env", env=env)
        assert (result.returncode, result.stdout) == (0, "Hello, env!\n"), result.stderr
        env["PYAGENT_TOKEN"] = "wrong"
        result = await cli("agents", "ls", env=env)
        assert result.returncode == 1 and "401" in result.stderr


def test_serve_reports_a_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("endpoint", "serve", "--state-dir", tmp_path, "--listen", f"127.0.0.1:{port}",
                         "--api", "127.0.0.1:0")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
