"""What an exposed method accepts, read once from its signature and type hints, and the binding of `params` to it.

Only simple hints are checked (str, int, float, bool, list, dict, their generic forms such as `list[int]` — checked
as `list` — unions of those, and `X | None`); anything else is accepted as is. `int` refuses booleans, `float`
accepts integers.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyagent.runtime._agent import Agent, exposed_methods

_SIMPLE: dict[type, str] = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict"}
_JSON_NAMES: dict[type, str] = {str: "str", int: "int", float: "float", bool: "bool", list: "list", dict: "dict",
                                type(None): "null"}


@dataclass(frozen=True)
class ParamSpec:
    name: str
    positional_only: bool
    required: bool
    types: tuple[type, ...] | None  # None: not checked
    type_name: str
    nullable: bool


@dataclass(frozen=True)
class MethodSpec:
    name: str  # exposed name
    attr: str  # attribute on the class
    is_async: bool
    params: tuple[ParamSpec, ...]
    var_keyword: bool
    doc: str

    def by_name(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params}


class InvalidParamsError(Exception):
    """Raised by `bind`; `parameter` names the offending parameter."""

    def __init__(self, message: str, parameter: str, expected: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.expected = expected

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"parameter": self.parameter}
        if self.expected is not None:
            data["expected"] = self.expected
        return data


def _hint_types(hint: Any) -> tuple[tuple[type, ...] | None, str, bool]:
    """(types to check or None, printable name, None allowed)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None, "any", True
    if hint is None or hint is type(None):
        return (type(None),), "null", True
    if isinstance(hint, type) and hint in _SIMPLE:
        return (hint,), _SIMPLE[hint], False
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return (origin,), _type_repr(hint), False
    if origin is typing.Union or origin is types.UnionType:
        checked: list[type] = []
        names: list[str] = []
        nullable = False
        for arg in typing.get_args(hint):
            if arg is type(None):
                nullable = True
                continue
            sub, sub_name, _ = _hint_types(arg)
            if sub is None:
                return None, _type_repr(hint), True
            checked.extend(sub)
            names.append(sub_name)
        if nullable:
            names.append("null")
        return tuple(checked), " | ".join(names), nullable
    return None, _type_repr(hint), True


def _type_repr(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return repr(hint).replace("typing.", "")


def describe(cls: type[Agent]) -> dict[str, MethodSpec]:
    """The specs of every exposed method of `cls`; raises TypeError naming the method when one cannot be read."""
    specs: dict[str, MethodSpec] = {}
    for exposed, attr in exposed_methods(cls).items():
        func = inspect.getattr_static(cls, attr)
        specs[exposed] = _describe_function(exposed, attr, func, cls)
    return specs


def _describe_function(exposed: str, attr: str, func: Callable[..., Any], cls: type[Agent]) -> MethodSpec:
    where = f"{cls.__qualname__}.{attr}"
    try:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func)
    except Exception as exc:  # NameError for unresolvable annotations, ValueError for odd callables
        raise TypeError(f"{where}: cannot read its signature: {type(exc).__name__}: {exc}") from exc
    params: list[ParamSpec] = []
    var_keyword = False
    for i, (pname, param) in enumerate(signature.parameters.items()):
        if i == 0:
            continue  # self
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            continue  # cannot be given by name: always empty
        checked, type_name, nullable = _hint_types(hints.get(pname, inspect.Parameter.empty))
        if param.default is None:
            nullable = True
        params.append(ParamSpec(
            name=pname,
            positional_only=param.kind is inspect.Parameter.POSITIONAL_ONLY,
            required=param.default is inspect.Parameter.empty,
            types=checked,
            type_name=type_name,
            nullable=nullable,
        ))
    return MethodSpec(
        name=exposed, attr=attr, is_async=inspect.iscoroutinefunction(func), params=tuple(params),
        var_keyword=var_keyword, doc=inspect.cleandoc(func.__doc__ or ""),
    )


def _json_name(value: object) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _matches(value: object, spec: ParamSpec) -> bool:
    if value is None:
        return spec.nullable
    if spec.types is None:
        return True
    if isinstance(value, bool):
        return bool in spec.types
    if isinstance(value, int) and float in spec.types:
        return True
    return isinstance(value, spec.types)


def bind(spec: MethodSpec, where: str, params: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Turn `params` into (args, kwargs) for the method; raise InvalidParamsError naming the first bad parameter."""
    known = spec.by_name()
    for key in params:
        if key not in known and not spec.var_keyword:
            import difflib  # only on the error path

            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InvalidParamsError(f"{where}: unknown parameter '{key}'{hint}", key)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    skipped: str | None = None  # an omitted optional positional-only parameter
    for p in spec.params:
        if p.name not in params:
            if p.required:
                raise InvalidParamsError(f"{where}: missing parameter '{p.name}'", p.name, p.type_name)
            if p.positional_only:
                skipped = p.name
            continue
        if p.positional_only and skipped is not None:
            raise InvalidParamsError(f"{where}: parameter '{p.name}' needs '{skipped}' too", skipped)
        value = params[p.name]
        if not _matches(value, p):
            raise InvalidParamsError(f"{where}: parameter '{p.name}' must be {p.type_name}, got {_json_name(value)}",
                                     p.name, p.type_name)
        if p.positional_only:
            args.append(value)
        else:
            kwargs[p.name] = value
    for key, value in params.items():
        if key not in known:
            kwargs[key] = value
    return args, kwargs
