"""Swap, probation, commit and rollback (docs/updates.md §3) with the real supervisor: `pyagent-host --config FILE`
supervising real workers connected to a real endpoint over TLS on 127.0.0.1. The updater is not involved: each test
makes the state an updater (or a supervisor killed half-way) would leave — version directories under
STATE/host/ and STATE/bundles/<name>/, `updates/staged.json`, `updates/probation.json` — and checks what the
supervisor makes of it: which binary and bundle version the worker runs, `updates/updates.jsonl`, the `current`
links, and that the agent answers calls afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from harness import BUNDLES, TEST_BUNDLES, EndpointProc, SupervisorProc, alive, host_binary, wait_for

pytestmark = pytest.mark.integration

PROBATION_MS = 2000
HANDSHAKE_MS = 3000  # a new version that has not marked itself healthy by then is rolled back


def fast(probation_ms: int = PROBATION_MS) -> str:
    """Short delays so every path runs in a second or two."""
    return ("[supervisor]\nrestart_min_ms = 100\nrestart_max_ms = 1500\nstable_ms = 3000\ncrash_loop_count = 3\n"
            f"crash_loop_window_ms = 20000\nstop_timeout_ms = 2000\nprobation_ms = {probation_ms}\n"
            f"probation_handshake_ms = {HANDSHAKE_MS}\n")


ALLOW_LIFECYCLE = "[allow]\nlifecycle = true\n"


def make_bundle(where: Path, version: str, body: str = "") -> Path:
    """Bundle `upd` at `where`: object `upd` whose `version()` says which version answers; `body` runs at import."""
    where.mkdir(parents=True)
    (where / "bundle.toml").write_text(f'name = "upd"\nversion = "{version}"\nentry = "upd:Upd"\n')
    (where / "upd.py").write_text(
        f"from pyagent.runtime import Agent, method\n{body}\n\n"
        f"class Upd(Agent):\n    @method\n    def version(self) -> str:\n        return {version!r}\n")
    return where


def stage(state: Path, kind: str, name: str, version: str, rollout: str | None = "r-test") -> None:
    """What the updater writes once a version is in place (atomically: temporary file + rename)."""
    updates = state / "updates"
    updates.mkdir(parents=True, exist_ok=True)
    folder = state / "host" / version if kind == "host" else state / "bundles" / name / version
    tmp = updates / "staged.json.tmp"
    tmp.write_text(json.dumps({"kind": kind, "name": name, "version": version, "dir": str(folder),
                               "rollout": rollout}))
    tmp.rename(updates / "staged.json")


def settled(state: Path, end: str) -> bool:
    """`end` was recorded and the supervisor finished the step (the record comes before the files go)."""
    updates = state / "updates"
    return end in states(state) and not (updates / "probation.json").exists() and not (updates / "healthy").exists()


def records(state: Path) -> list[dict[str, Any]]:
    path = state / "updates" / "updates.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def states(state: Path) -> list[str]:
    return [r["state"] for r in records(state)]


def link(path: Path) -> str | None:
    return os.readlink(path) if path.is_symlink() else None


def exe_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/exe")


def worker_pid(endpoint: EndpointProc, sup: SupervisorProc) -> int:
    body = endpoint.call(sup.agent_id, "probe.pid")
    assert "result" in body, body
    return int(body["result"])


def serving(endpoint: EndpointProc, sup: SupervisorProc, pid: int) -> bool:
    """The worker `pid` answers calls (the agent may still be reconnecting)."""
    try:
        return worker_pid(endpoint, sup) == pid
    except Exception:
        return False


def new_sup(tmp_path: Path, endpoint: EndpointProc, supervisors: list[SupervisorProc], bundles: list[Path],
            extra: str = "", probation_ms: int = PROBATION_MS) -> SupervisorProc:
    sup = SupervisorProc(tmp_path / "sup", endpoint.listen, endpoint.ca, endpoint.agent_token,
                         [*bundles, TEST_BUNDLES / "probe"], extra=fast(probation_ms) + extra)
    supervisors.append(sup)
    return sup


def last_worker(sup: SupervisorProc) -> int:
    return sup.worker_pids()[-1]


def test_host_update_runs_from_link_and_commits(tmp_path: Path, endpoint: EndpointProc,
                                                supervisors: list[SupervisorProc]) -> None:
    sup = new_sup(tmp_path, endpoint, supervisors, [BUNDLES / "hello"])
    (sup.state / "host" / "9.9.9").mkdir(parents=True)
    shutil.copy2(host_binary(), sup.state / "host" / "9.9.9" / "pyagent-host")
    stage(sup.state, "host", "pyagent-host", "9.9.9")
    sup.start()
    [swap] = sup.events("supervisor.update.swap")
    assert swap["kind"] == "host" and swap["version"] == "9.9.9" and swap["previous"] == "-"
    assert link(sup.state / "host" / "current") == "9.9.9"
    assert not (sup.state / "updates" / "staged.json").exists()
    probation = json.loads((sup.state / "updates" / "probation.json").read_text())
    assert probation["previous"] == "" and probation["version"] == "9.9.9" and probation["rollout"] == "r-test"
    started = sup.events("supervisor.worker.started")[0]
    assert started["exe"].strip('"') == str(sup.state / "host" / "current" / "pyagent-host")
    pid = int(started["pid"])
    assert exe_of(pid) == str(sup.state / "host" / "9.9.9" / "pyagent-host")
    assert sup.events("supervisor.update.probation")[0]["probation_ms"] == str(PROBATION_MS)
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the updated host to answer calls")
    assert endpoint.call(sup.agent_id, "hello.greet", {"name": "v9"}) == {"result": "Hello, v9!"}
    # The worker marks itself healthy after its handshake; probation_ms after its start the update is committed.
    wait_for(lambda: settled(sup.state, "committed"), PROBATION_MS / 1000 + 20, "the commit")
    assert states(sup.state) == ["probation", "committed"]
    rec = records(sup.state)[1]
    assert rec["kind"] == "host" and rec["name"] == "pyagent-host" and rec["version"] == "9.9.9"
    assert rec["rollout"] == "r-test" and rec["seq"] == 2
    assert not (sup.state / "updates" / "probation.json").exists()
    assert not (sup.state / "updates" / "healthy").exists()
    assert sup.worker_pids() == [pid] and sup.restarts() == []


def test_host_that_exits_at_once_is_rolled_back(tmp_path: Path, endpoint: EndpointProc,
                                                supervisors: list[SupervisorProc]) -> None:
    sup = new_sup(tmp_path, endpoint, supervisors, [BUNDLES / "hello"])
    bad = sup.state / "host" / "6.6.6" / "pyagent-host"
    bad.parent.mkdir(parents=True)
    bad.write_text("#!/bin/sh\nexit 1\n")
    bad.chmod(0o755)
    stage(sup.state, "host", "pyagent-host", "6.6.6")
    sup.start()
    wait_for(lambda: settled(sup.state, "rolled_back"), 20, "the rollback")
    rec = records(sup.state)[-1]
    assert rec["detail"] == "exit code 1" and rec["version"] == "6.6.6" and rec["previous"] == ""
    assert link(sup.state / "host" / "current") is None  # no host update before: the link is gone
    assert not (sup.state / "updates" / "probation.json").exists()
    # Restarted at once on the installed binary, which enrolls and serves.
    wait_for(lambda: len(sup.worker_pids()) >= 2, 10, "the restart")
    second = sup.events("supervisor.worker.started")[1]
    assert os.path.realpath(second["exe"].strip('"')) == os.path.realpath(host_binary())
    [restart] = sup.restarts()
    assert restart["reason"] == "rolled_back" and restart["delay_ms"] == 0 and restart["exit_code"] == 1
    assert restart["detail"] == "exit code 1" and restart["crash_loop"] is False
    pid = sup.worker_pids()[1]
    assert os.path.realpath(exe_of(pid)) == os.path.realpath(host_binary())
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the installed host to answer calls")
    assert not sup.events("supervisor.crash_loop")


def test_host_without_handshake_rolled_back_to_previous_host(tmp_path: Path, endpoint: EndpointProc,
                                                             supervisors: list[SupervisorProc]) -> None:
    """A host update already committed (link on 9.9.9); the next one never reports healthy: after
    probation_handshake_ms it
    is stopped and the link goes back to 9.9.9, not to the installed binary."""
    sup = new_sup(tmp_path, endpoint, supervisors, [BUNDLES / "hello"], extra=ALLOW_LIFECYCLE)
    good = sup.state / "host" / "9.9.9"
    good.mkdir(parents=True)
    shutil.copy2(host_binary(), good / "pyagent-host")
    (sup.state / "host" / "current").symlink_to("9.9.9")
    mute = sup.state / "host" / "7.7.7" / "pyagent-host"
    mute.parent.mkdir(parents=True)
    mute.write_text("#!/bin/sh\nexec sleep 60\n")  # runs, never connects, never marks itself healthy
    mute.chmod(0o755)
    sup.start()
    first = last_worker(sup)
    assert exe_of(first) == str(good / "pyagent-host")
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, first), 30, "the 9.9.9 worker to answer calls")
    # Staged while running; agent.restart (exit 75) makes the supervisor swap it in.
    stage(sup.state, "host", "pyagent-host", "7.7.7")
    time.sleep(0.2)  # past restart_min_ms: the requested restart is immediate
    assert endpoint.call(sup.agent_id, "agent.restart").get("result", {}).get("exit_code") == 75
    wait_for(lambda: len(sup.worker_pids()) >= 2, 10, "the worker on 7.7.7")
    mute_pid = sup.worker_pids()[1]
    assert link(sup.state / "host" / "current") == "7.7.7"
    wait_for(lambda: settled(sup.state, "rolled_back"), HANDSHAKE_MS / 1000 + 10, "the rollback")
    rec = records(sup.state)[-1]
    assert rec["detail"] == "no healthy handshake within probation_handshake_ms"
    assert rec["version"] == "7.7.7" and rec["previous"] == "9.9.9"
    assert link(sup.state / "host" / "current") == "9.9.9"
    wait_for(lambda: len(sup.worker_pids()) >= 3, 10, "the worker back on 9.9.9")
    assert not alive(mute_pid)
    third = sup.worker_pids()[2]
    assert exe_of(third) == str(good / "pyagent-host")
    wait_for(lambda: serving(endpoint, sup, third), 30, "the 9.9.9 worker to answer calls again")
    reasons = [r["reason"] for r in sup.restarts()]
    assert reasons == ["restart_requested", "rolled_back"]
    assert sup.restarts()[1]["delay_ms"] == 0
    assert states(sup.state) == ["probation", "rolled_back"]


def test_bundle_that_raises_at_import_is_rolled_back(tmp_path: Path, endpoint: EndpointProc,
                                                     supervisors: list[SupervisorProc]) -> None:
    v1 = make_bundle(tmp_path / "upd-1", "1.0.0")
    sup = new_sup(tmp_path, endpoint, supervisors, [v1])
    make_bundle(sup.state / "bundles" / "upd" / "2.0.0", "2.0.0", "raise ImportError('no module named frobnicate')")
    stage(sup.state, "bundle", "upd", "2.0.0")
    sup.start()
    assert link(sup.state / "bundles" / "upd" / "current") == "2.0.0" or "rolled_back" in states(sup.state)
    wait_for(lambda: settled(sup.state, "rolled_back"), 20, "the rollback")
    rec = records(sup.state)[-1]
    assert rec["kind"] == "bundle" and rec["name"] == "upd" and rec["version"] == "2.0.0"
    assert rec["detail"] == "exit code 2" and rec["previous"] == ""
    assert link(sup.state / "bundles" / "upd" / "current") is None
    assert "frobnicate" in sup.log()
    wait_for(lambda: len(sup.worker_pids()) >= 2, 10, "the restart")
    pid = sup.worker_pids()[1]
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the worker on 1.0.0")
    assert endpoint.call(sup.agent_id, "upd.version") == {"result": "1.0.0"}
    [restart] = sup.restarts()
    assert restart["reason"] == "rolled_back" and restart["delay_ms"] == 0 and restart["exit_code"] == 2


def test_bundle_update_committed_after_probation(tmp_path: Path, endpoint: EndpointProc,
                                                 supervisors: list[SupervisorProc]) -> None:
    v1 = make_bundle(tmp_path / "upd-1", "1.0.0")
    sup = new_sup(tmp_path, endpoint, supervisors, [v1])
    versions = sup.state / "bundles" / "upd"
    make_bundle(versions / "0.5.0", "0.5.0")  # an older install: pruned by the commit
    make_bundle(versions / "1.5.0", "1.5.0")
    (versions / "current").symlink_to("1.5.0")
    make_bundle(versions / "2.0.0", "2.0.0")
    time.sleep(0.05)  # the commit prunes only directories older than the swap
    stage(sup.state, "bundle", "upd", "2.0.0")
    sup.start()
    pid = last_worker(sup)
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the worker")
    assert endpoint.call(sup.agent_id, "upd.version") == {"result": "2.0.0"}
    assert (sup.state / "updates" / "probation.json").exists() or "committed" in states(sup.state)
    wait_for(lambda: settled(sup.state, "committed"), PROBATION_MS / 1000 + 20, "the commit")
    assert states(sup.state) == ["probation", "committed"]
    assert records(sup.state)[1]["previous"] == "1.5.0"
    # Pruned after the files are settled: current and previous stay, the older install goes.
    wait_for(lambda: sorted(p.name for p in versions.iterdir()) == ["1.5.0", "2.0.0", "current"], 5,
             "0.5.0 to be pruned")
    assert sup.events("supervisor.update.pruned")[0]["removed"] == "1"
    assert link(versions / "current") == "2.0.0"
    assert sup.worker_pids() == [pid] and sup.restarts() == []
    assert endpoint.call(sup.agent_id, "upd.version") == {"result": "2.0.0"}


def test_bundle_crashing_after_start_is_rolled_back(tmp_path: Path, endpoint: EndpointProc,
                                                    supervisors: list[SupervisorProc]) -> None:
    """The new version loads and connects, then the worker dies of a signal within its probation."""
    v1 = make_bundle(tmp_path / "upd-1", "1.0.0")
    sup = new_sup(tmp_path, endpoint, supervisors, [v1])
    make_bundle(sup.state / "bundles" / "upd" / "2.0.0", "2.0.0",
                "import os, signal, threading\n"
                "threading.Timer(0.8, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()")
    stage(sup.state, "bundle", "upd", "2.0.0")
    sup.start()
    wait_for(lambda: settled(sup.state, "rolled_back"), 20, "the rollback")
    assert records(sup.state)[-1]["detail"] == f"signal {int(signal.SIGKILL)}"
    wait_for(lambda: len(sup.worker_pids()) >= 2, 10, "the restart")
    pid = sup.worker_pids()[1]
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the worker on 1.0.0")
    assert endpoint.call(sup.agent_id, "upd.version") == {"result": "1.0.0"}


def test_supervisor_killed_mid_swap_recovers(tmp_path: Path, endpoint: EndpointProc,
                                             supervisors: list[SupervisorProc]) -> None:
    """State left by a supervisor killed between the link's rename and the removal of staged.json (both files, the
    link already on the new version): the next supervisor redoes the swap with the recorded previous version."""
    v1 = make_bundle(tmp_path / "upd-1", "1.0.0")
    # A long probation for the first supervisor: it is killed before its verdict, however slow the machine.
    sup = new_sup(tmp_path, endpoint, supervisors, [v1], probation_ms=60000)
    versions = sup.state / "bundles" / "upd"
    make_bundle(versions / "1.5.0", "1.5.0")
    make_bundle(versions / "2.0.0", "2.0.0")
    (versions / "current").symlink_to("2.0.0")
    stage(sup.state, "bundle", "upd", "2.0.0")
    (sup.state / "updates" / "probation.json").write_text(json.dumps(
        {"kind": "bundle", "name": "upd", "version": "2.0.0", "previous": "1.5.0", "rollout": None,
         "unix_ms": 1}))
    sup.start()
    assert sup.events("supervisor.update.swap_redo")
    assert sup.events("supervisor.update.swap")[0]["previous"] == "1.5.0"
    assert not (sup.state / "updates" / "staged.json").exists()
    pid = last_worker(sup)
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the worker")
    assert endpoint.call(sup.agent_id, "upd.version") == {"result": "2.0.0"}
    # Now a real SIGKILL of the supervisor during the probation: its worker goes with it, the next supervisor
    # continues the probation (fresh timer) and commits.
    assert sup.proc is not None
    sup.proc.kill()
    sup.proc.wait(5)
    wait_for(lambda: not alive(pid), 10, "the worker to follow its supervisor")
    assert (sup.state / "updates" / "probation.json").exists() and "committed" not in states(sup.state)
    again = SupervisorProc(sup.workdir, endpoint.listen, endpoint.ca, endpoint.agent_token,
                           [v1, TEST_BUNDLES / "probe"], extra=fast())
    again.log_path = sup.workdir / "supervisor-2.log"
    supervisors.append(again)
    again.start()
    assert again.events("supervisor.update.probation_continued")
    pid2 = last_worker(again)
    wait_for(lambda: serving(endpoint, again, pid2), 30, "the new supervisor's worker")
    assert endpoint.call(again.agent_id, "upd.version") == {"result": "2.0.0"}
    wait_for(lambda: settled(again.state, "committed"), PROBATION_MS / 1000 + 20, "the commit")
    rec = records(again.state)[-1]
    assert rec["previous"] == "1.5.0" and rec["version"] == "2.0.0"
    assert [r["seq"] for r in records(again.state)] == list(range(1, len(records(again.state)) + 1))


def test_bad_staged_json_is_refused_and_worker_starts(tmp_path: Path, endpoint: EndpointProc,
                                                      supervisors: list[SupervisorProc]) -> None:
    v1 = make_bundle(tmp_path / "upd-1", "1.0.0")
    sup = new_sup(tmp_path, endpoint, supervisors, [v1])
    make_bundle(sup.state / "bundles" / "upd" / "2.0.0", "2.0.0")
    stage(sup.state, "bundle", "upd", "../../../etc")
    sup.start()
    [rec] = records(sup.state)
    assert rec["state"] == "failed" and "'version' \"../../../etc\" is not a valid version" in rec["detail"]
    assert rec["rollout"] == "r-test"
    assert not (sup.state / "updates" / "staged.json").exists()
    assert link(sup.state / "bundles" / "upd" / "current") is None
    assert sup.events("supervisor.update.failed")
    pid = last_worker(sup)
    wait_for(lambda: (sup.state / "agent-id").exists(), 30, "the agent id")
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the worker")
    assert endpoint.call(sup.agent_id, "upd.version") == {"result": "1.0.0"}


def test_rollback_that_cannot_rewrite_the_link_backs_off(tmp_path: Path, endpoint: EndpointProc,
                                                         supervisors: list[SupervisorProc]) -> None:
    """The link cannot be rewritten (here `.current.tmp` is a non-empty directory, which unlink(2) refuses even to
    root; in the field a read-only file system, EPERM, no inodes): an exit of the new version cannot be rolled back,
    the next start continues its probation, so the exit takes the ordinary policy — backoff, the crash-loop count —
    rather than an immediate restart into the same crash. Once the link can be written again the probation ends."""
    v1 = make_bundle(tmp_path / "upd-1", "1.0.0")
    sup = new_sup(tmp_path, endpoint, supervisors, [v1])
    versions = sup.state / "bundles" / "upd"
    blocker = versions / ".current.tmp" / "blocker"
    make_bundle(versions / "1.5.0", "1.5.0")
    (versions / "current").symlink_to("1.5.0")  # (a rollback to no version removes the link: no .current.tmp)
    # 2.0.0 dies (SIGKILL) as soon as the link is blocked, at every start.
    make_bundle(versions / "2.0.0", "2.0.0",
                "import os, signal, threading, time\n"
                "def _die():\n"
                f"    while not os.path.exists({str(blocker)!r}):\n"
                "        time.sleep(0.02)\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n"
                "threading.Thread(target=_die, daemon=True).start()")
    stage(sup.state, "bundle", "upd", "2.0.0")
    sup.start()
    assert link(versions / "current") == "2.0.0"
    blocker.mkdir(parents=True)
    wait_for(lambda: any(r["crash_loop"] for r in sup.restarts()), 30, "the crash loop to be detected")
    restarts = sup.restarts()
    assert len(restarts) >= 3
    for r in restarts:
        assert r["reason"] == "signal" and r["signal"] == int(signal.SIGKILL), r
        assert r["delay_ms"] > 0, restarts
    assert restarts[-1]["delay_ms"] == 1500  # restart_max_ms once it is a crash loop
    assert sup.events("supervisor.crash_loop")
    [failed] = sup.events("supervisor.update.rollback_failed")  # once for this update, not at every restart
    assert failed["version"] == "2.0.0" and failed["name"] == "upd"
    assert link(versions / "current") == "2.0.0"
    assert (sup.state / "updates" / "probation.json").exists()
    assert states(sup.state) == ["probation"]
    assert len(sup.events("supervisor.update.probation_continued")) >= 2
    # The link can be written again: the probation continues to its verdict (2.0.0 no longer dies: committed).
    shutil.rmtree(versions / ".current.tmp")
    wait_for(lambda: settled(sup.state, "committed"), HANDSHAKE_MS / 1000 + PROBATION_MS / 1000 + 30, "the commit")
    assert states(sup.state) == ["probation", "committed"]
    pid = last_worker(sup)
    wait_for(lambda: serving(endpoint, sup, pid), 30, "the worker on 2.0.0")
    assert endpoint.call(sup.agent_id, "upd.version") == {"result": "2.0.0"}


class InstalledSupervisor(SupervisorProc):
    """A supervisor run from its own installed copy of the host, so that a test can upgrade it the way a package
    manager does (a new file renamed over the old one) without touching the host the other tests run."""

    def __init__(self, exe: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.exe = exe

    def start(self) -> "InstalledSupervisor":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([str(self.exe), "--config", str(self.config)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(lambda: "event=supervisor.worker.started" in self.log() or self._died(), 30,
                 "the supervisor to start a worker")
        return self


def install_host(root: Path) -> Path:
    """root/bin/pyagent-host, a copy of the host under test, in a tree that finds the same Python environment: the
    venv's pyvenv.cfg and lib/ (or, installed from a package, its python/ directory) beside bin/."""
    source = Path(host_binary()).resolve()
    home = source.parent.parent
    (root / "bin").mkdir(parents=True)
    if (home / "pyvenv.cfg").exists():
        shutil.copy2(home / "pyvenv.cfg", root / "pyvenv.cfg")
        (root / "lib").symlink_to(home / "lib")
    elif (home / "python").is_dir():
        (root / "python").symlink_to(home / "python")
    else:
        raise AssertionError(f"cannot tell how {source} finds its Python environment (no pyvenv.cfg, no python/)")
    exe = root / "bin" / "pyagent-host"
    shutil.copy2(source, exe)
    return exe


