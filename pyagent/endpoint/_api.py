"""The operator HTTP API (docs/protocol.md, "Operator API"): a Starlette app served by uvicorn in the endpoint's loop.

Every route requires `Authorization: Bearer <operator token>`. API misuse gets 400/401/404 with a JSON error; the
outcome of a call is always HTTP 200 with `{"result": ...}` or `{"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Generator, Mapping
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pyagent.endpoint._errors import EndpointError
from pyagent.endpoint._log import log_event, log_exception
from pyagent.endpoint._net import bind_listeners, peer_name
from pyagent.endpoint._registry import AgentRecord
from pyagent.protocol import (
    AGENT_UNAVAILABLE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    UNAUTHORIZED,
    RemoteError,
)

_log = logging.getLogger("pyagent.endpoint.api")

DEFAULT_CALL_TIMEOUT = 30.0
MAX_CALL_TIMEOUT = 3600.0
CALL_FIELDS = frozenset({"target", "method", "params", "timeout"})


class ApiBackend(Protocol):
    """What the API needs from the endpoint."""

    def agents(self) -> list[AgentRecord]: ...
    def agent(self, ref: str) -> AgentRecord | None: ...
    async def call(self, target: str, method: str, params: dict[str, Any] | None = None,
                   timeout: float = DEFAULT_CALL_TIMEOUT) -> Any: ...


def _error(status: int, code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class _BadRequest(Exception):
    pass


class BearerAuth:
    """Pure ASGI middleware: refuse any HTTP request without the operator token (constant-time comparison)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = b"bearer " + token.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            # The scheme is case-insensitive (RFC 7235), the token is not.
            candidate = given[:7].lower() + given[7:]
            if not hmac.compare_digest(candidate, self._expected):
                log_event(_log, logging.WARNING, "api.unauthorized", peer=peer_name(scope.get("client")),
                          path=scope.get("path"), reason="bad token" if given else "no Authorization header")
                reply = _error(401, UNAUTHORIZED, "unauthorized: send 'Authorization: Bearer <operator token>' "
                               "(the token is in STATE_DIR/operator-token)" if not given else
                               "unauthorized: wrong operator token", headers={"WWW-Authenticate": "Bearer"})
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


def parse_call(data: Any) -> tuple[str, str, dict[str, Any], float]:
    """Validate a `POST /api/v1/call` body; raises _BadRequest naming the field."""
    if not isinstance(data, dict):
        raise _BadRequest("the request body must be a JSON object")
    unknown = sorted(set(data) - CALL_FIELDS)
    if unknown:
        raise _BadRequest(f"unknown field '{unknown[0]}' (expected target, method, params, timeout)")
    target = data.get("target")
    if not isinstance(target, str) or not target:
        raise _BadRequest("'target' must be a non-empty string: an agent id or name")
    method = data.get("method")
    if not isinstance(method, str) or not all(method.rpartition(".")):
        raise _BadRequest("'method' must be a string 'object.method', e.g. 'hello.greet'")
    params = data.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _BadRequest("'params' must be an object")
    timeout = data.get("timeout", DEFAULT_CALL_TIMEOUT)
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_CALL_TIMEOUT):
        raise _BadRequest(f"'timeout' must be a number of seconds in (0, {MAX_CALL_TIMEOUT:g}]")
    return target, method, params, float(timeout)


def create_app(backend: ApiBackend, operator_token: str, *, max_body_bytes: int = 1 << 20) -> Starlette:
    async def list_agents(request: Request) -> Response:
        return JSONResponse({"agents": backend.agents()})

    async def get_agent(request: Request) -> Response:
        ref = request.path_params["ref"]
        record = backend.agent(ref)
        if record is None:
            return _error(404, AGENT_UNAVAILABLE, f"no agent with id or name {ref!r}")
        return JSONResponse(record)

    async def call(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _error(413, INVALID_REQUEST, f"the request body is over {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except ValueError as exc:
            return _error(400, INVALID_REQUEST, f"the request body is not valid JSON: {exc}")
        try:
            target, method, params, timeout = parse_call(data)
        except _BadRequest as exc:
            return _error(400, INVALID_PARAMS, str(exc))
        try:
            result = await backend.call(target, method, params, timeout)
        except RemoteError as exc:
            return JSONResponse({"error": exc.to_error()})
        except Exception:
            log_exception(_log, "api.call_failed", target=target, method=method)
            return _error(500, INTERNAL_ERROR, "the endpoint failed while making the call; see its log")
        try:
            return JSONResponse({"result": result})
        except ValueError as exc:  # e.g. NaN in the agent's result
            return JSONResponse({"error": {"code": INTERNAL_ERROR, "message": f"the result is not JSON: {exc}"}})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, INVALID_REQUEST, f"{request.method} {request.url.path}: {exc.detail}",
                      headers=exc.headers)

    return Starlette(
        routes=[
            Route("/api/v1/agents", list_agents, methods=["GET"]),
            Route("/api/v1/agents/{ref}", get_agent, methods=["GET"]),
            Route("/api/v1/call", call, methods=["POST"]),
        ],
        middleware=[Middleware(BearerAuth, token=operator_token)],
        exception_handlers={HTTPException: http_error},
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the endpoint's loop: the endpoint, not uvicorn, owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class ApiServer:
    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        sockets = bind_listeners(host, port)
        self.port = sockets[0].getsockname()[1]
        config = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off", http="h11",
                                ws="none", proxy_headers=False, server_header=False, timeout_graceful_shutdown=1)
        self._server = server = _EmbeddedServer(config)
        self._task = task = asyncio.get_running_loop().create_task(server.serve(sockets=sockets))
        for _ in range(500):  # bounded: 5 s
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            for sock in sockets:
                sock.close()
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise EndpointError(f"the operator API did not start: {task.exception()}")
            task.cancel()
            raise EndpointError("the operator API did not start")
        return self.port

    async def close(self) -> None:
        server, task = self._server, self._task
        if server is None or task is None:
            return
        self._server = self._task = None
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=1.5)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
