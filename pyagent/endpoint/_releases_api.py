"""Operator API routes of the TUF repository (docs/updates.md §1), mounted by `_api.create_app`.

    GET  /api/v1/releases                     (read)  the current targets and metadata versions
    GET  /api/v1/releases/metadata/{name}     (read)  root.json, targets.json, N.targets.json, timestamp.json, ...
    PUT  /api/v1/releases/targets/{path}      (admin) upload a target file (streamed, bounded)
    POST /api/v1/releases/targets             (admin) publish a new targets version signed with the targets key

The targets key never needs to be on the endpoint: `pyagent release` signs on the operator's machine and the
endpoint checks that signature against its trusted root before it writes snapshot and timestamp.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pyagent.endpoint._errors import EndpointError
from pyagent.endpoint._log import log_event
from pyagent.endpoint._tufrepo import RepoError, TufRepo, check_target_path
from pyagent.protocol import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST

_log = logging.getLogger("pyagent.endpoint.releases")

MAX_UPLOAD_BYTES = 256 << 20  # one target file
MAX_METADATA_BYTES = 16 << 20  # one signed targets metadata

Handler = Callable[[Request], Awaitable[Response]]
Requires = Callable[[str, Handler], Handler]


class ReleasesBackend(Protocol):
    @property
    def repo(self) -> TufRepo: ...


def _error(status: int, message: str, code: int = INVALID_PARAMS) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def release_routes(backend: ReleasesBackend, requires: Requires,
                   max_upload_bytes: int = MAX_UPLOAD_BYTES) -> list[Route]:
    def with_repo(handler: Callable[[Request, TufRepo], Awaitable[Response]]) -> Handler:
        async def route(request: Request) -> Response:
            try:
                repo = backend.repo
            except EndpointError as exc:
                return _error(503, str(exc), INTERNAL_ERROR)
            try:
                return await handler(request, repo)
            except RepoError as exc:
                log_event(_log, logging.WARNING, "release.refused", path=request.url.path, reason=str(exc))
                return _error(exc.status, str(exc))
        return route

    async def summary(request: Request, repo: TufRepo) -> Response:
        return JSONResponse(repo.summary())

    async def metadata(request: Request, repo: TufRepo) -> Response:
        name = request.path_params["name"]
        file = repo.metadata_file(name)
        if file is None:
            return _error(404, f"no metadata {name!r} (e.g. root.json, targets.json, timestamp.json)")
        return Response(file.read_bytes(), media_type="application/json")

    async def upload(request: Request, repo: TufRepo) -> Response:
        path = check_target_path(request.path_params["path"])
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes:
            return _error(413, f"target {path}: {declared} bytes is over the limit of {max_upload_bytes}")
        dest = repo.upload_path(path)
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{id(request)}.part")
        size = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        return _error(413, f"target {path}: over the limit of {max_upload_bytes} bytes")
                    f.write(chunk)
            if size == 0:
                return _error(400, f"target {path}: the upload is empty")
            os.replace(tmp, dest)
        except ClientDisconnect:
            return _error(400, f"target {path}: the client went away during the upload", INVALID_REQUEST)
        finally:
            tmp.unlink(missing_ok=True)
        log_event(_log, logging.INFO, "release.uploaded", path=path, bytes=size)
        return JSONResponse({"path": path, "length": size}, status_code=201)

    async def publish(request: Request, repo: TufRepo) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_METADATA_BYTES:
                return _error(413, f"the targets metadata is over {MAX_METADATA_BYTES} bytes")
        # Checking hashes of big targets takes a while: off the loop (the repository takes its own lock).
        version = await asyncio.to_thread(repo.publish_targets, bytes(body))
        log_event(_log, logging.INFO, "release.published", targets_version=version,
                  targets=len(repo.targets.signed.targets), snapshot_version=repo.snapshot.signed.version)
        return JSONResponse({"version": version, "snapshot_version": repo.snapshot.signed.version,
                             "targets": repo.list_targets()}, status_code=201)

    return [
        Route("/api/v1/releases", requires("read", with_repo(summary)), methods=["GET"]),
        Route("/api/v1/releases/metadata/{name}", requires("read", with_repo(metadata)), methods=["GET"]),
        Route("/api/v1/releases/targets/{path:path}", requires("admin", with_repo(upload)), methods=["PUT"]),
        Route("/api/v1/releases/targets", requires("admin", with_repo(publish)), methods=["POST"]),
    ]
