"""Message shapes of protocol v1 (see docs/protocol.md)."""

from __future__ import annotations

from typing import Any

from pyagent.protocol._errors import INVALID_REQUEST, VERSION_MISMATCH, ProtocolError

VERSION = "1"
DEFAULT_MAX_FRAME_BYTES = 1 << 20

# Every method of protocol v1 and the direction it travels in.
METHODS: dict[str, str] = {
    "handshake.hello": "agent -> endpoint",
    "heartbeat.post": "either way",
    "bundle.call": "endpoint -> agent",
    "agent.status": "endpoint -> agent",
    "agent.pause": "endpoint -> agent",
    "agent.resume": "endpoint -> agent",
    "agent.stop": "endpoint -> agent",
    "agent.restart": "endpoint -> agent",
    "agent.config.get": "endpoint -> agent",
    "agent.config.set": "endpoint -> agent",
    "agent.describe": "endpoint -> agent",
    "agent.update": "endpoint -> agent",
    "event.batch": "agent -> endpoint",
    "crash.begin": "agent -> endpoint",
    "crash.chunk": "agent -> endpoint",
    "crash.end": "agent -> endpoint",
    "registry.discover": "agent -> endpoint",
    "agent.call": "agent -> endpoint",
}


def _addressed(msg: dict[str, Any], source: str | None, target: str | None) -> dict[str, Any]:
    """Add the optional `source`/`target` fields (the connection already identifies the peer)."""
    if source is not None:
        msg["source"] = source
    if target is not None:
        msg["target"] = target
    return msg


def request(msg_id: int, method: str, params: dict[str, Any] | None = None, *,
            source: str | None = None, target: str | None = None) -> dict[str, Any]:
    return _addressed({"v": VERSION, "id": msg_id, "method": method, "params": params or {}}, source, target)


def notification(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"v": VERSION, "method": method, "params": params or {}}


def response(msg_id: Any, result: Any, *, source: str | None = None,
             target: str | None = None) -> dict[str, Any]:
    return _addressed({"v": VERSION, "id": msg_id, "result": result}, source, target)


def error_response(msg_id: Any, code: int, message: str, data: Any = None, *,
                   source: str | None = None, target: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return _addressed({"v": VERSION, "id": msg_id, "error": err}, source, target)


def validate_message(msg: Any) -> dict[str, Any]:
    """Check the envelope of a decoded frame; raise ProtocolError naming what is wrong."""
    if not isinstance(msg, dict):
        raise ProtocolError(INVALID_REQUEST, f"a frame must be a JSON object, got {type(msg).__name__}")
    v = msg.get("v")
    if v != VERSION:
        raise ProtocolError(VERSION_MISMATCH, f"unsupported protocol version {v!r}, this side speaks {VERSION!r}",
                            {"supported": [VERSION]})
    if "method" in msg:
        if not isinstance(msg["method"], str) or not msg["method"]:
            raise ProtocolError(INVALID_REQUEST, "'method' must be a non-empty string")
        if "params" in msg and not isinstance(msg["params"], dict):
            raise ProtocolError(INVALID_REQUEST, "'params' must be an object")
        if "id" in msg and (not isinstance(msg["id"], int) or isinstance(msg["id"], bool)):
            raise ProtocolError(INVALID_REQUEST, "'id' must be an integer")
    else:
        if "id" not in msg:
            raise ProtocolError(INVALID_REQUEST, "a response needs an 'id'")
        if ("result" in msg) == ("error" in msg):
            raise ProtocolError(INVALID_REQUEST, "a response needs exactly one of 'result' or 'error'")
    return msg
