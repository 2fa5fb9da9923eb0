"""The bundle author's API: the `Agent` base class and the `@method` decorator.

    from pyagent.runtime import Agent, method

    class Hello(Agent):
        @method
        async def greet(self, name: str) -> str:
            return f"Hello, {name}!"

Exposed methods are called by keyword with the `params` of a `bundle.call`. Async methods run concurrently, each in
its own task; sync methods run inline on the event loop and must therefore be quick (no blocking I/O, no sleeping).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])

# The attribute @method sets on a function: the name it is exposed under.
_MARK = "__pyagent_method__"


class Agent:
    """Base class of every agent object a bundle exposes.

    The runtime creates one instance per object named in `bundle.toml`, sets `name` (the object name used by
    `bundle.call`) and `log` (a logger named `pyagent.agent.<name>`), then awaits `init()` before the first call and
    `fini()` on shutdown. `fini()` is called even when `init()` failed part-way, so write it defensively.
    """

    # Exposed name -> attribute name, collected per class by __init_subclass__.
    __pyagent_methods__: ClassVar[Mapping[str, str]] = MappingProxyType({})

    name: str
    log: logging.Logger

    def __init__(self) -> None:
        self._pyagent_bind(type(self).__name__.lower())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Walk the MRO from the base down so that a subclass's definition wins; an attribute redefined without
        # @method is no longer exposed.
        by_attr: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                by_attr.pop(attr, None)
                exposed = getattr(value, _MARK, None) if inspect.isfunction(value) else None
                if isinstance(exposed, str):
                    by_attr[attr] = exposed
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
        """Called once on shutdown (also after a failed `init`); override to release what `init` acquired."""


@overload
def method(func: F, /) -> F: ...


@overload
def method(*, name: str | None = None) -> Callable[[F], F]: ...


def method(func: F | None = None, /, *, name: str | None = None) -> F | Callable[[F], F]:
    """Expose a method of an `Agent` subclass to `bundle.call`; usable as `@method`, `@method()` or
    `@method(name="other")`. Works on `async def` and plain `def` methods."""

    def mark(f: F) -> F:
        if not inspect.isfunction(f):
            raise TypeError(f"@method must decorate a function defined in an Agent class, got {f!r}")
        if inspect.isasyncgenfunction(f) or inspect.isgeneratorfunction(f):
            raise TypeError(f"@method cannot expose the generator {f.__qualname__}")
        exposed = f.__name__ if name is None else name
        if not exposed.isidentifier():
            raise TypeError(f"@method: exposed name {exposed!r} of {f.__qualname__} is not an identifier")
        setattr(f, _MARK, exposed)
        return f

    if func is not None:
        return mark(func)
    return mark


def exposed_methods(cls: type[Agent]) -> Mapping[str, str]:
    """Exposed name -> attribute name for an Agent subclass."""
    return cls.__pyagent_methods__
