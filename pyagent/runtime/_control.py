"""Control actions answered by the runtime for every agent object, periodic tasks, and the interface description.

Methods (endpoint -> agent requests, also reachable as `bundle.call {agent, method: "agent.status"}`):

| method | params | result |
|---|---|---|
| `agent.status` | `{agent}` | `{agent, state, calls_running, periodic: [...], config, capabilities}` |
| `agent.pause` / `agent.resume` | `{agent}` | `{agent, state}` |
| `agent.config.get` | `{agent}` | `{agent, values}` |
| `agent.config.set` | `{agent, values}` | `{agent, values}` (the complete new config) |
| `agent.describe` | `{agent?}` | `describe()` of one or every agent object |
| `agent.stop` | `{}` | `{state: "stopping"}`, then the worker exits 0 |
| `agent.restart` | `{}` | `{state: "restarting"}`, then the worker exits EXIT_RESTART |
| `agent.update` | `{kind, name, version, target, rollout}` | `{state: "offered"}` (`_update.py`; -32601 without it) |
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pyagent.protocol import AGENT_PAUSED, INVALID_PARAMS, INVALID_REQUEST, METHOD_NOT_FOUND, ProtocolError
from pyagent.runtime._agent import Agent
from pyagent.runtime._agentconfig import ConfigValueError, apply_config, config_spec, current_config
from pyagent.runtime._log import log_event
from pyagent.runtime._periodic import clamp
from pyagent.runtime._signature import describe as describe_methods

EXIT_RESTART = 75  # the worker exits with this code on agent.restart: "restart me" (EX_TEMPFAIL)
EXIT_UPDATE = 76  # the worker exits with this code once an update is staged: "swap, then restart me" (updates.md)

CONTROL_METHODS = ("agent.status", "agent.pause", "agent.resume", "agent.stop", "agent.restart",
                   "agent.config.get", "agent.config.set", "agent.describe", "agent.update")

_log = logging.getLogger("pyagent.runtime")


def describe(agents: Mapping[str, Agent]) -> dict[str, Any]:
    """The interface of every agent object: methods (params/returns JSON Schema, help), config fields (schema,
    defaults, help, current values), periodic tasks and capabilities. Published by `agent.describe`."""
    return {"agents": {name: describe_agent(name, agent) for name, agent in agents.items()}}


def describe_agent(name: str, agent: Agent) -> dict[str, Any]:
    cls = type(agent)
    methods: dict[str, Any] = {}
    for exposed, spec in describe_methods(cls).items():
        methods[exposed] = {"params": spec.params_schema(), "returns": spec.returns_schema(), "help": spec.doc,
                            "async": spec.is_async, "exclusive": spec.exclusive}
    cspec = config_spec(cls)
    config = cspec.schema(f"{name} config")
    for field in cspec.fields.values():
        config["properties"][field.name].setdefault("description", field.help)
    return {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "help": inspect.cleandoc(cls.__doc__ or ""),
        "capabilities": list(cls.capabilities),
        "max_concurrent_calls": cls.max_concurrent_calls,
        "methods": methods,
        "config": {"schema": config, "values": _jsonable(current_config(agent))},
        "periodic": {attr: {"interval": s.describe(), "help": inspect.cleandoc(getattr(cls, attr).__doc__ or "")}
                     for attr, s in cls.__pyagent_periodic__.items()},
    }


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    from pyagent.runtime._schema import to_builtins

    out = to_builtins(dict(values))
    return out if isinstance(out, dict) else {}


class _Periodic:
    """One running @periodic method of one agent object."""

    def __init__(self, agent: Agent, attr: str) -> None:
        self.agent = agent
        self.attr = attr
        self.schedule = type(agent).__pyagent_periodic__[attr]
        self.task: asyncio.Task[None] | None = None
        self.runs = 0
        self.failures = 0
        self.next_at: float | None = None
        self.last_error = ""

    def status(self, now: float) -> dict[str, Any]:
        return {"name": self.attr, "running": self.task is not None and not self.task.done(), "runs": self.runs,
                "failures": self.failures, "last_error": self.last_error,
                "next_in": None if self.next_at is None else round(max(self.next_at - now, 0.0), 3)}


class Controller:
    """Per-agent state the runtime keeps: paused or running, periodic tasks; answers the control actions."""

    def __init__(self, agents: Mapping[str, Agent], *, request_exit: Callable[[int], None],
                 rng: random.Random | None = None) -> None:
        self.agents = dict(agents)
        self.request_exit = request_exit
        self.rng = rng or random.Random()
        self.paused: set[str] = set()
        self.running_calls: dict[str, int] = dict.fromkeys(self.agents, 0)
        self._periodic: dict[str, list[_Periodic]] = {
            name: [_Periodic(agent, attr) for attr in type(agent).__pyagent_periodic__]
            for name, agent in self.agents.items()}
        self.started = False
        # `agent.update` (`_update.py`), set by pyagent-host's worker; None: refused (embedding, tests).
        self.update: Callable[[Mapping[str, Any]], Awaitable[Any]] | None = None

    # --- periodic tasks ---

    def start(self) -> None:
        self.started = True
        for name in self.agents:
            if name not in self.paused:
                self._start_periodic(name)

    def _start_periodic(self, name: str) -> None:
        for p in self._periodic[name]:
            if p.task is None or p.task.done():
                p.task = asyncio.get_running_loop().create_task(self._loop(name, p), name=f"periodic:{name}.{p.attr}")

    async def _stop_periodic(self, name: str) -> None:
        tasks = [p.task for p in self._periodic[name] if p.task is not None and not p.task.done()]
        for p in self._periodic[name]:
            p.next_at = None
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=0.5)

    async def stop(self) -> None:
        """Cancel every periodic task (shutdown); bounded."""
        self.started = False
        for name in self.agents:
            await self._stop_periodic(name)

    async def _loop(self, name: str, p: _Periodic) -> None:
        loop = asyncio.get_running_loop()
        func = getattr(p.agent, p.attr)
        next_interval: float | None = None
        while True:
            try:
                delay = next_interval if next_interval is not None else p.schedule.next_interval(p.agent, self.rng)
            except Exception as exc:
                p.failures += 1
                p.last_error = f"interval: {type(exc).__name__}: {exc}"
                log_event(_log, logging.ERROR, "periodic.interval.failed", f"{name}.{p.attr}: {p.last_error}",
                          agent=name)
                delay = 60.0
            p.next_at = loop.time() + delay
            await asyncio.sleep(delay)
            p.next_at = None
            next_interval = None
            try:
                result = func()
                if inspect.isawaitable(result):
                    result = await result
                p.runs += 1
                if isinstance(result, (int, float)) and not isinstance(result, bool):
                    next_interval = clamp(result)  # a periodic may return its next interval (MAGI)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                p.failures += 1
                p.last_error = f"{type(exc).__name__}: {exc}"
                log_event(_log, logging.ERROR, "periodic.failed", f"{name}.{p.attr} raised {p.last_error}",
                          agent=name, exc_info=True)

    # --- control actions ---

    def check_callable(self, name: str) -> None:
        """Raise ProtocolError(AGENT_PAUSED) when calls to `name` are refused."""
        if name in self.paused:
            raise ProtocolError(AGENT_PAUSED, f"agent object '{name}' is paused (agent.resume to continue)",
                               {"agent": name, "state": "paused"})

    def is_control(self, method: str) -> bool:
        return method in CONTROL_METHODS

    async def handle(self, method: str, params: Mapping[str, Any]) -> Any:
        """Answer one control action; raise ProtocolError."""
        if method == "agent.update":
            if self.update is None:
                raise ProtocolError(INVALID_REQUEST, "agent.update: updates need pyagent-host and its supervisor")
            return await self.update(params)
        if method in ("agent.stop", "agent.restart"):
            _check_keys(method, params, ("agent",))
            code = 0 if method == "agent.stop" else EXIT_RESTART
            log_event(_log, logging.INFO, "control.exit", f"{method}: the worker will exit with code {code}",
                      code=code)
            asyncio.get_running_loop().call_soon(self.request_exit, code)
            return {"state": "stopping" if code == 0 else "restarting", "exit_code": code}
        if method == "agent.describe":
            _check_keys(method, params, ("agent",))
            if "agent" in params:
                name = self._agent_name(method, params)
                return describe({name: self.agents[name]})
            return describe(self.agents)
        allowed = ("agent", "values") if method == "agent.config.set" else ("agent",)
        _check_keys(method, params, allowed)
        name = self._agent_name(method, params)
        agent = self.agents[name]
        if method == "agent.status":
            return self.status(name)
        if method == "agent.pause":
            if name not in self.paused:
                self.paused.add(name)
                await self._stop_periodic(name)
                log_event(_log, logging.INFO, "agent.paused", f"{name} paused", agent=name)
            return {"agent": name, "state": "paused"}
        if method == "agent.resume":
            if name in self.paused:
                self.paused.discard(name)
                if self.started:
                    self._start_periodic(name)
                log_event(_log, logging.INFO, "agent.resumed", f"{name} resumed", agent=name)
            return {"agent": name, "state": "running"}
        if method == "agent.config.get":
            return {"agent": name, "values": _jsonable(current_config(agent))}
        if method == "agent.config.set":
            values = params.get("values")
            if not isinstance(values, dict):
                raise ProtocolError(INVALID_PARAMS, f"{method}: parameter 'values' must be an object",
                                   {"parameter": "values", "expected": "object"})
            try:
                new = apply_config(agent, values, f"{name}")
            except ConfigValueError as exc:
                raise ProtocolError(INVALID_PARAMS, str(exc), {"parameter": f"values.{exc.field}" if exc.field
                                                              else "values", "field": exc.field}) from None
            log_event(_log, logging.INFO, "agent.config.changed", f"{name} config changed", agent=name,
                      fields=",".join(sorted(values)))
            return {"agent": name, "values": _jsonable(new)}
        raise ProtocolError(METHOD_NOT_FOUND, f"method '{method}' not found")

    def status(self, name: str) -> dict[str, Any]:
        agent = self.agents[name]
        now = asyncio.get_running_loop().time()
        return {"agent": name, "state": "paused" if name in self.paused else "running",
                "class": f"{type(agent).__module__}.{type(agent).__qualname__}",
                "capabilities": list(type(agent).capabilities),
                "calls_running": self.running_calls.get(name, 0),
                "periodic": [p.status(now) for p in self._periodic[name]],
                "config": _jsonable(current_config(agent))}

    def _agent_name(self, method: str, params: Mapping[str, Any]) -> str:
        name = params.get("agent")
        if name is None:
            raise ProtocolError(INVALID_PARAMS, f"{method}: missing parameter 'agent'", {"parameter": "agent"})
        if not isinstance(name, str):
            raise ProtocolError(INVALID_PARAMS, f"{method}: parameter 'agent' must be a string",
                               {"parameter": "agent", "expected": "string"})
        if name not in self.agents:
            have = ", ".join(sorted(self.agents)) or "none"
            raise ProtocolError(METHOD_NOT_FOUND, f"no agent object '{name}' (available: {have})")
        return name


def _check_keys(method: str, params: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    for key in params:
        if key not in allowed:
            raise ProtocolError(INVALID_PARAMS, f"{method}: unknown parameter '{key}'", {"parameter": key})
