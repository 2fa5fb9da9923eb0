"""The TUF repository served to agents over their own TLS connection: HTTP/1.1 with h11 (docs/updates.md §1).

A connection whose first bytes are an HTTP request line (`GET ` or `HEAD `) is handed here after the TLS handshake
instead of to the NDJSON session. Only `GET|HEAD /tuf/metadata/<file>` and `GET|HEAD /tuf/targets/<path>` exist,
with `Range: bytes=N-` (or `bytes=N-M`) answered 206 for resumed downloads. The agent must present a client
certificate of an `active` agent (403, and the connection closes, otherwise); a bad path is 400, anything unknown
(or a file removed by housekeeping meanwhile) 404. Requests are bounded in size, the connection stays open between
requests (keep-alive) for at most MAX_REQUESTS requests, and closes when a whole request has not arrived within
IDLE_TIMEOUT of the previous answer (or of the connection's start) or when the peer does not read an answer for
SEND_TIMEOUT. File bodies are read in a worker thread, a chunk at a time (`_read_chunk`), so a slow disk never
stalls the endpoint's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import h11

from pyagent.endpoint._log import log_event
from pyagent.endpoint._tufrepo import TufRepo

_log = logging.getLogger("pyagent.endpoint.repohttp")

MAX_REQUEST_BYTES = 16 * 1024  # request line and headers
IDLE_TIMEOUT = 30.0  # seconds for the next whole request (line and headers) to arrive
MAX_REQUESTS = 1000  # per connection; the last answer says `connection: close`
SEND_TIMEOUT = 60.0  # seconds a peer may leave an answer unread
_READ_SIZE = 64 * 1024
_CHUNK = 1 << 20  # bytes read per worker-thread job and sent per h11 Data event
_RANGE = re.compile(rb"bytes=(\d{1,15})-(\d{0,15})\Z")

StatusLookup = Callable[[str], "str | None"]


class _Reply:
    """What one request gets: status, headers, and the body as bytes or as part of a file."""

    def __init__(self, status: int, body: bytes = b"", content_type: bytes = b"text/plain; charset=utf-8",
                 file: Path | None = None, start: int = 0, length: int = 0,
                 extra: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.file = file
        self.start = start
        self.length = len(body) if file is None else length
        self.extra = extra or []


def _text(status: int, message: str) -> _Reply:
    return _Reply(status, (message + "\n").encode("utf-8"))


def _file_reply(file: Path, content_type: bytes, range_header: bytes | None) -> _Reply:
    size = file.stat().st_size
    accept = [(b"accept-ranges", b"bytes")]
    if range_header is None:
        return _Reply(200, content_type=content_type, file=file, length=size, extra=accept)
    match = _RANGE.match(range_header.strip())
    if match is None:  # another form (several ranges, a suffix): the whole file, as RFC 9110 allows
        return _Reply(200, content_type=content_type, file=file, length=size, extra=accept)
    start = int(match.group(1))
    end = int(match.group(2)) if match.group(2) else size - 1
    if start >= size or end < start:
        return _Reply(416, b"range not satisfiable\n", extra=[(b"content-range", f"bytes */{size}".encode())])
    end = min(end, size - 1)
    return _Reply(206, content_type=content_type, file=file, start=start, length=end - start + 1,
                  extra=accept + [(b"content-range", f"bytes {start}-{end}/{size}".encode())])


def route(repo: TufRepo | None, method: bytes, target: bytes, range_header: bytes | None) -> _Reply:
    """The reply to one request by an authorized agent."""
    if method not in (b"GET", b"HEAD"):
        return _Reply(405, b"only GET and HEAD\n", extra=[(b"allow", b"GET, HEAD")])
    if repo is None:
        return _text(404, "this endpoint serves no TUF repository")
    try:
        path = urllib.parse.unquote(target.split(b"?", 1)[0].decode("ascii"), errors="strict")
    except (UnicodeDecodeError, ValueError):
        return _text(400, "bad request target")
    if path.startswith("/tuf/metadata/"):
        name = path[len("/tuf/metadata/"):]
        if "/" in name or name in ("", ".", ".."):
            return _text(400, f"bad metadata name {name!r}")
        file = repo.metadata_file(name)
        what, content_type = f"no metadata {name}", b"application/json"
    elif path.startswith("/tuf/targets/"):
        name = path[len("/tuf/targets/"):]
        if any(part in ("", ".", "..") for part in name.split("/")) or "\\" in name or "\x00" in name:
            return _text(400, f"bad target path {name!r}")
        file = repo.target_file(name)
        what, content_type = f"no target {name}", b"application/octet-stream"
    else:
        return _text(404, f"not found: {path}")
    if file is None:
        return _text(404, what)
    try:
        return _file_reply(file, content_type, range_header)
    except FileNotFoundError:  # removed (housekeeping) since the lookup
        return _text(404, what)


def _read_chunk(fd: int, size: int, offset: int) -> bytes:
    """One chunk of a file body; called in a worker thread (asyncio.to_thread), never on the loop."""
    return os.pread(fd, size, offset)


async def _open(path: Path) -> int:
    """`path` opened read-only in a worker thread; a cancelled open still closes the descriptor it made."""
    opening = asyncio.ensure_future(asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(
            lambda t: None if t.cancelled() or t.exception() is not None else os.close(t.result()))
        raise


async def _send(writer: asyncio.StreamWriter, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), SEND_TIMEOUT)  # TimeoutError: the peer stopped reading


async def _respond(writer: asyncio.StreamWriter, conn: h11.Connection, reply: _Reply, head_only: bool,
                   fd: int | None = None) -> None:
    """Send `reply`; a file body is read from `fd` (opened by the caller before anything was sent)."""
    headers = [(b"content-type", reply.content_type), (b"content-length", str(reply.length).encode()),
               (b"cache-control", b"no-store"), *reply.extra]
    await _send(writer, conn, h11.Response(status_code=reply.status, headers=headers))
    if not head_only:
        if reply.file is None:
            if reply.body:
                await _send(writer, conn, h11.Data(data=reply.body))
        else:
            assert fd is not None
            offset, left = reply.start, reply.length
            while left > 0:
                chunk = await asyncio.to_thread(_read_chunk, fd, min(_CHUNK, left), offset)
                if not chunk:  # the file shrank under us: h11 refuses a short body, the connection ends
                    break
                offset += len(chunk)
                left -= len(chunk)
                await _send(writer, conn, h11.Data(data=chunk))
    await _send(writer, conn, h11.EndOfMessage())


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes, agent_id: str | None,
                status_lookup: StatusLookup, repo: TufRepo | None, peer: str) -> str:
    """Serve HTTP requests on this connection until either side closes it; returns why it ended."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    conn.receive_data(first)
    served = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + IDLE_TIMEOUT  # for the whole next request: dribbling bytes does not extend it
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                try:
                    await _respond(writer, conn, _text(exc.error_status_hint, f"bad request: {exc}"), False)
                except h11.LocalProtocolError:
                    pass
            log_event(_log, logging.WARNING, "repohttp.bad_request", peer=peer, agent=agent_id, reason=str(exc))
            return f"bad HTTP request: {exc}"
        if event is h11.NEED_DATA:
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return f"HTTP request not received within {IDLE_TIMEOUT:g} s"
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return f"HTTP connection closed after {served} requests"
        if isinstance(event, h11.Request):
            served += 1
            headers = dict(event.headers)
            head_only = event.method == b"HEAD"
            if len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers) > MAX_REQUEST_BYTES:
                reply = _text(431, f"the request line and headers are over {MAX_REQUEST_BYTES} bytes")
                conn_keep = False
            elif headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers:
                reply = _text(400, "a request body is not allowed here")
                conn_keep = False
            else:
                status = None if agent_id is None else status_lookup(agent_id)
                if status != "active":
                    reply = _text(403, "forbidden: the TUF repository is served to active agents only (this "
                                  + ("connection has no agent certificate)" if agent_id is None else
                                     f"agent is {status or 'unknown'})"))
                    log_event(_log, logging.WARNING, "repohttp.forbidden", peer=peer, agent=agent_id,
                              status=status)
                    conn_keep = False  # such a peer holds no connection open
                else:
                    reply = route(repo, event.method, event.target, headers.get(b"range"))
                    conn_keep = served < MAX_REQUESTS
            fd = None
            if reply.file is not None and not head_only:
                try:
                    fd = await _open(reply.file)
                except FileNotFoundError:  # removed (housekeeping) since the lookup
                    reply = _text(404, f"not found: {event.target.decode('ascii', 'replace')}")
            if not conn_keep:
                reply.extra.append((b"connection", b"close"))
            try:
                await _respond(writer, conn, reply, head_only, fd)
            except TimeoutError:
                return f"HTTP answer not read within {SEND_TIMEOUT:g} s"
            finally:
                if fd is not None:
                    os.close(fd)
            log_event(_log, logging.DEBUG, "repohttp.request", peer=peer, agent=agent_id,
                      method=event.method.decode("ascii", "replace"), target=event.target.decode("ascii", "replace"),
                      status=reply.status)
            if not conn_keep:
                return (f"HTTP connection closed after {served} requests (the most per connection)"
                        if served >= MAX_REQUESTS else f"HTTP request refused ({reply.status})")
            continue
        if isinstance(event, h11.EndOfMessage):
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return f"HTTP connection closed after {served} requests"
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                deadline = loop.time() + IDLE_TIMEOUT
            continue
        # h11.Data: a body we refuse anyway; nothing to do with it
