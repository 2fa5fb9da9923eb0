"""`pyagent describe TARGET [OBJECT]`: the interface an agent published at its handshake."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from typing import Any

from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._errors import EXIT_OK, CliError


def schema_type(schema: Any) -> str:
    """A short type name for a JSON Schema: `int`, `str`, `list[float]`, `"a" | "b"`, `X | null`, ..."""
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return " | ".join(schema_type(s) for s in schema[key])
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    kind = schema.get("type")
    if kind == "array":
        return f"list[{schema_type(schema.get('items'))}]"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"dict[str, {schema_type(schema['additionalProperties'])}]"
    names = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null",
             "object": "object"}
    if isinstance(kind, list):
        return " | ".join(names.get(k, str(k)) for k in kind)
    return names.get(str(kind), "any") if kind is not None else "any"


_CONSTRAINTS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
                ("minLength", "min length"), ("maxLength", "max length"), ("minItems", "min items"),
                ("maxItems", "max items"), ("pattern", "pattern"))


def constraints(schema: Any) -> str:
    if not isinstance(schema, dict):
        return ""
    return ", ".join(f"{label} {json.dumps(schema[key])}" for key, label in _CONSTRAINTS if key in schema)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line if line else line for line in text.splitlines())


def describe_text(agent_id: str, agents: dict[str, Any]) -> str:
    out = [f"agent {agent_id}"]
    for name, spec in sorted(agents.items()):
        caps = ", ".join(spec.get("capabilities") or []) or "none"
        out.append(f"\n{name}  ({spec.get('class', '?')})  capabilities: {caps}")
        if spec.get("help"):
            out.append(_indent(spec["help"], "  "))
        methods = spec.get("methods") or {}
        if methods:
            out.append("  methods:")
        for mname, m in sorted(methods.items()):
            params = m.get("params") or {}
            props = params.get("properties") or {}
            required = set(params.get("required") or [])
            args = []
            for pname, pschema in props.items():
                arg = f"{pname}: {schema_type(pschema)}"
                if pname not in required:
                    arg += f" = {json.dumps(pschema.get('default'))}" if "default" in pschema else " (optional)"
                args.append(arg)
            flags = [] if m.get("async", True) else ["sync"]
            if m.get("exclusive"):
                flags.append("exclusive")
            suffix = f"  [{', '.join(flags)}]" if flags else ""
            out.append(f"    {name}.{mname}({', '.join(args)}) -> {schema_type(m.get('returns'))}{suffix}")
            for pname, pschema in props.items():
                extra = constraints(pschema)
                if extra:
                    out.append(f"        {pname}: {extra}")
            if m.get("help"):
                out.append(_indent(m["help"], "        "))
        config = (spec.get("config") or {})
        fields = (config.get("schema") or {}).get("properties") or {}
        values = config.get("values") or {}
        if fields:
            out.append("  config:")
        for fname, fschema in fields.items():
            line = f"    {fname}: {schema_type(fschema)}"
            if "default" in fschema:
                line += f" = {json.dumps(fschema['default'])}"
            if fname in values and values[fname] != fschema.get("default"):
                line += f"  (at handshake: {json.dumps(values[fname])})"
            extra = constraints(fschema)
            if extra:
                line += f"  [{extra}]"
            out.append(line)
            if fschema.get("description"):
                out.append(f"        {fschema['description']}")
        periodic = spec.get("periodic") or {}
        if periodic:
            out.append("  periodic:")
        for pname, p in sorted(periodic.items()):
            out.append(f"    {pname}: every {json.dumps(p.get('interval'))}" + (f" — {p['help']}" if p.get("help")
                                                                                  else ""))
    return "\n".join(out)


def json_schema(agent_id: str, agents: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema document: per object, per method, the params and returns schemas, and the config schema."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"agent {agent_id}",
        "type": "object",
        "properties": {
            name: {
                "description": spec.get("help", ""),
                "x-capabilities": spec.get("capabilities", []),
                "properties": {
                    "methods": {"properties": {
                        mname: {"description": m.get("help", ""), "properties": {
                            "params": m.get("params", {}), "returns": m.get("returns", {})}}
                        for mname, m in (spec.get("methods") or {}).items()}},
                    "config": (spec.get("config") or {}).get("schema", {}),
                },
            }
            for name, spec in sorted(agents.items())
        },
    }


def run_describe(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    reply = client.get(f"/api/v1/agents/{urllib.parse.quote(args.target, safe='')}/interface")
    agent_id, agents = reply.get("agent_id", args.target), reply.get("agents") or {}
    if args.object is not None:
        if args.object not in agents:
            have = ", ".join(sorted(agents)) or "none"
            raise CliError(f"agent {agent_id} has no object {args.object!r} (objects: {have})")
        agents = {args.object: agents[args.object]}
    if not agents:
        raise CliError(f"agent {agent_id} published no interface (an agent older than the agent API?)")
    if args.json:
        print(json.dumps(json_schema(agent_id, agents), indent=2, ensure_ascii=False))
    else:
        print(describe_text(agent_id, agents))
    return EXIT_OK
