"""What the update tests share: bundles made on the fly, a second host binary built with another version string,
releases and rollouts through the real CLI, and reading back what agents reported (events and per-agent states)."""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from harness import BUNDLES, TEST_BUNDLES, EndpointProc, SupervisorProc, wait_for

REPO = Path(__file__).resolve().parents[3]
PLATFORM = f"{platform.system()}-{platform.machine()}".lower()
# Short delays: restarts in ~100 ms, probation 2 s.
SUPERVISED = ("[supervisor]\nrestart_min_ms = 100\nrestart_max_ms = 1500\nstable_ms = 3000\ncrash_loop_count = 5\n"
              "crash_loop_window_ms = 20000\nstop_timeout_ms = 2000\nprobation_ms = 2000\n")
ENDED = {"committed", "rolled_back", "failed", "refused"}


def make_bundle(root: Path, version: str, *, import_code: str = "", name: str = "greeter") -> Path:
    """A bundle `name` at `version` whose method `NAME.version()` answers the version; `import_code` runs at
    import (to make a version that raises or crashes there)."""
    path = root / f"{name}-{version}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "bundle.toml").write_text(f'name = "{name}"\nversion = "{version}"\nentry = "{name}:Greeter"\n')
    (path / f"{name}.py").write_text(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from pyagent.runtime import Agent, method\n\n"
        "def my_config_dir():\n"
        "    # The worker's own command line names its config; tests put marker files beside it.\n"
        "    args = Path('/proc/self/cmdline').read_bytes().split(b'\\0')\n"
        "    return Path(os.fsdecode(args[args.index(b'--config') + 1])).parent\n\n"
        + textwrap.dedent(import_code) + "\n\n"
        "class Greeter(Agent):\n"
        "    @method\n"
        "    def version(self) -> str:\n"
        f"        return {version!r}\n")
    return path


def supervised_agent(workdir: Path, endpoint: EndpointProc, bundle: Path, extra: str = "") -> SupervisorProc:
    return SupervisorProc(workdir, endpoint.listen, endpoint.ca, endpoint.agent_token,
                          [bundle, TEST_BUNDLES / "probe"], extra=SUPERVISED + extra)


def start_connected(sup: SupervisorProc, endpoint: EndpointProc) -> SupervisorProc:
    sup.start()
    wait_for(lambda: (sup.state / "agent-id").exists() or sup._died(), 30, "the agent id")
    endpoint.wait_connected(sup.agent_id)
    return sup


def cli(endpoint: EndpointProc, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pyagent.cli", *args, "--state-dir", str(endpoint.state_dir)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"pyagent {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def version_of(endpoint: EndpointProc, agent_id: str, obj: str = "greeter") -> str | None:
    body = endpoint.call(agent_id, f"{obj}.version", timeout=5)
    return body.get("result") if isinstance(body, dict) else None


def update_events(endpoint: EndpointProc, agent_id: str) -> list[dict[str, Any]]:
    """The `update.state` data this agent reported, oldest first."""
    status, body = endpoint.api("GET", f"/api/v1/events?select={agent_id}&event=update.state&last=1000")
    assert status == 200, body
    return [e["data"] for e in body["events"]]


def states_of(endpoint: EndpointProc, agent_id: str, version: str | None = None) -> list[str]:
    return [d["state"] for d in update_events(endpoint, agent_id) if version is None or d.get("version") == version]


def agent_update(endpoint: EndpointProc, agent_id: str, name: str) -> dict[str, Any] | None:
    """The endpoint's current update record of this agent for target `name` (bundle name or "pyagent-host")."""
    status, body = endpoint.api("GET", "/api/v1/updates")
    assert status == 200, body
    for rec in body["updates"]:
        if rec["agent_id"] == agent_id and rec["name"] == name:
            return dict(rec)
    return None


def wait_update_ended(endpoint: EndpointProc, agent_id: str, name: str, version: str,
                      timeout: float = 60) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        rec = agent_update(endpoint, agent_id, name)
        return rec if rec and rec["version"] == version and rec["state"] in ENDED else None
    return wait_for(ended, timeout, f"the update of {name} to {version} on {agent_id} to end", interval=0.2)


def rollouts(endpoint: EndpointProc) -> list[dict[str, Any]]:
    status, body = endpoint.api("GET", "/api/v1/rollouts")
    assert status == 200, body
    return list(body["rollouts"])


def rollout(endpoint: EndpointProc, rollout_id: str) -> dict[str, Any]:
    status, body = endpoint.api("GET", f"/api/v1/rollouts/{rollout_id}")
    assert status == 200, body
    return dict(body)


def start_rollout(endpoint: EndpointProc, *args: str) -> dict[str, Any]:
    """`pyagent rollout start ARGS --json`: the new rollout."""
    out = cli(endpoint, "rollout", "start", *args, "--json").stdout
    return dict(json.loads(out))


@functools.cache
def built_host(version: str) -> Path:
    """pyagent-host built with PA_HOST_VERSION = version (the host update test's "new release"), against this
    venv's interpreter, incrementally in build/test-host-<version>."""
    build = REPO / "build" / f"test-host-{version}"
    for cmd in (["cmake", "-S", str(REPO), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPYAGENT_HOST_VERSION={version}", f"-DPython_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build), "-j2", "--target", "pyagent-host"]):
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    host = build / "csrc" / "pyagent-host"
    out = subprocess.run([str(host), "--version"], capture_output=True, text=True, check=True).stdout
    assert f"pyagent-host {version} " in out, out
    return host


__all__ = ["BUNDLES", "ENDED", "PLATFORM", "SUPERVISED", "agent_update", "built_host", "cli", "make_bundle",
           "rollout", "rollouts", "start_connected", "start_rollout", "states_of", "supervised_agent",
           "update_events", "version_of", "wait_update_ended"]
