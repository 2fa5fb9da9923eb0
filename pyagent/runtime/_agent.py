"""The bundle author's API: the `Agent` base class and the `@method` decorator.

    from pyagent.runtime import Agent, method

    class Hello(Agent):
        @method
        async def greet(self, name: str) -> str:
            return f"Hello, {name}!"

Exposed methods are called by keyword with the `params` of a `bundle.call`, validated against their type hints first.
Async methods run concurrently, each in its own task, at most `max_concurrent_calls` per agent object at a time;
`@method(exclusive=True)` methods run one at a time. Sync methods run inline on the event loop and must therefore be
quick (no blocking I/O, no sleeping). See docs/bundles.md for the whole API.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, overload

from pyagent.runtime._errors import RuntimeStoppedError
from pyagent.runtime._periodic import Schedule, schedule_of

F = TypeVar("F", bound=Callable[..., Any])

# The attributes @method sets on a function: the name it is exposed under, and whether it runs one at a time.
_MARK = "__pyagent_method__"
_EXCLUSIVE = "__pyagent_exclusive__"

# emit(agent object name, event name, data); set by the runtime.
EmitSink = Callable[[str, str, Any], None]
# Runtime.request(method, params, timeout): a request to the endpoint on session 0; set by the runtime.
RequestSink = Callable[[str, Mapping[str, Any], float], Awaitable[Any]]

# The endpoint answers an agent.call within its `timeout`; the request itself waits this much longer.
_CALL_MARGIN = 5.0


class Agent:
    """Base class of every agent object a bundle exposes.

    The runtime creates one instance per object named in `bundle.toml`, sets `name` (the object name used by
    `bundle.call`) and `log` (a logger named `pyagent.agent.<name>`), then awaits `init()` before the first call and
    `fini()` on shutdown. `fini()` is called even when `init()` failed part-way, so write it defensively.
    """

    # Exposed name -> attribute name, collected per class by __init_subclass__.
    __pyagent_methods__: ClassVar[Mapping[str, str]] = MappingProxyType({})
    # Attribute name -> Schedule of its @periodic methods.
    __pyagent_periodic__: ClassVar[Mapping[str, Schedule]] = MappingProxyType({})

    #: What this agent offers, for discovery (e.g. `("web", "metrics")`); published by `agent.describe`.
    capabilities: ClassVar[tuple[str, ...]] = ()
    #: How many calls of this agent object may run at once (async methods; sync ones run inline).
    max_concurrent_calls: ClassVar[int] = 16

    name: str
    log: logging.Logger

    def __init__(self) -> None:
        self._pyagent_bind(type(self).__name__.lower())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Walk the MRO from the base down so that a subclass's definition wins; an attribute redefined without
        # @method is no longer exposed.
        by_attr: dict[str, str] = {}
        periodic: dict[str, Schedule] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                by_attr.pop(attr, None)
                periodic.pop(attr, None)
                exposed = getattr(value, _MARK, None) if inspect.isfunction(value) else None
                if isinstance(exposed, str):
                    by_attr[attr] = exposed
                schedule = schedule_of(value)
                if schedule is not None:
                    periodic[attr] = schedule
        cls.__pyagent_periodic__ = MappingProxyType(periodic)
        if not isinstance(cls.capabilities, tuple) or not all(isinstance(c, str) and c for c in cls.capabilities):
            raise TypeError(f"{cls.__qualname__}.capabilities must be a tuple of non-empty strings")
        limit = cls.max_concurrent_calls
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise TypeError(f"{cls.__qualname__}.max_concurrent_calls must be a positive integer")
        methods: dict[str, str] = {}
        for attr, exposed in by_attr.items():
            if exposed in methods:
                raise TypeError(f"{cls.__qualname__}: methods '{methods[exposed]}' and '{attr}' are both exposed "
                                f"as '{exposed}'")
            methods[exposed] = attr
        cls.__pyagent_methods__ = MappingProxyType(methods)

    def _pyagent_bind(self, name: str) -> None:
        """Called by the runtime with the object name from `bundle.toml`."""
        self.name = name
        self.log = logging.getLogger(f"pyagent.agent.{name}")

    async def init(self) -> None:
        """Called once before the first call is dispatched; override to set things up."""

    async def fini(self) -> None:
        """Called once on shutdown, stop and restart (also after a failed `init`); release what `init` acquired."""

    def confirm_config(self, values: Mapping[str, Any]) -> None:
        """Called with a complete, type-checked config before it is applied (at start and on `agent.config.set`);
        raise ValueError to refuse it (the message is sent back, the old config stays). Override for rules that
        involve several fields."""

    @property
    def config(self) -> Mapping[str, Any]:
        """The current config values (read-only); each field is also an attribute (`self.interval`)."""
        values = self.__dict__.get("_pyagent_config")
        if values is None:
            from pyagent.runtime._agentconfig import config_spec

            values = config_spec(type(self)).defaults()
        return MappingProxyType(values)

    def emit(self, event: str, data: Any = None) -> None:
        """Send an event to the endpoint through the persistent outbox (delivered at least once, in order)."""
        sink: EmitSink | None = self.__dict__.get("_pyagent_emit")
        if sink is None:
            raise RuntimeStoppedError(f"{getattr(self, 'name', type(self).__name__)}.emit('{event}'): the runtime "
                                      "is not running")
        sink(self.name, event, data)

    def _pyagent_requester(self, what: str) -> RequestSink:
        sink: RequestSink | None = self.__dict__.get("_pyagent_request")
        if sink is None:
            raise RuntimeStoppedError(f"{getattr(self, 'name', type(self).__name__)}.{what}: the runtime is not "
                                      "running")
        return sink

    async def discover(self, capability: str, how_many: int = 1, all: bool = False,
                       timeout: float = 10.0) -> list[dict[str, Any]]:
        """The connected agents with an object declaring `capability` (exact match, case-insensitive), asked of the
        endpoint's registry: a random `how_many` of them, or every one with `all=True` (Agent99's
        `discover_agent`). Each is `{agent_id, name, hostname, labels, objects, connected}`, `objects` being its
        agent objects that declare the capability; an empty list when there is none."""
        request = self._pyagent_requester("discover")
        reply = await request("registry.discover", {"capability": capability, "how_many": how_many, "all": all},
                              timeout)
        agents: list[dict[str, Any]] = reply["agents"]
        return agents

    async def call(self, target: str, method: str, /, *, timeout: float = 30.0, **params: Any) -> Any:
        """Call `object.method` on another agent through the endpoint, under the endpoint's agent-call policy
        (default: agents of the same `group` label only).

        `target` is an agent id or name (returns the result; the callee's error, or -32007 not_allowed when the
        policy refuses, is raised as `pyagent.protocol.RemoteError`), or a selector — `group:NAME`, `env=prod,...`,
        `capability:NAME`, `*` — which returns `{agent_id: {"result": ...} | {"error": {code, message}}}`."""
        request = self._pyagent_requester("call")
        reply = await request("agent.call", {"target": target, "method": method, "params": params,
                                             "timeout": timeout}, timeout + _CALL_MARGIN)
        if "results" in reply:
            return reply["results"]
        return reply["result"]


@overload
def method(func: F, /) -> F: ...


@overload
def method(*, name: str | None = None, exclusive: bool = False) -> Callable[[F], F]: ...


def method(func: F | None = None, /, *, name: str | None = None, exclusive: bool = False) -> F | Callable[[F], F]:
    """Expose a method of an `Agent` subclass to `bundle.call`; usable as `@method`, `@method()` or
    `@method(name="other")`. Works on `async def` and plain `def` methods. `exclusive=True`: calls of the exclusive
    methods of one agent object run one at a time, in arrival order (MAGI's one-at-a-time dispatch)."""

    def mark(f: F) -> F:
        if not inspect.isfunction(f):
            raise TypeError(f"@method must decorate a function defined in an Agent class, got {f!r}")
        if inspect.isasyncgenfunction(f) or inspect.isgeneratorfunction(f):
            raise TypeError(f"@method cannot expose the generator {f.__qualname__}")
        exposed = f.__name__ if name is None else name
        if not exposed.isidentifier():
            raise TypeError(f"@method: exposed name {exposed!r} of {f.__qualname__} is not an identifier")
        setattr(f, _MARK, exposed)
        setattr(f, _EXCLUSIVE, bool(exclusive))
        return f

    if func is not None:
        return mark(func)
    return mark


def exposed_methods(cls: type[Agent]) -> Mapping[str, str]:
    """Exposed name -> attribute name for an Agent subclass."""
    return cls.__pyagent_methods__


def is_exclusive(func: Any) -> bool:
    return getattr(func, _EXCLUSIVE, False) is True
