"""What an exposed method accepts, read once from its signature and type hints, and the binding of `params` to it.

Parameters are validated with msgspec (`_schema`) against their type hints: builtins and their generic forms
(`list[int]`, `dict[str, float]`), unions, `X | None`, `Literal[...]`, `Annotated[int, Meta(ge=0)]`, dataclasses,
TypedDicts, enums, datetimes. `int` refuses booleans and floats, `float` accepts integers. A hint msgspec cannot
check (an arbitrary class) is accepted as is and published as `{}`. The same hints give the JSON Schema of the
parameters and of the return value (`agent.describe`).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyagent.runtime import _schema
from pyagent.runtime._agent import Agent, exposed_methods, is_exclusive

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
    hint: Any = Any  # what msgspec checks (Any when it cannot)


@dataclass(frozen=True)
class MethodSpec:
    name: str  # exposed name
    attr: str  # attribute on the class
    is_async: bool
    params: tuple[ParamSpec, ...]
    var_keyword: bool
    doc: str
    exclusive: bool = False
    returns: Any = Any
    struct: Any = None  # the msgspec Struct type of the checked parameters, None when nothing is checked

    def by_name(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params}

    def params_schema(self) -> dict[str, Any]:
        """JSON Schema of `params` (an object)."""
        props: dict[str, Any] = {}
        defs: dict[str, Any] = {}
        for p in self.params:
            schema = _schema.json_schema(p.hint)
            defs.update(schema.pop("$defs", {}))
            props[p.name] = schema
        out: dict[str, Any] = {"type": "object", "properties": props,
                               "required": [p.name for p in self.params if p.required],
                               "additionalProperties": self.var_keyword}
        if defs:
            out["$defs"] = defs
        return out

    def returns_schema(self) -> dict[str, Any]:
        return _schema.json_schema(self.returns)


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


def _strip_annotated(hint: Any) -> Any:
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint


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
        hints = typing.get_type_hints(func, include_extras=True)
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
        raw = hints.get(pname, inspect.Parameter.empty)
        checked, type_name, nullable = _hint_types(_strip_annotated(raw))
        hint: Any = Any if raw is inspect.Parameter.empty or not _schema.supported(raw) else raw
        if param.default is None and hint is not Any:
            nullable = True
            hint = typing.Optional[hint]
        params.append(ParamSpec(
            name=pname,
            positional_only=param.kind is inspect.Parameter.POSITIONAL_ONLY,
            required=param.default is inspect.Parameter.empty,
            types=checked,
            type_name=type_name,
            nullable=nullable,
            hint=hint,
        ))
    checked_params = [p for p in params if p.hint is not Any]
    struct = _schema.make_struct(f"{cls.__name__}_{exposed}_params",
                                 [(p.name, p.hint, _schema.NODEFAULT if p.required else None)
                                  for p in checked_params]) if checked_params else None
    returns = hints.get("return", Any)
    return MethodSpec(
        name=exposed, attr=attr, is_async=inspect.iscoroutinefunction(func), params=tuple(params),
        var_keyword=var_keyword, doc=inspect.cleandoc(func.__doc__ or ""), exclusive=is_exclusive(func),
        returns=returns if returns is not None and _schema.supported(returns) else (None if returns is None else Any),
        struct=struct,
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
    converted = _validate(spec, where, params) if spec.struct is not None else None
    for p in spec.params:
        if p.name not in params:
            continue
        value = getattr(converted, p.name) if converted is not None and p.hint is not Any else params[p.name]
        if p.positional_only:
            args.append(value)
        else:
            kwargs[p.name] = value
    for key, value in params.items():
        if key not in known:
            kwargs[key] = value
    return args, kwargs


def _validate(spec: MethodSpec, where: str, params: Mapping[str, Any]) -> Any:
    """Convert the checked parameters with msgspec; raise InvalidParamsError naming the parameter."""
    checked = {p.name: params[p.name] for p in spec.params if p.hint is not Any and p.name in params}
    try:
        return _schema.convert(spec.struct, checked)
    except _schema.SchemaError as exc:
        p = spec.by_name().get(exc.field)
        if p is None:  # not expected: bind() checked names first
            raise InvalidParamsError(f"{where}: invalid parameters: {exc}", exc.field) from None
        value = params[p.name]
        if not _matches(value, p):
            raise InvalidParamsError(f"{where}: parameter '{p.name}' must be {p.type_name}, got {_json_name(value)}",
                                     p.name, p.type_name) from None
        raise InvalidParamsError(f"{where}: parameter '{p.name}' is invalid: {exc.detail}", p.name,
                                 p.type_name) from None
