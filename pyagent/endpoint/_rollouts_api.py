"""Operator API routes of rollouts and per-agent updates (docs/updates.md §4), mounted by `_api.create_app`.

    POST /api/v1/rollouts                 {"kind", "name", "version", "select", "waves", "max_failure_rate",
                                           "max_crash_rate", "stall_timeout"} → 201       (admin)
    GET  /api/v1/rollouts                 {"rollouts": [...]}, newest first               (read)
    GET  /api/v1/rollouts/{id}            the rollout with its agents (id or unique prefix) (read)
    POST /api/v1/rollouts/{id}/halt|resume                                                (admin)
    GET  /api/v1/updates[?agent=REF]      {"updates": [...], "policies": {...}}           (read)
    PUT  /api/v1/agents/{ref}/pin         {"kind", "name", "version"}                     (admin)
    DELETE /api/v1/agents/{ref}/pin[?kind=&name=]                                         (admin)
    POST /api/v1/agents/{ref}/updates     {"opt_out": bool}                               (admin)
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pyagent.endpoint._errors import EndpointError
from pyagent.endpoint._rollouts import RolloutError, RolloutManager
from pyagent.endpoint._updates import HOST_NAME, check_name, check_version
from pyagent.protocol import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST

Handler = Callable[[Request], Awaitable[Response]]
Requires = Callable[[str, Handler], Handler]


def _error(status: int, code: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _body(request: Request, max_body_bytes: int) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body_bytes:
            raise RolloutError(413, f"the request body is over {max_body_bytes} bytes")
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError as exc:
        raise RolloutError(400, f"the request body is not valid JSON: {exc}") from None


def rollout_routes(backend: Any, requires: Requires, max_body_bytes: int = 1 << 20) -> list[Route]:
    """The routes; `backend.rollouts` is the endpoint's RolloutManager, `backend.agent(ref)` finds agents."""

    def route(handler: Callable[[Request, RolloutManager], Awaitable[Response]]) -> Handler:
        async def run(request: Request) -> Response:
            try:
                manager: RolloutManager = backend.rollouts
            except EndpointError as exc:
                return _error(503, INTERNAL_ERROR, str(exc))
            try:
                return await handler(request, manager)
            except RolloutError as exc:
                code = INVALID_PARAMS if exc.status == 400 else INVALID_REQUEST
                return _error(exc.status, code, exc.message)
        return run

    def agent_id(ref: str) -> str:
        record = backend.agent(ref)
        if record is None:
            raise RolloutError(404, f"no agent with id or name {ref!r}")
        return str(record["agent_id"])

    async def start(request: Request, manager: RolloutManager) -> Response:
        return JSONResponse(manager.create(await _body(request, max_body_bytes)), status_code=201)

    async def list_rollouts(request: Request, manager: RolloutManager) -> Response:
        return JSONResponse({"rollouts": manager.list()})

    async def show(request: Request, manager: RolloutManager) -> Response:
        return JSONResponse(manager.describe(manager.resolve(request.path_params["id"]), agents=True))

    async def halt(request: Request, manager: RolloutManager) -> Response:
        return JSONResponse(manager.halt(request.path_params["id"]))

    async def resume(request: Request, manager: RolloutManager) -> Response:
        return JSONResponse(manager.resume(request.path_params["id"]))

    async def updates(request: Request, manager: RolloutManager) -> Response:
        ref = request.query_params.get("agent")
        wanted = agent_id(ref) if ref else None
        policies = {a: p.to_json() for a, p in manager.updates.policies().items() if wanted in (None, a)}
        return JSONResponse({"updates": manager.updates.states(wanted), "policies": policies})

    async def pin(request: Request, manager: RolloutManager) -> Response:
        aid = agent_id(request.path_params["ref"])
        data = await _body(request, max_body_bytes)
        if not isinstance(data, dict) or set(data) - {"kind", "name", "version"}:
            raise RolloutError(400, 'the body must be {"kind": "bundle"|"host", "name": N, "version": V}')
        kind = data.get("kind")
        name = data.get("name", HOST_NAME if kind == "host" else None)
        version = data.get("version")
        if not isinstance(kind, str) or not isinstance(name, str) or not isinstance(version, str):
            raise RolloutError(400, "'kind', 'name' and 'version' must be strings (name: the bundle's)")
        problem = check_name(kind, name) or check_version(version)
        if problem:
            raise RolloutError(400, problem)
        policy = manager.updates.pin(aid, kind, name, version)
        return JSONResponse({"agent_id": aid, **policy.to_json()})

    async def unpin(request: Request, manager: RolloutManager) -> Response:
        aid = agent_id(request.path_params["ref"])
        kind = request.query_params.get("kind") or None
        name = request.query_params.get("name") or None
        if kind is not None and kind not in ("bundle", "host"):
            raise RolloutError(400, "'kind' must be bundle or host")
        policy, removed = manager.updates.unpin(aid, kind, name)
        return JSONResponse({"agent_id": aid, "removed": removed, **policy.to_json()})

    async def opt(request: Request, manager: RolloutManager) -> Response:
        aid = agent_id(request.path_params["ref"])
        data = await _body(request, max_body_bytes)
        if not isinstance(data, dict) or set(data) != {"opt_out"} or not isinstance(data["opt_out"], bool):
            raise RolloutError(400, 'the body must be {"opt_out": true} or {"opt_out": false}')
        policy = manager.updates.set_opt_out(aid, data["opt_out"])
        return JSONResponse({"agent_id": aid, **policy.to_json()})

    return [
        Route("/api/v1/rollouts", requires("admin", route(start)), methods=["POST"]),
        Route("/api/v1/rollouts", requires("read", route(list_rollouts)), methods=["GET"]),
        Route("/api/v1/rollouts/{id}", requires("read", route(show)), methods=["GET"]),
        Route("/api/v1/rollouts/{id}/halt", requires("admin", route(halt)), methods=["POST"]),
        Route("/api/v1/rollouts/{id}/resume", requires("admin", route(resume)), methods=["POST"]),
        Route("/api/v1/updates", requires("read", route(updates)), methods=["GET"]),
        Route("/api/v1/agents/{ref}/pin", requires("admin", route(pin)), methods=["PUT"]),
        Route("/api/v1/agents/{ref}/pin", requires("admin", route(unpin)), methods=["DELETE"]),
        Route("/api/v1/agents/{ref}/updates", requires("admin", route(opt)), methods=["POST"]),
    ]


__all__ = ["rollout_routes"]
