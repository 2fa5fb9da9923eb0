"""Error codes of protocol v1 (JSON-RPC 2.0 where they overlap) and the exceptions that carry them."""

from __future__ import annotations

from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
UNAUTHORIZED = -32000
RATE_LIMITED = -32001
VERSION_MISMATCH = -32002
AGENT_UNAVAILABLE = -32003
TIMEOUT = -32004
FRAME_TOO_LARGE = -32005
AGENT_PAUSED = -32006
NOT_ALLOWED = -32007
ENROLLMENT_PENDING = -32010
AGENT_BUSY = -32011

ERROR_NAMES: dict[int, str] = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal_error",
    UNAUTHORIZED: "unauthorized",
    RATE_LIMITED: "rate_limited",
    VERSION_MISMATCH: "version_mismatch",
    AGENT_UNAVAILABLE: "agent_unavailable",
    TIMEOUT: "timeout",
    FRAME_TOO_LARGE: "frame_too_large",
    AGENT_PAUSED: "agent_paused",
    NOT_ALLOWED: "not_allowed",
    ENROLLMENT_PENDING: "enrollment_pending",
    AGENT_BUSY: "agent_busy",
}


class ProtocolError(Exception):
    """A request is refused: a message breaks protocol v1, or the request cannot be served (a paused agent, bad
    params); `code`, `message` and `data` are what to answer with."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class RemoteError(Exception):
    """The peer answered a request with an error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} ({ERROR_NAMES.get(code, code)})")
        self.code = code
        self.message = message
        self.data = data

    @classmethod
    def from_error(cls, error: Any) -> "RemoteError":
        if not isinstance(error, dict):
            return cls(INTERNAL_ERROR, f"malformed error object: {error!r}")
        code = error.get("code")
        message = error.get("message")
        return cls(
            code if isinstance(code, int) else INTERNAL_ERROR,
            message if isinstance(message, str) else "error without message",
            error.get("data"),
        )

    def to_error(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err