def test_package_upgrade_supersedes_an_older_host_update(tmp_path: Path, endpoint: EndpointProc,
                                                         supervisors: list[SupervisorProc]) -> None:
    """A host update committed on 9.9.9; then the package manager installs a newer host. STATE/host/current still
    points at 9.9.9, but it must not shadow the upgrade: the next supervisor runs the installed binary."""
    installed = install_host(tmp_path / "inst")
    probe = [BUNDLES / "hello", TEST_BUNDLES / "probe"]
    sup = InstalledSupervisor(installed, tmp_path / "sup", endpoint.listen, endpoint.ca, endpoint.agent_token, probe,
                              extra=fast() + ALLOW_LIFECYCLE)
    supervisors.append(sup)
    (sup.state / "host" / "9.9.9").mkdir(parents=True)
    shutil.copy2(host_binary(), sup.state / "host" / "9.9.9" / "pyagent-host")
    stage(sup.state, "host", "pyagent-host", "9.9.9")
    sup.start()
    pid = last_worker(sup)
    assert exe_of(pid) == str(sup.state / "host" / "9.9.9" / "pyagent-host")
    assert (sup.state / "host" / "installed.id").exists()
    wait_for(lambda: settled(sup.state, "committed"), HANDSHAKE_MS / 1000 + PROBATION_MS / 1000 + 20, "the commit")
    sup.stop()
    # The upgrade: a new file renamed over the installed one (a new inode), as dpkg and rpm do.
    new = installed.with_name("pyagent-host.dpkg-new")
    shutil.copy2(host_binary(), new)
    new.rename(installed)
    again = InstalledSupervisor(installed, sup.workdir, endpoint.listen, endpoint.ca, endpoint.agent_token, probe,
                                extra=fast() + ALLOW_LIFECYCLE)
    again.log_path = sup.workdir / "supervisor-2.log"
    supervisors.append(again)
    again.start()
    first = last_worker(again)
    assert exe_of(first) == str(installed)
    [superseded] = again.events("supervisor.host.superseded")
    assert superseded["version"] == "9.9.9"
    assert link(sup.state / "host" / "current") == "9.9.9"  # the files stay; the next host update rewrites them
    wait_for(lambda: serving(endpoint, again, first), 30, "the installed host to answer calls")
    # Every later start runs the installed binary too; the line is logged once.
    time.sleep(0.2)  # past restart_min_ms: the requested restart is immediate
    assert endpoint.call(again.agent_id, "agent.restart").get("result", {}).get("exit_code") == 75
    wait_for(lambda: len(again.worker_pids()) >= 2, 10, "the restart")
    second = last_worker(again)
    assert exe_of(second) == str(installed)
    assert len(again.events("supervisor.host.superseded")) == 1
    wait_for(lambda: serving(endpoint, again, second), 30, "the installed host to answer calls again")
    assert states(again.state) == ["probation", "committed"]
