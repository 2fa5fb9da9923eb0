"""Typed agent config: `setting()` fields declared on an `Agent` class, validated with msgspec.

    class Traffic(Agent):
        interval: float = setting(10.0, ge=0.1, help="seconds between rounds")
        mode: Literal["ping", "http"] = setting("ping")
        targets: list[str] = setting([], help="host names")

Reading `self.interval` returns the current value. Values come from the agent's `[agents.<object>]` table in the
agent TOML at start, and live from `agent.config.set`; a bad value is refused with the field named and the old
config kept. `Agent.confirm_config(values)` may refuse a combination by raising ValueError.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any, Literal

import msgspec

from pyagent.runtime import _schema


class Setting:
    """One config field (made by `setting()`); a read-only descriptor returning the agent's current value."""

    def __init__(self, default: Any, *, help: str = "", choices: tuple[Any, ...] | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        self.default = default
        self.help = help
        self.choices = choices
        self.meta = meta or {}
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        values = obj.__dict__.get("_pyagent_config")
        if values is None or self.name not in values:
            return self.default
        return values[self.name]

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError(f"config field '{self.name}' is read-only; change it with agent.config.set")


def setting(default: Any, *, help: str = "", ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, choices: tuple[Any, ...] | list[Any] | None = None,
            min_length: int | None = None, max_length: int | None = None, pattern: str | None = None) -> Any:
    """Declare a config field of an Agent class: its default, constraints and help text.

    The field's type is its annotation. `ge`/`gt`/`le`/`lt` bound numbers, `min_length`/`max_length` bound strings
    and arrays, `pattern` is a regular expression a string must match (search), `choices` lists the allowed values
    (an enum; `Literal[...]` in the annotation does the same).
    """
    meta = {key: value for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt),
                                          ("min_length", min_length), ("max_length", max_length),
                                          ("pattern", pattern)) if value is not None}
    return Setting(default, help=help, choices=tuple(choices) if choices is not None else None, meta=meta)


@dataclass(frozen=True)
class Field:
    name: str
    hint: Any  # the annotation with its constraints (Annotated[...])
    default: Any
    help: str


@dataclass(frozen=True)
class ConfigSpec:
    fields: dict[str, Field]
    struct: type[msgspec.Struct] | None

    def defaults(self) -> dict[str, Any]:
        return {name: _copy(f.default) for name, f in self.fields.items()}

    def schema(self, title: str) -> dict[str, Any]:
        if self.struct is None:
            return {"title": title, "type": "object", "properties": {}, "additionalProperties": False}
        return _schema.struct_schema(self.struct, title)

    def validate(self, values: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Check a complete set of values; return them normalised (ints given for floats become floats)."""
        if self.struct is None:
            if values:
                key = next(iter(values))
                raise ConfigValueError(f"{where}: unknown config field '{key}' (this agent has no config fields)",
                                       key)
            return {}
        try:
            obj = _schema.convert(self.struct, dict(values))
        except _schema.SchemaError as exc:
            raise ConfigValueError(_message(where, exc, self.fields), exc.field) from None
        return {name: getattr(obj, name) for name in self.fields}


class ConfigValueError(ValueError):
    """A config value (or combination) was refused; `field` names it ("" when it is about several)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _message(where: str, exc: _schema.SchemaError, fields: Mapping[str, Field]) -> str:
    text = str(exc)
    if text.startswith("Object contains unknown field"):
        import difflib  # only on the error path

        close = difflib.get_close_matches(exc.field, list(fields), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{where}: unknown config field '{exc.field}'{hint}"
    if exc.field:
        return f"{where}: config field '{exc.field}': {exc.detail}"
    return f"{where}: {text}"


def _copy(value: Any) -> Any:
    return type(value)(value) if isinstance(value, (list, dict, set)) else value


def build_spec(cls: type) -> ConfigSpec:
    """Read the Setting fields of `cls` (and its bases); raise TypeError naming a bad field."""
    settings: dict[str, Setting] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            settings.pop(attr, None)
            if isinstance(value, Setting):
                settings[attr] = value
    if not settings:
        return ConfigSpec({}, None)
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception as exc:
        raise TypeError(f"{cls.__qualname__}: cannot read its config annotations: {type(exc).__name__}: {exc}") \
            from exc
    fields: dict[str, Field] = {}
    for name, s in settings.items():
        if name.startswith("_"):
            raise TypeError(f"{cls.__qualname__}.{name}: config field names must not start with '_'")
        hint = hints.get(name)
        if hint is None:
            raise TypeError(f"{cls.__qualname__}.{name}: a config field needs a type annotation")
        if s.choices is not None:
            hint = Literal[s.choices]
        meta: dict[str, Any] = dict(s.meta)
        if s.help:
            meta["description"] = s.help
        if meta:
            try:
                hint = Annotated[hint, msgspec.Meta(**meta)]
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{cls.__qualname__}.{name}: bad constraint: {exc}") from None
        if not _schema.supported(hint):
            raise TypeError(f"{cls.__qualname__}.{name}: type {hint!r} is not supported for config fields")
        problem = _schema.check_value(hint, s.default)
        if problem is not None:
            raise TypeError(f"{cls.__qualname__}.{name}: the default {s.default!r} is invalid: {problem}")
        fields[name] = Field(name, hint, s.default, s.help)
    struct = _schema.make_struct(f"{cls.__name__}Config", [(f.name, f.hint, f.default) for f in fields.values()])
    return ConfigSpec(fields, struct)


_RESERVED = frozenset({"name", "log", "config", "emit", "init", "fini", "confirm_config", "capabilities",
                       "max_concurrent_calls", "discover", "call"})


def config_spec(cls: type) -> ConfigSpec:
    """The (cached) ConfigSpec of an Agent class; raises TypeError naming a bad field."""
    spec = cls.__dict__.get("__pyagent_config_spec__")
    if not isinstance(spec, ConfigSpec):
        spec = build_spec(cls)
        for name in spec.fields:
            if name in _RESERVED:
                raise TypeError(f"{cls.__qualname__}.{name}: '{name}' is reserved by Agent and cannot be a config "
                                "field")
        type.__setattr__(cls, "__pyagent_config_spec__", spec)
    return spec


def apply_config(agent: Any, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate `values` over the agent's current config, run `confirm_config`, then apply; on any failure raise
    ConfigValueError and keep the old config. Returns the new complete config."""
    spec = config_spec(type(agent))
    current = agent.__dict__.get("_pyagent_config")
    merged = {**(current if current is not None else spec.defaults()), **values}
    validated = spec.validate(merged, where)
    try:
        agent.confirm_config(MappingProxyType(validated))
    except ValueError as exc:
        raise ConfigValueError(f"{where}: refused by {type(agent).__qualname__}.confirm_config: {exc}",
                               getattr(exc, "field", "")) from None
    agent.__dict__["_pyagent_config"] = validated
    return dict(validated)


def current_config(agent: Any) -> dict[str, Any]:
    values = agent.__dict__.get("_pyagent_config")
    return dict(values) if values is not None else config_spec(type(agent)).defaults()
