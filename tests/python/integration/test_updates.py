"""Updates end to end (issue 4): real endpoint with its TUF repository, real supervised agents on 127.0.0.1, releases
and rollouts through the real CLI. A bundle and a host binary are updated; a version that fails at import or crashes
is rolled back by itself; a worker or supervisor killed in the middle leaves a runnable agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from harness import EndpointProc, SupervisorProc, alive, host_binary, wait_for
from update_lab import (PLATFORM, built_host, cli, make_bundle, start_connected, start_rollout,
                        states_of, supervised_agent, version_of, wait_update_ended)

pytestmark = pytest.mark.integration

CRASH_AT_IMPORT = "os.kill(os.getpid(), signal.SIGSEGV)\n"
RAISE_AT_IMPORT = "raise RuntimeError('greeter 3.0.0 is broken at import')\n"


def one_agent(tmp_path: Path, endpoint: EndpointProc, supervisors: list[SupervisorProc],
              name: str = "upd") -> SupervisorProc:
    v1 = make_bundle(tmp_path / "src", "1.0.0")
    sup = supervised_agent(tmp_path / name, endpoint, v1)
    supervisors.append(sup)
    start_connected(sup, endpoint)
    assert version_of(endpoint, sup.agent_id) == "1.0.0"
    return sup


def release_bundle(tmp_path: Path, endpoint: EndpointProc, version: str, import_code: str = "") -> None:
    cli(endpoint, "release", "bundle", str(make_bundle(tmp_path / "src", version, import_code=import_code)))


def test_bundle_update_end_to_end(tmp_path: Path, endpoint: EndpointProc,
                                  supervisors: list[SupervisorProc]) -> None:
    sup = one_agent(tmp_path, endpoint, supervisors)
    release_bundle(tmp_path, endpoint, "2.0.0")
    listed = cli(endpoint, "release", "ls").stdout
    assert "bundles/greeter/2.0.0.tar.gz" in listed, listed

    ro = start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
    rec = wait_update_ended(endpoint, sup.agent_id, "greeter", "2.0.0")
    assert rec["state"] == "committed" and rec.get("rollout") == ro["id"], rec
    endpoint.wait_connected(sup.agent_id)
    assert version_of(endpoint, sup.agent_id) == "2.0.0"
    # Every step was reported, in order.
    seen = states_of(endpoint, sup.agent_id, "2.0.0")
    expected = ["offered", "downloading", "verifying", "staged", "restarting", "probation", "committed"]
    firsts = [s for i, s in enumerate(seen) if s in expected and s not in seen[:i]]
    assert firsts == expected, seen
    # The agent's hello now names the new version; the staged tree is in place.
    agent = endpoint.agent(sup.agent_id)
    assert agent is not None and {"name": "greeter", "version": "2.0.0"}.items() <= {
        **next(b for b in agent["bundles"] if b["name"] == "greeter")}.items(), agent
    assert os.readlink(sup.state / "bundles" / "greeter" / "current") == "2.0.0"


def test_host_binary_update(tmp_path: Path, endpoint: EndpointProc, supervisors: list[SupervisorProc]) -> None:
    new_host = built_host("0.1.1-test")
    sup = one_agent(tmp_path, endpoint, supervisors)
    old = endpoint.agent(sup.agent_id)
    assert old is not None and old["host_version"] != "0.1.1-test"
    cli(endpoint, "release", "host", str(new_host), "--platform", PLATFORM, "--version", "0.1.1-test")
    start_rollout(endpoint, "--host", "0.1.1-test", "--waves", "100%")
    rec = wait_update_ended(endpoint, sup.agent_id, "pyagent-host", "0.1.1-test", timeout=90)
    assert rec["state"] == "committed", rec
    wait_for(lambda: (a := endpoint.agent(sup.agent_id)) and a["connected"] and a["host_version"] == "0.1.1-test",
             30, "the agent to say hello from the new host")
    # The worker really runs the staged binary; calls still work.
    pid = int(endpoint.call(sup.agent_id, "probe.pid")["result"])
    assert os.readlink(f"/proc/{pid}/exe") == str(sup.state / "host" / "0.1.1-test" / "pyagent-host")
    assert version_of(endpoint, sup.agent_id) == "1.0.0"


@pytest.mark.parametrize("import_code, reason", [(RAISE_AT_IMPORT, "exit code"), (CRASH_AT_IMPORT, "signal")],
                         ids=["raises-at-import", "crashes-at-import"])
def test_broken_bundle_rolls_back(tmp_path: Path, endpoint: EndpointProc, supervisors: list[SupervisorProc],
                                  import_code: str, reason: str) -> None:
    sup = one_agent(tmp_path, endpoint, supervisors)
    release_bundle(tmp_path, endpoint, "3.0.0", import_code)
    start_rollout(endpoint, "--bundle", "greeter==3.0.0", "--waves", "100%")
    rec = wait_update_ended(endpoint, sup.agent_id, "greeter", "3.0.0")
    assert rec["state"] == "rolled_back", rec
    assert reason in (rec.get("detail") or ""), rec
    endpoint.wait_connected(sup.agent_id)
    assert version_of(endpoint, sup.agent_id) == "1.0.0"
    assert not (sup.state / "bundles" / "greeter" / "current").exists()
    ledger = (sup.state / "updates" / "updates.jsonl").read_text()
    assert '"rolled_back"' in ledger, ledger


def test_upgrades_false_refuses_and_reports(tmp_path: Path, endpoint: EndpointProc,
                                            supervisors: list[SupervisorProc]) -> None:
    v1 = make_bundle(tmp_path / "src", "1.0.0")
    sup = supervised_agent(tmp_path / "locked", endpoint, v1, extra="")
    sup.config.write_text("upgrades = false\n" + sup.config.read_text())
    supervisors.append(sup)
    start_connected(sup, endpoint)
    release_bundle(tmp_path, endpoint, "2.0.0")
    start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
    rec = wait_update_ended(endpoint, sup.agent_id, "greeter", "2.0.0")
    assert rec["state"] == "refused" and "upgrades" in (rec.get("detail") or ""), rec
    assert version_of(endpoint, sup.agent_id) == "1.0.0"
    assert not (sup.state / "bundles" / "greeter").exists()


def test_worker_killed_in_probation_leaves_a_runnable_agent(tmp_path: Path, endpoint: EndpointProc,
                                                            supervisors: list[SupervisorProc]) -> None:
    sup = one_agent(tmp_path, endpoint, supervisors)
    release_bundle(tmp_path, endpoint, "2.0.0")
    start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
    wait_for(lambda: (sup.state / "updates" / "probation.json").exists(), 60, "the probation to start",
             interval=0.01)
    pid = wait_for(lambda: sup.worker_pids()[-1] if len(sup.worker_pids()) >= 2 else None, 10, "the new worker")
    os.kill(pid, signal.SIGKILL)
    rec = wait_update_ended(endpoint, sup.agent_id, "greeter", "2.0.0")
    assert rec["state"] == "rolled_back", rec
    endpoint.wait_connected(sup.agent_id)
    assert version_of(endpoint, sup.agent_id) == "1.0.0"


def test_supervisor_killed_mid_swap_recovers(tmp_path: Path, endpoint: EndpointProc,
                                             supervisors: list[SupervisorProc]) -> None:
    sup = one_agent(tmp_path, endpoint, supervisors)
    release_bundle(tmp_path, endpoint, "2.0.0")
    start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
    wait_for(lambda: (sup.state / "updates" / "probation.json").exists(), 60, "the swap", interval=0.01)
    assert sup.proc is not None
    sup.proc.kill()
    sup.proc.wait(10)
    for pid in sup.worker_pids():  # the worker follows its supervisor (PR_SET_PDEATHSIG)
        wait_for(lambda: not alive(pid), 10, f"worker {pid} to exit")
    sup.start()
    endpoint.wait_connected(sup.agent_id)
    # Either version is runnable; this one finishes its probation and commits.
    rec = wait_update_ended(endpoint, sup.agent_id, "greeter", "2.0.0")
    assert rec["state"] == "committed", rec
    assert version_of(endpoint, sup.agent_id) == "2.0.0"


def test_offline_agent_updated_when_it_returns(tmp_path: Path, endpoint: EndpointProc,
                                               supervisors: list[SupervisorProc]) -> None:
    online = one_agent(tmp_path, endpoint, supervisors, name="online")
    offline = supervised_agent(tmp_path / "offline", endpoint, make_bundle(tmp_path / "src", "1.0.0"))
    supervisors.append(offline)
    start_connected(offline, endpoint)
    offline.stop()
    wait_for(lambda: not endpoint.agent(offline.agent_id)["connected"], 20, "the agent to be offline")
    release_bundle(tmp_path, endpoint, "2.0.0")
    # One wave: with two, an offline canary would hold wave 1 until it returns (no judged end, docs/updates.md §4).
    ro = start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
    assert wait_update_ended(endpoint, online.agent_id, "greeter", "2.0.0")["state"] == "committed"
    status, body = endpoint.api("GET", f"/api/v1/rollouts/{ro['id']}")
    assert status == 200 and body["state"] in ("running", "completed"), body
    offline.start()
    rec = wait_update_ended(endpoint, offline.agent_id, "greeter", "2.0.0")
    assert rec["state"] == "committed", rec
    endpoint.wait_connected(offline.agent_id)
    assert version_of(endpoint, offline.agent_id) == "2.0.0"


def test_expired_metadata_and_no_repository_keep_the_agent(tmp_path: Path, supervisors: list[SupervisorProc]) -> None:
    """The agent's trusted timestamp has expired (4 s lifetime here) and the repository (the endpoint) is gone: the
    running agent is not disturbed, a restarted worker starts, and an update attempt fails with a reason."""
    endpoint = EndpointProc(tmp_path / "endpoint", heartbeat_interval=0.5,
                            extra_args=["--tuf-timestamp-expiry", "4"]).start()
    try:
        sup = one_agent(tmp_path, endpoint, supervisors)
        release_bundle(tmp_path, endpoint, "2.0.0")
        start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
        assert wait_update_ended(endpoint, sup.agent_id, "greeter", "2.0.0")["state"] == "committed"
        endpoint.wait_connected(sup.agent_id)
    finally:
        endpoint.stop()
    ts = sup.state / "tuf" / "metadata" / "timestamp.json"
    assert ts.exists(), sorted(str(p) for p in (sup.state / "tuf").rglob("*"))
    first = sup.worker_pids()[-1]
    wait_for(lambda: expired(ts), 15, "the trusted timestamp to expire")
    assert alive(first), "the running worker must not depend on fresh metadata"
    os.kill(first, signal.SIGKILL)  # a worker start with expired metadata and no endpoint
    wait_for(lambda: len(sup.worker_pids()) >= 2 and alive(sup.worker_pids()[-1]), 20, "a new worker")
    proc = subprocess.run([host_binary(), "update", "--config", str(sup.config), "--kind", "bundle",
                           "--name", "greeter", "--version", "3.0.0", "--target", "bundles/greeter/3.0.0.tar.gz"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["state"] == "failed" and last["reason"] in ("repository_unreachable", "metadata_expired"), proc.stdout
    assert alive(sup.worker_pids()[-1])
    assert os.readlink(sup.state / "bundles" / "greeter" / "current") == "2.0.0"
    assert not (sup.state / "updates" / "staged.json").exists()


def expired(metadata_file: Path) -> bool:
    expires = json.loads(metadata_file.read_text())["signed"]["expires"]
    return datetime.fromisoformat(expires.replace("Z", "+00:00")) < datetime.now(timezone.utc)
