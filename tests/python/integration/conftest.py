from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import AgentProc, EndpointProc, SupervisorProc

pytestmark = pytest.mark.integration


@pytest.fixture
def endpoint(tmp_path: Path) -> Iterator[EndpointProc]:
    ep = EndpointProc(tmp_path / "endpoint", heartbeat_interval=0.5).start()
    yield ep
    ep.stop()


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[type]:
    started: list[AgentProc] = []

    def make(*args: object, **kwargs: object) -> AgentProc:
        agent = AgentProc(*args, **kwargs)  # type: ignore[arg-type]
        started.append(agent)
        return agent

    yield make  # type: ignore[misc]
    for agent in started:
        agent.stop()


@pytest.fixture
def agent(tmp_path: Path, endpoint: EndpointProc, make_agent: type) -> AgentProc:
    a: AgentProc = make_agent(tmp_path / "agent", [endpoint], endpoint.ca, endpoint.agent_token).start()
    endpoint.wait_connected(a.agent_id)
    return a


@pytest.fixture
def supervisors() -> Iterator[list[SupervisorProc]]:
    started: list[SupervisorProc] = []
    yield started
    for sup in started:
        sup.stop()
