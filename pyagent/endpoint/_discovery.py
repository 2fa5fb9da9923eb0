"""Requests agents make of the endpoint about other agents: `registry.discover` and `agent.call` (docs/protocol.md,
"Discovery and agent-to-agent calls").

`agent.call` is routed like an operator's call (`_targets.py`: id, name, group, labels, capability, fan-out) but only
to the agents the **agent-call policy** lets the caller reach:

| policy | an agent may call |
|---|---|
| `same-group` (default) | itself, and the agents whose `group` label equals its own (an agent without a `group` label: only itself) |
| `any` | every agent |
| `none` | no agent, not even itself |

A refusal is error -32007 not_allowed, logged on the endpoint as `agent_call.denied`. The callee's own allow-list
(kind `call`) still applies: the endpoint sends it an ordinary `bundle.call`. Control actions (`agent.status`,
`agent.stop`, ...) are for operators only and are always refused here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyagent.endpoint._log import log_event
from pyagent.endpoint._targets import DEFAULT_CONCURRENCY, AgentView, Selector, TargetError, fan_out, views_from_db
from pyagent.protocol import AGENT_UNAVAILABLE, INVALID_PARAMS, NOT_ALLOWED, TIMEOUT, RemoteError

if TYPE_CHECKING:
    from pyagent.endpoint._endpoint import Endpoint
    from pyagent.endpoint._session import AgentSession

_log = logging.getLogger("pyagent.endpoint.discovery")

POLICIES = ("same-group", "any", "none")
DEFAULT_POLICY = "same-group"
DEFAULT_CALL_TIMEOUT = 30.0
MAX_CALL_TIMEOUT = 3600.0
MAX_HOW_MANY = 10_000
# Methods an agent may not call on another agent: the control actions (operators only).
_CONTROL_PREFIX = "agent."


def call_denied(policy: str, caller: AgentView, callee: AgentView) -> str | None:
    """Why `caller` may not call `callee` under `policy`, or None when it may."""
    if policy == "any":
        return None
    if policy == "none":
        return "the endpoint's agent-call policy is 'none': agents may not call agents"
    if policy != "same-group":
        raise ValueError(f"unknown agent-call policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if caller.agent_id == callee.agent_id:
        return None
    mine, theirs = caller.labels.get("group"), callee.labels.get("group")
    if mine is None:
        return (f"agent {caller.agent_id} ({caller.name}) has no 'group' label; under the agent-call policy "
                "'same-group' it may only call itself")
    if theirs != mine:
        where = f"group {theirs!r}" if theirs is not None else "no group"
        return (f"agent {callee.agent_id} ({callee.name}) is in {where}, not in the caller's group {mine!r} "
                "(agent-call policy 'same-group')")
    return None


@dataclass(frozen=True)
class Found:
    """One agent `registry.discover` returns."""

    view: AgentView
    objects: tuple[str, ...]  # its agent objects that declare the capability

    def to_json(self) -> dict[str, Any]:
        return {"agent_id": self.view.agent_id, "name": self.view.name, "hostname": self.view.hostname,
                "labels": dict(self.view.labels), "objects": list(self.objects), "connected": self.view.connected}


def find_capability(db: sqlite3.Connection, capability: str) -> list[Found]:
    """Every connected, active agent with an object declaring `capability` (exact, case-insensitive), by name."""
    wanted = capability.casefold()
    interfaces: dict[str, Any] = {}
    for agent_id, text in db.execute("SELECT agent_id, interface FROM agents WHERE connected = 1 "
                                     "AND status = 'active'"):
        try:
            interfaces[agent_id] = json.loads(text) if isinstance(text, str) else {}
        except ValueError:
            interfaces[agent_id] = {}
    found = []
    for view in views_from_db(db):
        if view.agent_id not in interfaces or not view.connected or view.status != "active":
            continue
        interface = interfaces[view.agent_id]
        objects = tuple(sorted(
            name for name, spec in (interface.items() if isinstance(interface, dict) else ())
            if isinstance(spec, dict) and any(str(c).casefold() == wanted for c in spec.get("capabilities") or ())))
        if objects:
            found.append(Found(view, objects))
    return sorted(found, key=lambda f: (f.view.name, f.view.agent_id))


def parse_discover(params: dict[str, Any]) -> tuple[str, int, bool]:
    """(capability, how_many, all) from `registry.discover` params; RemoteError -32602 naming the field."""
    unknown = sorted(set(params) - {"capability", "how_many", "all"})
    if unknown:
        raise RemoteError(INVALID_PARAMS, f"registry.discover: unknown parameter {unknown[0]!r}",
                          {"parameter": unknown[0]})
    capability = params.get("capability")
    if not isinstance(capability, str) or not capability.strip():
        raise RemoteError(INVALID_PARAMS, "registry.discover: 'capability' must be a non-empty string",
                          {"parameter": "capability"})
    how_many = params.get("how_many", 1)
    if isinstance(how_many, bool) or not isinstance(how_many, int) or not 1 <= how_many <= MAX_HOW_MANY:
        raise RemoteError(INVALID_PARAMS, f"registry.discover: 'how_many' must be an integer from 1 to "
                          f"{MAX_HOW_MANY}, got {how_many!r}", {"parameter": "how_many"})
    everything = params.get("all", False)
    if not isinstance(everything, bool):
        raise RemoteError(INVALID_PARAMS, f"registry.discover: 'all' must be true or false, got {everything!r}",
                          {"parameter": "all"})
    return capability.strip(), how_many, everything


def parse_call(params: dict[str, Any]) -> tuple[str, str, dict[str, Any], float]:
    """(target, method, params, timeout) from `agent.call` params; RemoteError -32602 naming the field."""
    unknown = sorted(set(params) - {"target", "method", "params", "timeout"})
    if unknown:
        raise RemoteError(INVALID_PARAMS, f"agent.call: unknown parameter {unknown[0]!r}", {"parameter": unknown[0]})
    target, method = params.get("target"), params.get("method")
    if not isinstance(target, str) or not target.strip():
        raise RemoteError(INVALID_PARAMS, "agent.call: 'target' must be a non-empty string", {"parameter": "target"})
    if not isinstance(method, str) or not method.partition(".")[2] or method.startswith("."):
        raise RemoteError(INVALID_PARAMS, f"agent.call: 'method' must be 'object.method', got {method!r}",
                          {"parameter": "method"})
    call_params = params.get("params", {})
    if not isinstance(call_params, dict):
        raise RemoteError(INVALID_PARAMS, "agent.call: 'params' must be an object", {"parameter": "params"})
    timeout = params.get("timeout", DEFAULT_CALL_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_CALL_TIMEOUT:
        raise RemoteError(INVALID_PARAMS, f"agent.call: 'timeout' must be seconds in (0, {MAX_CALL_TIMEOUT:g}], "
                          f"got {timeout!r}", {"parameter": "timeout"})
    return target.strip(), method, call_params, float(timeout)


class AgentRequests:
    """Serves `registry.discover` and `agent.call` for the agent server (set as `AgentServer.agent_requests`)."""

    METHODS = ("registry.discover", "agent.call")

    def __init__(self, endpoint: Endpoint, policy: str = DEFAULT_POLICY, rng: random.Random | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown agent-call policy {policy!r}; expected one of {', '.join(POLICIES)}")
        self._endpoint = endpoint
        self.policy = policy
        self._rng = rng or random.Random()
        self._tasks: set[asyncio.Task[None]] = set()

    def handle(self, session: AgentSession, msg_id: int, method: str, params: dict[str, Any]) -> None:
        """Answer one request of `session`'s agent (an `agent.call` is answered when its calls are done)."""
        if method == "registry.discover":
            try:
                session.send_response(msg_id, self.discover(params))
            except RemoteError as exc:
                session.send_error(msg_id, exc.code, exc.message, exc.data)
            return
        task = asyncio.get_running_loop().create_task(self._answer_call(session, msg_id, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def discover(self, params: dict[str, Any]) -> dict[str, Any]:
        capability, how_many, everything = parse_discover(params)
        found = find_capability(self._endpoint.registry_db, capability)
        if not everything and len(found) > how_many:
            # Agent99: a random `how_many` of the matches spreads the load; the list is then sorted for display.
            found = sorted(self._rng.sample(found, how_many), key=lambda f: (f.view.name, f.view.agent_id))
        return {"agents": [f.to_json() for f in found]}

    async def _answer_call(self, session: AgentSession, msg_id: int, params: dict[str, Any]) -> None:
        try:
            result = await self.call(session.agent_id or "", params)
        except RemoteError as exc:
            session.send_error(msg_id, exc.code, exc.message, exc.data)
        except Exception as exc:  # a bug: answer the agent, keep serving
            log_event(_log, logging.ERROR, "agent_call.failed", agent=session.agent_id, error=repr(exc))
            session.send_error(msg_id, -32603, f"internal error: {type(exc).__name__}")
        else:
            session.send_response(msg_id, result)

    def _deny(self, caller: AgentView, target: str, method: str, reason: str) -> RemoteError:
        log_event(_log, logging.WARNING, "agent_call.denied", caller=caller.agent_id, caller_name=caller.name,
                  target=target, method=method, policy=self.policy, reason=reason)
        return RemoteError(NOT_ALLOWED, f"not allowed: {reason}", {"policy": self.policy, "target": target})

    async def call(self, caller_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """`{"result": ...}` for a single target (errors raised), `{"results": {agent_id: {"result"}|{"error"}}}`
        for a selector; agents the policy refuses get not_allowed (raised, or as their per-target result)."""
        target, method, call_params, timeout = parse_call(params)
        views = views_from_db(self._endpoint.registry_db)
        caller = next((v for v in views if v.agent_id == caller_id), AgentView(caller_id, caller_id))
        if method.startswith(_CONTROL_PREFIX):
            raise self._deny(caller, target, method, f"control actions ({method}) are for operators, not agents")
        try:
            selector = Selector.parse(target)
        except TargetError as exc:
            raise RemoteError(INVALID_PARAMS, f"agent.call: bad target {target!r}: {exc}",
                              {"parameter": "target"}) from None
        matches = selector.select(views)
        if not selector.fanout and len(matches) <= 1:
            if not matches:
                raise RemoteError(AGENT_UNAVAILABLE, f"no agent with id or name {target!r}")
            reason = call_denied(self.policy, caller, matches[0])
            if reason is not None:
                raise self._deny(caller, target, method, reason)
            return {"result": await self._endpoint.call(matches[0].agent_id, method, call_params, timeout)}

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        async def one(view: AgentView) -> Any:
            reason = call_denied(self.policy, caller, view)
            if reason is not None:
                raise self._deny(caller, view.agent_id, method, reason)
            if not self._endpoint.is_connected(view.agent_id):
                raise RemoteError(AGENT_UNAVAILABLE, f"agent {view.agent_id} ({view.name}) is not connected",
                                  {"agent_id": view.agent_id, "connected": False})
            left = deadline - loop.time()
            if left <= 0:
                raise RemoteError(TIMEOUT, f"not called: the fan-out's {timeout:g} s passed first")
            return await self._endpoint.call(view.agent_id, method, call_params, left)

        return {"results": await fan_out(matches, one, DEFAULT_CONCURRENCY)}
