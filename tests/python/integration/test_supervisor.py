"""The supervisor end to end: the real `pyagent-host` (no `--foreground`) supervising real workers that connect to a
real endpoint over TLS on 127.0.0.1. Restarts, their reasons (log lines and `state_dir/restarts.jsonl`), the instance
lock, signal forwarding, crash loops, config errors and the RSS/CPU caps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import BUNDLES, TEST_BUNDLES, EndpointProc, SupervisorProc, alive, host_binary, stop_process, wait_for

pytestmark = pytest.mark.integration

# Short delays so every restart path runs in a second or two.
FAST = ("[supervisor]\nrestart_min_ms = 100\nrestart_max_ms = 1500\nstable_ms = 3000\ncrash_loop_count = 3\n"
        "crash_loop_window_ms = 20000\nstop_timeout_ms = 2000\n")
ALLOW_LIFECYCLE = "[allow]\nlifecycle = true\n"
# Workers that die before they connect still need an existing `ca` file in their config.
ANY_FILE = Path(__file__).resolve()


def connected_sup(tmp_path: Path, endpoint: EndpointProc, supervisors: list[SupervisorProc], extra: str = FAST,
                  name: str = "sup") -> SupervisorProc:
    sup = SupervisorProc(tmp_path / name, endpoint.listen, endpoint.ca, endpoint.agent_token,
                         [BUNDLES / "hello", TEST_BUNDLES / "probe"], extra=extra)
    supervisors.append(sup)
    sup.start()
    wait_for(lambda: (sup.state / "agent-id").exists() or sup._died(), 30, "the agent id")
    endpoint.wait_connected(sup.agent_id)
    return sup


def worker_pid(endpoint: EndpointProc, agent_id: str) -> int:
    body = endpoint.call(agent_id, "probe.pid")
    assert "result" in body, body
    return int(body["result"])


def bundle(tmp_path: Path, name: str, body: str) -> Path:
    """A one-module test bundle whose import runs `body`."""
    d = tmp_path / name
    d.mkdir()
    (d / "bundle.toml").write_text(f'name = "{name}"\nversion = "1.0.0"\nentry = "{name}:Thing"\n')
    (d / f"{name}.py").write_text(f"from pyagent.runtime import Agent\n{body}\n\nclass Thing(Agent):\n    pass\n")
    return d


def test_killed_worker_is_restarted_and_reconnects(tmp_path: Path, endpoint: EndpointProc,
                                                    supervisors: list[SupervisorProc]) -> None:
    sup = connected_sup(tmp_path, endpoint, supervisors)
    first = worker_pid(endpoint, sup.agent_id)
    assert sup.worker_pids() == [first]
    os.kill(first, signal.SIGKILL)
    second = wait_for(lambda: (p := worker_pid(endpoint, sup.agent_id)) != first and p, 30,
                      "a new worker answering calls")
    assert sup.worker_pids() == [first, second]
    assert endpoint.call(sup.agent_id, "hello.greet", {"name": "again"}) == {"result": "Hello, again!"}
    [rec] = sup.restarts()
    assert rec["reason"] == "signal" and rec["signal"] == signal.SIGKILL and rec["exit_code"] is None
    assert rec["worker_pid"] == first and rec["seq"] == 1 and rec["crash_loop"] is False
    assert 50 <= rec["delay_ms"] <= 100  # the first backoff step: between half and all of restart_min_ms
    [line] = sup.events("supervisor.restart")
    assert line["reason"] == "signal" and line["signal"] == str(int(signal.SIGKILL)) and line["pid"] == str(first)
    # The next worker reports the restart and its reason to the endpoint (an event, through the outbox).

    def reported() -> list[dict[str, Any]]:
        status, body = endpoint.api("GET", f"/api/v1/events?select={sup.agent_id}&event=supervisor.restart")
        assert status == 200, body
        return list(body["events"])
    [event] = wait_for(reported, 20, "the restart to be reported to the endpoint")
    assert event["object"] == "pyagent" and event["data"]["reason"] == "signal", event
    assert event["data"]["worker_pid"] == first and event["data"]["signal"] == signal.SIGKILL, event


def test_agent_restart_is_immediate(tmp_path: Path, endpoint: EndpointProc,
                                    supervisors: list[SupervisorProc]) -> None:
    sup = connected_sup(tmp_path, endpoint, supervisors, extra=FAST + ALLOW_LIFECYCLE)
    first = worker_pid(endpoint, sup.agent_id)
    time.sleep(0.2)  # a worker that asks for a restart right after starting gets the backoff instead
    body = endpoint.call(sup.agent_id, "agent.restart")
    assert body.get("result", {}).get("exit_code") == 75, body
    wait_for(lambda: (p := worker_pid(endpoint, sup.agent_id)) != first and p, 30, "the restarted worker")
    [rec] = sup.restarts()
    assert rec["reason"] == "restart_requested" and rec["exit_code"] == 75 and rec["delay_ms"] == 0
    assert sup.events("supervisor.worker.exited")[0]["exit_code"] == "75"


def test_worker_stopping_on_its_own_stops_the_supervisor(tmp_path: Path, endpoint: EndpointProc,
                                                          supervisors: list[SupervisorProc]) -> None:
    sup = connected_sup(tmp_path, endpoint, supervisors, extra=FAST + ALLOW_LIFECYCLE)
    assert endpoint.call(sup.agent_id, "agent.stop").get("result", {}).get("exit_code") == 0
    assert sup.proc is not None
    assert sup.proc.wait(10) == 0
    assert sup.restarts() == [] and len(sup.worker_pids()) == 1
    assert sup.events("supervisor.worker.stopped")


def test_second_supervisor_refused_with_exit_3(tmp_path: Path, endpoint: EndpointProc,
                                               supervisors: list[SupervisorProc]) -> None:
    sup = connected_sup(tmp_path, endpoint, supervisors)
    assert sup.proc is not None
    second = subprocess.run([host_binary(), "--config", str(sup.config)], capture_output=True, text=True,
                            timeout=30)
    assert second.returncode == 3, second.stderr
    assert f"another supervisor (pid {sup.proc.pid}) holds the lock {sup.state / 'pyagent.lock'}" in second.stderr
    # The first one is untouched: same single worker, still connected.
    assert len(sup.worker_pids()) == 1 and sup.proc.poll() is None
    assert endpoint.call(sup.agent_id, "hello.greet", {"name": "x"}) == {"result": "Hello, x!"}


def test_sigterm_stops_worker_then_supervisor(tmp_path: Path, endpoint: EndpointProc,
                                              supervisors: list[SupervisorProc]) -> None:
    sup = connected_sup(tmp_path, endpoint, supervisors)
    worker = worker_pid(endpoint, sup.agent_id)
    assert sup.proc is not None
    started = time.monotonic()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(10) == 0
    elapsed = time.monotonic() - started
    assert not alive(worker)
    # The worker shut down cleanly (its own SIGTERM handling: exit 0), it was not killed.
    [exited] = sup.events("supervisor.worker.exited")
    assert exited["pid"] == str(worker) and exited["exit_code"] == "0" and exited["signal"] == "0"
    assert not sup.events("supervisor.worker.kill") and sup.restarts() == []
    assert elapsed < 5, f"supervisor took {elapsed:.1f} s to stop"
    wait_for(lambda: not endpoint.agent(sup.agent_id)["connected"], 10, "the endpoint to see the agent go")


def test_supervisor_killed_takes_the_worker_along(tmp_path: Path, endpoint: EndpointProc,
                                                  supervisors: list[SupervisorProc]) -> None:
    sup = connected_sup(tmp_path, endpoint, supervisors)
    worker = worker_pid(endpoint, sup.agent_id)
    assert sup.proc is not None
    sup.proc.kill()
    sup.proc.wait(5)
    wait_for(lambda: not alive(worker), 10, "the orphaned worker to stop (PR_SET_PDEATHSIG)")
    # The lock went with the supervisor: a new one starts at once.
    again = SupervisorProc(sup.workdir, endpoint.listen, endpoint.ca, endpoint.agent_token,
                           [BUNDLES / "hello", TEST_BUNDLES / "probe"], extra=FAST)
    again.log_path = sup.workdir / "supervisor-2.log"
    supervisors.append(again)
    again.start()
    wait_for(lambda: worker_pid(endpoint, sup.agent_id) == again.worker_pids()[0], 30, "the new supervisor's worker")


def test_crash_loop_detected(tmp_path: Path, supervisors: list[SupervisorProc]) -> None:
    crashing = bundle(tmp_path, "dies", "import os\nos._exit(1)")
    sup = SupervisorProc(tmp_path / "sup", "127.0.0.1:9", ANY_FILE, "unused", [crashing], extra=FAST,
                         auth="shared-token")
    supervisors.append(sup)
    sup.start()
    loop = wait_for(lambda: sup.events("supervisor.crash_loop"), 30, "crash_loop in the log")
    assert loop[0]["last_reason"] == "exit" and loop[0]["exits"] == "3" and loop[0]["delay_ms"] == "1500"
    records = wait_for(lambda: len(r := sup.restarts()) >= 3 and r, 10, "three restart records")
    assert [r["reason"] for r in records[:3]] == ["exit"] * 3 and all(r["exit_code"] == 1 for r in records)
    assert [r["crash_loop"] for r in records[:3]] == [False, False, True]
    assert records[2]["delay_ms"] == 1500  # straight to restart_max_ms
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    # Stopped while waiting out the delay (no worker running): exits 0 at once.
    started = time.monotonic()
    assert sup.stop() == 0
    assert time.monotonic() - started < 3


def test_config_error_retried_slowly(tmp_path: Path, endpoint: EndpointProc,
                                    supervisors: list[SupervisorProc]) -> None:
    broken = bundle(tmp_path, "broken", "raise ImportError('no such dependency: frobnicate')")
    sup = SupervisorProc(tmp_path / "sup", endpoint.listen, endpoint.ca, endpoint.agent_token, [broken],
                         extra=FAST.replace("restart_max_ms = 1500", "restart_max_ms = 800"))
    supervisors.append(sup)
    sup.start()  # the bundle does not keep the supervisor from starting
    records = wait_for(lambda: len(r := sup.restarts()) >= 2 and r, 20, "two restart records")
    assert all(r["reason"] == "config_error" and r["exit_code"] == 2 and r["delay_ms"] == 800 for r in records)
    assert "frobnicate" in sup.log()
    # Fixed: the next attempt runs and connects.
    (broken / "broken.py").write_text("from pyagent.runtime import Agent\n\nclass Thing(Agent):\n    pass\n")
    wait_for(lambda: (sup.state / "agent-id").exists(), 20, "the worker to start once the bundle is fixed")
    endpoint.wait_connected(sup.agent_id)
    assert sup.proc is not None and sup.proc.poll() is None


def test_bad_config_file_refused_at_start(tmp_path: Path) -> None:
    sup = SupervisorProc(tmp_path / "sup", "127.0.0.1:9", ANY_FILE, "unused", [], extra="[supervisor]\nbogus = 1\n")
    result = subprocess.run([host_binary(), "--config", str(sup.config)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown key 'supervisor.bogus'" in result.stderr
    assert not (sup.state / "pyagent.lock").exists()


def test_rss_cap_restarts_worker_with_reason(tmp_path: Path, endpoint: EndpointProc,
                                             supervisors: list[SupervisorProc]) -> None:
    sup = SupervisorProc(tmp_path / "sup", endpoint.listen, endpoint.ca, endpoint.agent_token,
                         [BUNDLES / "hello"], extra=FAST + "max_rss_mb = 1\ncheck_interval_ms = 200\n")
    supervisors.append(sup)
    sup.start()
    rec = wait_for(lambda: sup.restarts(), 30, "a restart record")[0]
    assert rec["reason"] == "rss_cap" and "max_rss_kb=1024" in rec["detail"]
    rss = int(rec["detail"].split("rss_kb=")[1].split()[0])
    assert rss > 1024
    # Stopped with SIGTERM: a clean shutdown (exit 0), SIGTERM's default action when it came before the runtime's
    # handlers were installed, or SIGKILL after stop_timeout_ms.
    assert rec["exit_code"] == 0 or rec["signal"] in (signal.SIGTERM, signal.SIGKILL), rec
    cap = sup.events("supervisor.cap")[0]
    assert cap["reason"] == "rss_cap" and cap["pid"] == str(rec["worker_pid"])
    wait_for(lambda: len(sup.worker_pids()) >= 2, 10, "the worker to be started again")


def test_cpu_cap_restarts_spinning_worker(tmp_path: Path, endpoint: EndpointProc,
                                          supervisors: list[SupervisorProc]) -> None:
    spinner = bundle(tmp_path, "spin", "import threading\n\ndef spin() -> None:\n    while True:\n        pass\n\n"
                     "threading.Thread(target=spin, daemon=True).start()")
    sup = SupervisorProc(tmp_path / "sup", endpoint.listen, endpoint.ca, endpoint.agent_token, [spinner],
                         extra=FAST + "max_cpu_percent = 30\ncheck_interval_ms = 200\n")
    supervisors.append(sup)
    sup.start()
    rec = wait_for(lambda: sup.restarts(), 30, "a restart record")[0]
    assert rec["reason"] == "cpu_cap" and "checks=3" in rec["detail"]
    pct = float(rec["detail"].split("cpu_percent=")[1].split()[0])
    assert pct > 30
    assert rec["uptime_ms"] >= 3 * 200



def check_config(config: Path, *extra: str) -> tuple[int, dict[str, Any] | None, str]:
    result = subprocess.run([host_binary(), "check-config", "--json", *extra, "--config", str(config)],
                            capture_output=True, text=True, timeout=30)
    return result.returncode, json.loads(result.stdout) if result.stdout.strip() else None, result.stderr


def test_check_config_json_settings(tmp_path: Path) -> None:
    """What the supervisor reads: the resolved settings, also when a bundle is bad (but not with --no-bundles,
    which the supervisor uses so that a bundle never keeps it from starting)."""
    broken = bundle(tmp_path, "broken", "raise ImportError('frobnicate')")
    sup = SupervisorProc(tmp_path / "a", "127.0.0.1:9", ANY_FILE, "t", [broken],
                         extra="[supervisor]\nmax_rss_mb = 200\nmax_cpu_percent = 75.5\n")
    code, doc, err = check_config(sup.config)
    assert code == 2 and doc is not None and "frobnicate" in err
    assert doc["ok"] is False and "frobnicate" in doc["error"] and doc["state_dir"] == str(sup.state)
    code, doc, _ = check_config(sup.config, "--no-bundles")
    assert code == 0 and doc == {
        "ok": True, "config": str(sup.config), "state_dir": str(sup.state), "log_level": "debug",
        "supervisor": {"max_rss_mb": 200, "max_cpu_percent": 75.5, "check_interval_ms": 5000, "restart_min_ms": 1000,
                       "restart_max_ms": 60000, "stable_ms": 60000, "crash_loop_count": 5,
                       "crash_loop_window_ms": 120000, "stop_timeout_ms": 5000, "probation_ms": 30000,
                                      "probation_handshake_ms": 120000}}
    bad = SupervisorProc(tmp_path / "b", "127.0.0.1:9", ANY_FILE, "t", [],
                         extra="[supervisor]\nrestart_min_ms = 500\nrestart_max_ms = 100\n")
    code, doc, err = check_config(bad.config, "--no-bundles")
    assert code == 2 and doc is not None and set(doc) == {"ok", "error"}
    assert "'supervisor.restart_max_ms' (100) must not be less than 'supervisor.restart_min_ms' (500)" in doc["error"]
    result = subprocess.run([host_binary(), "--foreground", "--json", "--config", str(sup.config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--json goes with check-config" in result.stderr
