"""The agent-call policy and the parameter checks of `registry.discover` / `agent.call` (`_discovery.py`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyagent.endpoint import EndpointConfig
from pyagent.endpoint._discovery import POLICIES, call_denied, parse_call, parse_discover
from pyagent.endpoint._errors import ConfigError
from pyagent.endpoint._targets import AgentView
from pyagent.protocol import INVALID_PARAMS, RemoteError

A1 = AgentView("id-a1", "a1", labels={"group": "a"})
A2 = AgentView("id-a2", "a2", labels={"group": "a", "env": "prod"})
B1 = AgentView("id-b1", "b1", labels={"group": "b"})
N1 = AgentView("id-n1", "n1")
N2 = AgentView("id-n2", "n2", labels={"env": "prod"})


def test_same_group_policy() -> None:
    assert call_denied("same-group", A1, A2) is None
    assert call_denied("same-group", A1, A1) is None
    assert call_denied("same-group", N1, N1) is None  # no group: itself only
    reason = call_denied("same-group", A1, B1)
    assert reason is not None and "group 'b', not in the caller's group 'a'" in reason
    reason = call_denied("same-group", A1, N1)
    assert reason is not None and "is in no group" in reason
    reason = call_denied("same-group", N1, N2)
    assert reason is not None and "has no 'group' label" in reason
    # Two agents without a group are not "the same group".
    assert call_denied("same-group", N2, N1) is not None


def test_any_and_none_policies() -> None:
    for caller, callee in ((A1, B1), (N1, A1), (N1, N2), (A1, A1)):
        assert call_denied("any", caller, callee) is None
        reason = call_denied("none", caller, callee)
        assert reason is not None and "'none'" in reason
    with pytest.raises(ValueError, match="unknown agent-call policy 'some'"):
        call_denied("some", A1, A2)


def test_policy_in_endpoint_config(tmp_path: Path) -> None:
    assert EndpointConfig(tmp_path).agent_call_policy == "same-group"
    for policy in POLICIES:
        assert EndpointConfig(tmp_path, agent_call_policy=policy).agent_call_policy == policy
    with pytest.raises(ConfigError, match="agent_call_policy must be same-group, any or none, got 'all'"):
        EndpointConfig(tmp_path, agent_call_policy="all")


def test_parse_discover() -> None:
    assert parse_discover({"capability": " Web "}) == ("Web", 1, False)
    assert parse_discover({"capability": "web", "how_many": 3, "all": True}) == ("web", 3, True)


@pytest.mark.parametrize(("params", "field"), [
    ({}, "capability"), ({"capability": ""}, "capability"), ({"capability": 1}, "capability"),
    ({"capability": "w", "how_many": 0}, "how_many"), ({"capability": "w", "how_many": True}, "how_many"),
    ({"capability": "w", "how_many": 1.5}, "how_many"), ({"capability": "w", "all": 1}, "all"),
    ({"capability": "w", "extra": 1}, "extra"),
])
def test_parse_discover_refuses(params: dict[str, Any], field: str) -> None:
    with pytest.raises(RemoteError) as info:
        parse_discover(params)
    assert info.value.code == INVALID_PARAMS and f"'{field}'" in info.value.message
    assert info.value.data == {"parameter": field}


def test_parse_call() -> None:
    assert parse_call({"target": "web-1", "method": "hello.greet", "params": {"name": "x"}, "timeout": 2}) == (
        "web-1", "hello.greet", {"name": "x"}, 2.0)
    assert parse_call({"target": "group:a", "method": "o.m"}) == ("group:a", "o.m", {}, 30.0)


@pytest.mark.parametrize(("params", "field"), [
    ({"method": "o.m"}, "target"), ({"target": " ", "method": "o.m"}, "target"),
    ({"target": "t", "method": "greet"}, "method"), ({"target": "t", "method": ".m"}, "method"),
    ({"target": "t", "method": "o."}, "method"), ({"target": "t", "method": "o.m", "params": []}, "params"),
    ({"target": "t", "method": "o.m", "timeout": 0}, "timeout"),
    ({"target": "t", "method": "o.m", "timeout": 1e9}, "timeout"),
    ({"target": "t", "method": "o.m", "timeout": False}, "timeout"),
    ({"target": "t", "method": "o.m", "agent": "x"}, "agent"),
])
def test_parse_call_refuses(params: dict[str, Any], field: str) -> None:
    with pytest.raises(RemoteError) as info:
        parse_call(params)
    assert info.value.code == INVALID_PARAMS and f"'{field}'" in info.value.message
