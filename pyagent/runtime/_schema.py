"""Type hints -> validators and JSON Schema, with msgspec.

One validator type is built per exposed method (its parameters) and per agent class (its config fields): a
`msgspec.Struct` made with `defstruct`, converted to with `msgspec.convert` (strict: `int` refuses `true` and `1.0`,
`float` accepts integers, unknown fields are refused). The same types give the JSON Schema published by
`agent.describe`, and `encode_result` turns return values (dataclasses, Structs, enums, datetimes, …) into JSON
builtins the same way.

Measured (docs/architecture.md, "Decisions"): `import msgspec` adds 1.9 MB RSS and 7 ms to an isolated interpreter
with asyncio loaded; fastjsonschema adds 1.2 MB and would still need the schema generated from the hints by hand.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import msgspec
import msgspec.json

# A msgspec message ends with " - at `$.name[0]`" when the problem is inside the object.
_AT_RE = re.compile(r" - at `\$\.?([A-Za-z_][A-Za-z0-9_]*)?([^`]*)`$")
_FIELD_RE = re.compile(r"field `([^`]+)`")


class SchemaError(Exception):
    """A value does not match; `field` names the top-level field (or "" for the object itself)."""

    def __init__(self, message: str, field: str, detail: str) -> None:
        super().__init__(message)
        self.field = field
        self.detail = detail


def supported(hint: Any) -> bool:
    """True when msgspec can validate and describe `hint`."""
    try:
        msgspec.json.schema(hint)
    except (TypeError, ValueError):
        return False
    return True


def make_struct(name: str, fields: Sequence[tuple[str, Any, Any]]) -> type[msgspec.Struct]:
    """A Struct type for `fields` = [(name, hint, default or msgspec.NODEFAULT)]; unknown fields are refused."""
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    for fname, hint, default in fields:
        if default is msgspec.NODEFAULT:
            spec.append((fname, hint))
        elif isinstance(default, (list, dict, set)):
            spec.append((fname, hint, msgspec.field(default_factory=_copier(default))))
        else:
            spec.append((fname, hint, default))
    return msgspec.defstruct(name, spec, forbid_unknown_fields=True, kw_only=True)


def _copier(value: Any) -> Any:
    return lambda: type(value)(value)


def convert(struct: type[msgspec.Struct], values: Any) -> msgspec.Struct:
    """Validate `values` (a dict) into `struct`; raise SchemaError naming the field."""
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as exc:
        raise _schema_error(str(exc)) from None


def _schema_error(text: str) -> SchemaError:
    at = _AT_RE.search(text)
    if at is not None:
        detail = text[:at.start()]
        return SchemaError(text, at.group(1) or "", detail + (f" at `{at.group(2)}`" if at.group(2) else ""))
    named = _FIELD_RE.search(text)
    return SchemaError(text, named.group(1) if named else "", text)


def check_value(hint: Any, value: Any) -> str | None:
    """None if `value` matches `hint`, else msgspec's description of the problem (used for error messages)."""
    try:
        msgspec.convert(value, hint)
    except msgspec.ValidationError as exc:
        return str(exc)
    return None


def json_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of one type hint, with its definitions inlined under `$defs` when there are any."""
    schema, components = msgspec.json.schema_components([hint], ref_template="#/$defs/{name}")
    out = dict(schema[0])
    if components:
        out["$defs"] = components
    return out


def struct_schema(struct: type[msgspec.Struct], title: str) -> dict[str, Any]:
    """The JSON Schema of an object type built with `make_struct`, inlined (no top-level `$ref`)."""
    schema = json_schema(struct)
    defs = dict(schema.pop("$defs", {}))
    ref = schema.get("$ref", "")
    body = dict(defs.pop(ref.rsplit("/", 1)[-1], schema)) if ref else schema
    body["title"] = title
    if defs:
        body["$defs"] = defs
    return body


def to_builtins(value: Any) -> Any:
    """Return values and config values as JSON builtins; raise TypeError naming the unsupported type."""
    return msgspec.to_builtins(value)


NODEFAULT: Any = msgspec.NODEFAULT
Meta = msgspec.Meta
