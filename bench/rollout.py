"""rollout_10_agents_s: release a new bundle version and roll it out to 10 real supervised agents in one wave, until
every agent reports `committed` (download, TUF verification, staging, restart, probation, commit).

Everything is real and local: `pyagent endpoint serve` and 10 `pyagent-host` supervisors (each with its worker) on
127.0.0.1, the release and the rollout through the `pyagent` CLI. The figure includes the probation period, which is
set to its minimum (`probation_ms`, printed with the result), so it measures the machinery rather than the policy.
Run alone: python bench/rollout.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _host import host_binary

AGENTS = 10
PROBATION_MS = 1000


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


def _bundle(root: Path, version: str) -> Path:
    path = root / f"greeter-{version}"
    path.mkdir(parents=True)
    (path / "bundle.toml").write_text(f'name = "greeter"\nversion = "{version}"\nentry = "greeter:Greeter"\n')
    (path / "greeter.py").write_text("from pyagent.runtime import Agent, method\n\n\nclass Greeter(Agent):\n"
                                     f"    @method\n    def version(self) -> str:\n        return {version!r}\n")
    return path


class _Api:
    def __init__(self, state: Path) -> None:
        info = json.loads((state / "endpoint.json").read_text())
        self.url = info["api"]
        self.token = (state / "operator-token").read_text().strip()

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())


def _cli(state: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "pyagent.cli", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    if proc.returncode != 0:
        raise SystemExit(f"bench: pyagent {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def rollout_10_agents() -> dict[str, Any]:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="pyagent-bench-rollout-") as tmp:
        root = Path(tmp)
        state = root / "endpoint"
        state.mkdir()
        log = open(root / "endpoint.log", "ab")
        endpoint = subprocess.Popen([sys.executable, "-m", "pyagent.cli", "endpoint", "serve", "--state-dir",
                                     str(state), "--listen", "127.0.0.1:0", "--api", "127.0.0.1:0"],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(endpoint)
        try:
            info = _wait(lambda: json.loads((state / "endpoint.json").read_text()), 30, "the endpoint")
            api = _Api(state)
            token = api.post("/api/v1/tokens", {})["token"]
            v1 = _bundle(root / "src", "1.0.0")
            for i in range(AGENTS):
                work = root / f"agent-{i}"
                work.mkdir()
                (work / "agent.toml").write_text(
                    f'name = "bench-{i}"\nstate_dir = "{work / "state"}"\nendpoints = ["{info["listen"]}"]\n'
                    f'ca = "{state / "ca.pem"}"\ntoken = "{token}"\nbundles = ["{v1}"]\n'
                    f"[supervisor]\nprobation_ms = {PROBATION_MS}\nrestart_min_ms = 100\n")
                with open(work / "host.log", "ab") as agent_log:
                    procs.append(subprocess.Popen([host_binary(), "--config", str(work / "agent.toml")], stdout=agent_log,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            _wait(lambda: sum(a["connected"] for a in api.get("/api/v1/agents")["agents"]) == AGENTS, 60,
                  "10 agents to connect")
            v2 = _bundle(root / "src", "2.0.0")

            t0 = time.perf_counter()
            _cli(state, "release", "bundle", str(v2))
            t_released = time.perf_counter()
            _cli(state, "rollout", "start", "--bundle", "greeter==2.0.0", "--waves", "100%")

            def all_committed() -> bool:
                recs = [u for u in api.get("/api/v1/updates")["updates"]
                        if u["name"] == "greeter" and u["version"] == "2.0.0"]
                failed = [u for u in recs if u["state"] in ("failed", "rolled_back", "refused")]
                if failed:
                    raise SystemExit(f"bench: updates failed: {failed}")
                return sum(u["state"] == "committed" for u in recs) == AGENTS
            _wait(all_committed, 300, "all 10 agents to commit")
            elapsed = time.perf_counter() - t0
        finally:
            for proc in reversed(procs):
                _stop(proc)
            log.close()
    return {"rollout_10_agents_s": round(elapsed, 2), "rollout_release_s": round(t_released - t0, 2),
            "rollout_probation_ms": PROBATION_MS, "rollout_agents": AGENTS}


if __name__ == "__main__":
    print(json.dumps(rollout_10_agents(), indent=2))
