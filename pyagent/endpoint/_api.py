"""The operator HTTP API (docs/protocol.md, "Operator API"): a Starlette app served by uvicorn in the endpoint's loop.

Every route requires `Authorization: Bearer <operator token>` and a scope (read, call or admin) of that token. API
misuse gets 400/401/403/404 with a JSON error; the outcome of a call is always HTTP 200 with `{"result": ...}` or
`{"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Protocol

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pyagent.endpoint import _crashes
from pyagent.endpoint._errors import EndpointError
from pyagent.endpoint._log import log_event, log_exception
from pyagent.endpoint._net import bind_listeners, peer_name
from pyagent.endpoint._events import events_response
from pyagent.endpoint._registry import AgentRecord
from pyagent.endpoint._releases_api import release_routes
from pyagent.endpoint._rollouts_api import rollout_routes
from pyagent.endpoint._targets import DEFAULT_CONCURRENCY, MAX_CONCURRENCY
from pyagent.endpoint._tokens import SCOPES, TokenFormatError, parse_duration, scope_allows
from pyagent.protocol import (
    AGENT_UNAVAILABLE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    NOT_ALLOWED,
    UNAUTHORIZED,
    RemoteError,
)

_log = logging.getLogger("pyagent.endpoint.api")

DEFAULT_CALL_TIMEOUT = 30.0
MAX_CALL_TIMEOUT = 3600.0
CALL_FIELDS = frozenset({"target", "method", "params", "timeout", "concurrency"})


Authenticator = Callable[[str], "tuple[str, tuple[str, ...]] | None"]
_SCOPES_KEY = "pyagent.scopes"
_TOKEN_ID_KEY = "pyagent.token_id"
TOKEN_FIELDS = frozenset({"uses", "expires", "labels", "approve"})
OPERATOR_TOKEN_FIELDS = frozenset({"scopes", "label"})


class ApiBackend(Protocol):
    """What the API needs from the endpoint."""

    def agents(self) -> list[AgentRecord]: ...
    def agent(self, ref: str) -> AgentRecord | None: ...
    async def call(self, target: str, method: str, params: dict[str, Any] | None = None,
                   timeout: float = DEFAULT_CALL_TIMEOUT) -> Any: ...
    def set_agent_status(self, agent_id: str, status: str) -> str: ...
    async def call_target(self, target: str, method: str, params: dict[str, Any] | None = None,
                          timeout: float = DEFAULT_CALL_TIMEOUT, concurrency: int = 64) -> dict[str, Any]: ...
    def interface(self, ref: str) -> tuple[str, dict[str, Any]] | None: ...
    def select(self, target: str) -> tuple[Any, list[Any]]: ...
    @property
    def events(self) -> Any: ...
    def metrics(self) -> dict[str, Any]: ...
    @property
    def crashes(self) -> Any: ...
    @property
    def tokens(self) -> Any: ...
    @property
    def repo(self) -> Any: ...


def _error(status: int, code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class _BadRequest(Exception):
    status = 400


class _TooLarge(_BadRequest):
    status = 413


class BearerAuth:
    """Pure ASGI middleware: refuse any HTTP request without a valid operator token; record the token's scopes for
    the routes, which check the one they need."""

    def __init__(self, app: ASGIApp, authenticate: Authenticator) -> None:
        self.app = app
        self._authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            # The scheme is case-insensitive (RFC 7235), the token is not.
            found = None
            if given[:7].lower() == b"bearer ":
                try:
                    found = self._authenticate(given[7:].decode("utf-8").strip())
                except UnicodeDecodeError:
                    found = None
            if found is None:
                log_event(_log, logging.WARNING, "api.unauthorized", peer=peer_name(scope.get("client")),
                          path=scope.get("path"), reason="bad or revoked token" if given else
                          "no Authorization header")
                reply = _error(401, UNAUTHORIZED, "unauthorized: send 'Authorization: Bearer <operator token>' "
                               "(the token is in STATE_DIR/operator-token)" if not given else
                               "unauthorized: unknown or revoked operator token",
                               headers={"WWW-Authenticate": "Bearer"})
                await reply(scope, receive, send)
                return
            scope[_TOKEN_ID_KEY], scope[_SCOPES_KEY] = found
        await self.app(scope, receive, send)


Handler = Callable[[Request], Awaitable[Response]]


def requires(needed: str, handler: Handler) -> Handler:
    """Wrap a route so that it answers 403 (naming the missing scope) unless the token has `needed`."""

    async def checked(request: Request) -> Response:
        granted = request.scope.get(_SCOPES_KEY, ())
        if not scope_allows(granted, needed):
            log_event(_log, logging.WARNING, "api.forbidden", peer=peer_name(request.scope.get("client")),
                      path=request.url.path, token_id=request.scope.get(_TOKEN_ID_KEY), needed=needed,
                      granted=",".join(granted))
            return _error(403, UNAUTHORIZED, f"forbidden: {request.method} {request.url.path} needs the "
                          f"'{needed}' scope; this token has {', '.join(granted) or 'none'}")
        return await handler(request)

    return checked


async def _read_json(request: Request, max_body_bytes: int) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise _TooLarge(f"the request body is over {max_body_bytes} bytes")
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError as exc:
        raise _BadRequest(f"the request body is not valid JSON: {exc}") from None


def parse_token_request(data: Any) -> dict[str, Any]:
    """Validate a `POST /api/v1/tokens` body into keyword arguments of `TokenStore.create_enroll_token`."""
    if not isinstance(data, dict):
        raise _BadRequest("the request body must be a JSON object")
    unknown = sorted(set(data) - TOKEN_FIELDS)
    if unknown:
        raise _BadRequest(f"unknown field '{unknown[0]}' (expected uses, expires, labels, approve)")
    uses = data.get("uses")
    if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or not 1 <= uses <= 1 << 31):
        raise _BadRequest("'uses' must be a positive integer")
    expires = data.get("expires")
    expires_s: int | None = None
    if expires is not None:
        try:
            expires_s = parse_duration(str(expires)) if not isinstance(expires, bool) else parse_duration("")
        except TokenFormatError as exc:
            raise _BadRequest(f"'expires': {exc}") from None
    labels = data.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise _BadRequest("'labels' must be an object of strings")
    approve = data.get("approve", False)
    if not isinstance(approve, bool):
        raise _BadRequest("'approve' must be true or false")
    return {"uses": uses, "expires_s": expires_s, "labels": labels, "approve": approve}


def parse_call(data: Any) -> tuple[str, str, dict[str, Any], float]:
    """Validate a `POST /api/v1/call` body; raises _BadRequest naming the field."""
    if not isinstance(data, dict):
        raise _BadRequest("the request body must be a JSON object")
    unknown = sorted(set(data) - CALL_FIELDS)
    if unknown:
        raise _BadRequest(f"unknown field '{unknown[0]}' (expected target, method, params, timeout, concurrency)")
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


def create_app(backend: ApiBackend, authenticate: Authenticator, *, max_body_bytes: int = 1 << 20) -> Starlette:
    def with_crash_loops(records: list[AgentRecord]) -> list[dict[str, Any]]:
        """The records with the crash-loop flag of each (`_crashes.CrashStore.loop_fields`)."""
        try:
            fields = backend.crashes.loop_fields([r["agent_id"] for r in records])
        except EndpointError:  # closing: the records without the flag
            return [dict(r) for r in records]
        return [{**r, **fields[r["agent_id"]]} for r in records]

    async def list_agents(request: Request) -> Response:
        return JSONResponse({"agents": with_crash_loops(backend.agents())})

    async def get_agent(request: Request) -> Response:
        ref = request.path_params["ref"]
        record = backend.agent(ref)
        if record is None:
            return _error(404, AGENT_UNAVAILABLE, f"no agent with id or name {ref!r}")
        return JSONResponse(with_crash_loops([record])[0])

    async def clear_crash_loop(request: Request) -> Response:
        ref = request.path_params["ref"]
        record = backend.agent(ref)
        agent_id = record["agent_id"] if record is not None else ref  # an agent forgotten since: its id
        try:
            store = backend.crashes
        except EndpointError as exc:
            return _error(503, INTERNAL_ERROR, str(exc))
        loop = store.clear_loop(agent_id)
        if loop is None:
            return _error(404, INVALID_PARAMS, f"agent {ref!r} is not flagged as in a crash loop")
        log_event(_log, logging.INFO, "api.crash_loop_cleared", agent=agent_id,
                  token_id=request.scope.get(_TOKEN_ID_KEY))
        return JSONResponse({"agent_id": agent_id, "cleared": loop})

    async def call(request: Request) -> Response:
        try:
            data = await _read_json(request, max_body_bytes)
        except _BadRequest as exc:
            return _error(exc.status, INVALID_REQUEST, str(exc))
        try:
            target, method, params, timeout = parse_call(data)
        except _BadRequest as exc:
            return _error(400, INVALID_PARAMS, str(exc))
        if method == "agent.update":
            # Updates go through rollouts (admin): waves, gates, pins and opt-outs apply, and states are tracked.
            return _error(403, NOT_ALLOWED, "agent.update is offered by rollouts only: pyagent rollout start "
                                            "--bundle NAME==VERSION | --host VERSION")
        concurrency = data.get("concurrency", DEFAULT_CONCURRENCY)
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or not 1 <= concurrency <= MAX_CONCURRENCY:
            return _error(400, INVALID_PARAMS, f"'concurrency' must be an integer in [1, {MAX_CONCURRENCY}]")
        try:
            reply = await backend.call_target(target, method, params, timeout, concurrency)
        except Exception:
            log_exception(_log, "api.call_failed", target=target, method=method)
            return _error(500, INTERNAL_ERROR, "the endpoint failed while making the call; see its log")
        try:
            return JSONResponse(reply)
        except ValueError as exc:  # e.g. NaN in the agent's result
            return JSONResponse({"error": {"code": INTERNAL_ERROR, "message": f"the result is not JSON: {exc}"}})

    def status_route(status: str) -> Handler:
        async def change(request: Request) -> Response:
            ref = request.path_params["ref"]
            try:
                old = backend.set_agent_status(ref, status)
            except KeyError:
                return _error(404, AGENT_UNAVAILABLE, f"no agent with id or name {ref!r}")
            except ValueError as exc:
                return _error(409, INVALID_REQUEST, str(exc))
            log_event(_log, logging.INFO, "api.agent_status", agent=ref, old=old, new=status,
                      token_id=request.scope.get(_TOKEN_ID_KEY))
            record = backend.agent(ref)
            return JSONResponse({"agent_id": record["agent_id"] if record else ref, "old": old, "status": status})
        return change

    async def get_interface(request: Request) -> Response:
        found = backend.interface(request.path_params["ref"])
        if found is None:
            return _error(404, AGENT_UNAVAILABLE, f"no agent with id or name {request.path_params['ref']!r}")
        return JSONResponse({"agent_id": found[0], "agents": found[1]})

    async def events(request: Request) -> Response:
        return await events_response(request, backend)

    def crash_route(handler: Callable[[Request, Any], Awaitable[Response]]) -> Handler:
        async def route(request: Request) -> Response:
            try:
                store = backend.crashes
            except EndpointError as exc:
                return _error(503, INTERNAL_ERROR, str(exc))
            return await handler(request, store)
        return route

    async def metrics(request: Request) -> Response:
        return JSONResponse(backend.metrics())

    async def create_token(request: Request) -> Response:
        try:
            kwargs = parse_token_request(await _read_json(request, max_body_bytes))
        except _BadRequest as exc:
            return _error(400, INVALID_PARAMS, str(exc))
        token, token_id = backend.tokens.create_enroll_token(**kwargs)
        return JSONResponse({"token": token, "token_id": token_id}, status_code=201)

    async def list_tokens(request: Request) -> Response:
        return JSONResponse({"tokens": backend.tokens.enroll_tokens()})

    async def revoke_token(request: Request) -> Response:
        if not backend.tokens.revoke_enroll_token(request.path_params["token_id"]):
            return _error(404, INVALID_PARAMS, f"no enrollment token {request.path_params['token_id']!r}")
        return JSONResponse({"revoked": request.path_params["token_id"]})

    async def create_operator_token(request: Request) -> Response:
        try:
            data = await _read_json(request, max_body_bytes)
            if not isinstance(data, dict) or set(data) - OPERATOR_TOKEN_FIELDS:
                raise _BadRequest("the body must be {\"scopes\": [...], \"label\": \"...\"}")
            scopes = data.get("scopes")
            if (not isinstance(scopes, list) or not scopes
                    or not all(isinstance(x, str) and x in SCOPES for x in scopes)):
                raise _BadRequest(f"'scopes' must be a non-empty list of {', '.join(SCOPES)}")
            label = data.get("label", "")
            if not isinstance(label, str) or len(label) > 256:
                raise _BadRequest("'label' must be a string of at most 256 characters")
        except _BadRequest as exc:
            return _error(400, INVALID_PARAMS, str(exc))
        token, token_id = backend.tokens.create_operator_token(tuple(s for s in SCOPES if s in scopes), label)
        return JSONResponse({"token": token, "token_id": token_id}, status_code=201)

    async def list_operator_tokens(request: Request) -> Response:
        return JSONResponse({"tokens": backend.tokens.operator_tokens()})

    async def revoke_operator_token(request: Request) -> Response:
        token_id = request.path_params["token_id"]
        if token_id == request.scope.get(_TOKEN_ID_KEY):
            return _error(409, INVALID_REQUEST, "refusing to revoke the token this request uses")
        if not backend.tokens.revoke_operator_token(token_id):
            return _error(404, INVALID_PARAMS, f"no operator token {token_id!r}")
        return JSONResponse({"revoked": token_id})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _error(exc.status_code, INVALID_REQUEST, f"{request.method} {request.url.path}: {exc.detail}",
                      headers=exc.headers)

    return Starlette(
        routes=[
            Route("/api/v1/agents", requires("read", list_agents), methods=["GET"]),
            Route("/api/v1/agents/{ref}", requires("read", get_agent), methods=["GET"]),
            Route("/api/v1/agents/{ref}/interface", requires("read", get_interface), methods=["GET"]),
            Route("/api/v1/events", requires("read", events), methods=["GET"]),
            Route("/api/v1/agents/{ref}/approve", requires("admin", status_route("active")), methods=["POST"]),
            Route("/api/v1/agents/{ref}/reject", requires("admin", status_route("rejected")), methods=["POST"]),
            Route("/api/v1/agents/{ref}/revoke", requires("admin", status_route("revoked")), methods=["POST"]),
            Route("/api/v1/call", requires("call", call), methods=["POST"]),
            Route("/api/v1/metrics", requires("read", metrics), methods=["GET"]),
            Route("/api/v1/crashes", requires("read", crash_route(_crashes.api_list)), methods=["GET"]),
            Route("/api/v1/crashes/{id}", requires("read", crash_route(_crashes.api_show)), methods=["GET"]),
            Route("/api/v1/crash-counts", requires("read", crash_route(_crashes.api_counts)), methods=["GET"]),
            Route("/api/v1/crash-loops/{ref}", requires("admin", clear_crash_loop), methods=["DELETE"]),
            Route("/api/v1/tokens", requires("admin", create_token), methods=["POST"]),
            Route("/api/v1/tokens", requires("admin", list_tokens), methods=["GET"]),
            Route("/api/v1/tokens/{token_id}", requires("admin", revoke_token), methods=["DELETE"]),
            Route("/api/v1/operator-tokens", requires("admin", create_operator_token), methods=["POST"]),
            Route("/api/v1/operator-tokens", requires("admin", list_operator_tokens), methods=["GET"]),
            Route("/api/v1/operator-tokens/{token_id}", requires("admin", revoke_operator_token),
                  methods=["DELETE"]),
            *rollout_routes(backend, requires, max_body_bytes),
            *release_routes(backend, requires),
        ],
        middleware=[Middleware(BearerAuth, authenticate=authenticate)],
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
