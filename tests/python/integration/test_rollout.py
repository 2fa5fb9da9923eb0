"""A rollout across 10 real supervised agents where the new version fails on some: the rollout halts itself at its
gate, agents past the gate are never offered the update, and every agent keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness import EndpointProc, SupervisorProc, wait_for
from update_lab import cli, make_bundle, rollout, start_rollout, states_of, supervised_agent, version_of

pytestmark = pytest.mark.integration

AGENTS = 10
# Version 2.0.0 raises at import on an agent whose config directory holds a file named "fail-2.0.0".
FAILS_WHERE_MARKED = ("if (my_config_dir() / 'fail-2.0.0').exists():\n"
                      "    raise RuntimeError('greeter 2.0.0 does not work on this machine')\n")


def test_rollout_halts_at_its_gate(tmp_path: Path, endpoint: EndpointProc,
                                   supervisors: list[SupervisorProc]) -> None:
    v1 = make_bundle(tmp_path / "src", "1.0.0")
    agents: dict[str, SupervisorProc] = {}
    for i in range(AGENTS):
        sup = supervised_agent(tmp_path / f"fleet-{i}", endpoint, v1)
        supervisors.append(sup)
        sup.start()
    for sup in supervisors:
        start_connected_wait(sup, endpoint)
        agents[sup.agent_id] = sup
    cli(endpoint, "release", "bundle", str(make_bundle(tmp_path / "src", "2.0.0", import_code=FAILS_WHERE_MARKED)))

    ro = start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "10%,50%,100%",
                       "--max-failure-rate", "20%")
    members = rollout(endpoint, ro["id"])["agents"]
    assert len(members) == AGENTS, members
    waves = {m["agent_id"]: m["wave"] for m in members}
    first = [a for a, w in waves.items() if w == 1]
    second = [a for a, w in waves.items() if w == 2]
    third = [a for a, w in waves.items() if w == 3]
    assert len(first) == 1 and len(first) + len(second) == 5 and len(third) == 5, waves
    # Wave 2 cannot start before wave 1's agent has passed its 2 s probation: time enough to make 2.0.0 fail on two
    # of wave 2's agents (2 failures of 5 ended = 40% > 20%).
    for agent_id in second[:2]:
        (agents[agent_id].workdir / "fail-2.0.0").touch()

    halted = wait_for(lambda: (r := rollout(endpoint, ro["id"]))["state"] != "running" and r, 120,
                      "the rollout to halt", interval=0.25)
    assert halted["state"] == "halted", halted
    assert "failure rate" in halted.get("reason", ""), halted
    # The halt stops new offers; updates already offered run to their end (a marked agent rolls back by itself).
    in_progress = {"offered", "downloading", "verifying", "staged", "restarting", "probation"}

    def all_ended() -> dict[str, Any] | None:
        r = rollout(endpoint, ro["id"])
        return None if any(m["state"] in in_progress for m in r["agents"]) else r
    settled = wait_for(all_ended, 60, "updates already offered to end", interval=0.25)
    assert settled["state"] == "halted", settled
    by_agent = {m["agent_id"]: m for m in settled["agents"]}
    for agent_id in second[:2]:
        assert by_agent[agent_id]["state"] in ("rolled_back", "pending"), (by_agent[agent_id], settled)
    assert any(by_agent[a]["state"] == "rolled_back" for a in second[:2]), by_agent
    for agent_id in first + second[2:]:
        assert by_agent[agent_id]["state"] in ("committed", "pending"), by_agent[agent_id]
    for agent_id in third:
        assert "offered" not in states_of(endpoint, agent_id, "2.0.0"), agent_id
        assert by_agent[agent_id]["state"] in ("pending", "waiting"), by_agent[agent_id]
    # Every agent still answers.
    for agent_id in agents:
        endpoint.wait_connected(agent_id, timeout=60)
        assert version_of(endpoint, agent_id) in ("1.0.0", "2.0.0")
    for agent_id in second[:2] + third:
        assert version_of(endpoint, agent_id) == "1.0.0"

    # The CLI's status names the halt.
    out = cli(endpoint, "rollout", "status", ro["id"]).stdout
    assert "halted" in out, out


def start_connected_wait(sup: SupervisorProc, endpoint: EndpointProc) -> None:
    wait_for(lambda: (sup.state / "agent-id").exists() or sup._died(), 60, "the agent id")
    endpoint.wait_connected(sup.agent_id, timeout=60)

