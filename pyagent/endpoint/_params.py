"""Validation of the parameters agents send (`handshake.hello`, `heartbeat.post`); errors name the parameter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyagent.endpoint._registry import AgentInfo
from pyagent.protocol import INVALID_PARAMS, ProtocolError

HELLO_KEYS = frozenset({"agent_id", "name", "token", "host", "bundles", "features", "platform", "labels",
                        "interface"})
HELLO_REQUIRED = ("agent_id", "name", "host")  # token: only on the shared-token development path
MAX_ID_CHARS = 256


def _fail(method: str, message: str) -> ProtocolError:
    return ProtocolError(INVALID_PARAMS, f"{method}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value: Any, where: str, method: str, *, max_chars: int | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(method, f"'{where}' must be a non-empty string")
    if max_chars is not None and len(value) > max_chars:
        raise _fail(method, f"'{where}' is longer than {max_chars} characters")
    return value


def _object(value: Any, where: str, method: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(method, f"'{where}' must be an object")
    return value


def _string_map(value: Any, where: str, method: str) -> dict[str, str]:
    for key, item in _object(value, where, method).items():
        if not isinstance(item, str):
            raise _fail(method, f"'{where}.{key}' must be a string")
    return dict(value)


def parse_hello(params: dict[str, Any]) -> AgentInfo:
    """The agent's description from `handshake.hello` params (credentials are checked by the caller, first)."""
    m = "handshake.hello"
    unknown = sorted(set(params) - HELLO_KEYS)
    if unknown:
        raise _fail(m, f"unknown parameter '{unknown[0]}'")
    for key in HELLO_REQUIRED:
        if key not in params:
            raise _fail(m, f"missing parameter '{key}'")
    agent_id = _text(params["agent_id"], "agent_id", m, max_chars=MAX_ID_CHARS)
    name = _text(params["name"], "name", m, max_chars=MAX_ID_CHARS)
    host = _object(params["host"], "host", m)
    host_version = _text(host.get("version"), "host.version", m)
    python_version = _text(host.get("python"), "host.python", m)

    bundles = params.get("bundles", [])
    if not isinstance(bundles, list):
        raise _fail(m, "'bundles' must be an array")
    for i, bundle in enumerate(bundles):
        where = f"bundles[{i}]"
        _object(bundle, where, m)
        _text(bundle.get("name"), f"{where}.name", m)
        _text(bundle.get("version"), f"{where}.version", m)
        agents = bundle.get("agents", [])
        if not isinstance(agents, list) or not all(isinstance(a, str) and a for a in agents):
            raise _fail(m, f"'{where}.agents' must be an array of agent object names")

    features = _object(params.get("features", {}), "features", m)
    for key, version in features.items():
        if not isinstance(version, int) or isinstance(version, bool):
            raise _fail(m, f"'features.{key}' must be an integer version")

    interface = _object(params.get("interface", {}), "interface", m)
    for obj, spec in interface.items():
        _text(obj, "interface", m, max_chars=MAX_ID_CHARS)
        spec = _object(spec, f"interface.{obj}", m)
        caps = spec.get("capabilities", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) and 0 < len(c) <= MAX_ID_CHARS for c in caps):
            raise _fail(m, f"'interface.{obj}.capabilities' must be an array of capability names")
        if not isinstance(spec.get("methods", {}), dict):
            raise _fail(m, f"'interface.{obj}.methods' must be an object")

    return AgentInfo(
        agent_id=agent_id,
        name=name,
        host_version=host_version,
        python_version=python_version,
        bundles=list(bundles),
        labels=_string_map(params.get("labels", {}), "labels", m),
        platform=_string_map(params.get("platform", {}), "platform", m),
        features=dict(features),
        interface=dict(interface),
    )


@dataclass(frozen=True)
class Heartbeat:
    rtt_ms: float | None
    skew_ms: float | None
    py_lag_ms: float | None


def parse_heartbeat(params: dict[str, Any]) -> Heartbeat:
    """Measurements from an agent's `heartbeat.post`; every key is optional, unknown keys are ignored."""
    m = "heartbeat.post"
    if "timestamp" in params and not _is_number(params["timestamp"]):
        raise _fail(m, "'timestamp' must be a number (ms since the epoch)")
    if "seq" in params and (not isinstance(params["seq"], int) or isinstance(params["seq"], bool)):
        raise _fail(m, "'seq' must be an integer")
    values: list[float | None] = []
    for key, minimum in (("rtt_ms", 0.0), ("skew_ms", None), ("py_lag_ms", 0.0)):
        value = params.get(key)
        if value is not None and (not _is_number(value) or (minimum is not None and value < minimum)):
            raise _fail(m, f"'{key}' must be a{' non-negative' if minimum is not None else ''} number or null")
        values.append(None if value is None else float(value))
    return Heartbeat(*values)
