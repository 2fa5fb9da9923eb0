"""One agent connection: framing, handshake, heartbeats, and the calls in flight to that agent.

Frames are handled synchronously as they are split out of each read, so a burst of replies costs one wakeup; every
message is written with a single `transport.write`. A protocol violation gets one error response with `"id": null`
and closes this connection only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from pyagent.endpoint._framing import FrameSplitter
from pyagent.endpoint._log import log_event, log_exception
from pyagent.endpoint._net import peer_name
from pyagent.endpoint._params import Heartbeat, parse_heartbeat, parse_hello
from pyagent.endpoint._registry import AgentInfo
from pyagent.protocol import (
    ENROLLMENT_PENDING,
    AGENT_UNAVAILABLE,
    RATE_LIMITED,
    FRAME_TOO_LARGE,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    TIMEOUT,
    UNAUTHORIZED,
    VERSION,
    ProtocolError,
    RemoteError,
    decode,
    encode,
    error_response,
    response,
    validate_message,
)

_log = logging.getLogger("pyagent.endpoint.session")
_READ_SIZE = 256 * 1024


@dataclass(frozen=True)
class SessionSettings:
    agent_token: bytes  # empty: the shared-token development path is off (the default)
    heartbeat_interval: float
    handshake_timeout: float
    max_frame_bytes: int
    tls_handshake_timeout: float = 10.0
    max_in_flight: int = 1024
    rate: float = 50.0  # requests per second from one agent (token bucket refill)
    rate_burst: int = 200
    max_connections: int = 10000
    max_enroll_requests: int = 4  # per connection, before the hello

    @property
    def idle_timeout(self) -> float:
        return 1.5 * self.heartbeat_interval

    @property
    def heartbeat_interval_json(self) -> int | float:
        """Whole seconds as a JSON integer, so that a C peer may read it either way."""
        value = self.heartbeat_interval
        return int(value) if float(value).is_integer() else value


class SessionOwner(Protocol):
    """What a session needs from the server that accepted it."""

    settings: SessionSettings

    def on_hello(self, session: AgentSession, info: AgentInfo) -> None: ...
    def on_heartbeat(self, session: AgentSession, heartbeat: Heartbeat, now_ms: int) -> None: ...
    def on_closed(self, session: AgentSession, reason: str) -> None: ...
    def on_crash(self, session: AgentSession, msg_id: int | None, method: str, params: dict[str, Any]) -> None: ...
    def on_events(self, session: AgentSession, params: dict[str, Any]) -> dict[str, Any]: ...
    def on_agent_request(self, session: AgentSession, msg_id: int, method: str, params: dict[str, Any]) -> None: ...
    def agent_status(self, agent_id: str) -> str | None: ...
    async def serve_http(self, session: AgentSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         first: bytes) -> str: ...
    def enroll(self, session: AgentSession, method: str, params: dict[str, Any]) -> dict[str, Any]: ...
    def allow_request(self, session: AgentSession) -> float: ...
    def count(self, counter: str) -> None: ...


def now_ms() -> int:
    return int(time.time() * 1000)


def _expire(fut: asyncio.Future[Any], timeout: float) -> None:
    if not fut.done():
        fut.set_exception(RemoteError(TIMEOUT, f"no reply from the agent within {timeout:g} s"))


class AgentSession:
    """A TLS connection from one agent. `run()` serves it until it closes; `call()` sends a `bundle.call`."""

    def __init__(self, owner: SessionOwner, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 cert_agent_id: str | None = None) -> None:
        self._owner = owner
        # The agent id the client certificate names (mutual TLS), or None for a connection without one (enrollment).
        self.cert_agent_id = cert_agent_id
        self._enroll_requests = 0
        self._settings = owner.settings
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._loop = asyncio.get_running_loop()
        self.peer = peer_name(writer.get_extra_info("peername"))
        self.agent_id: str | None = None
        self.name: str | None = None
        self._splitter = FrameSplitter(self._settings.max_frame_bytes)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._closing = False
        self._close_reason = ""
        self._last_rx = self._loop.time()
        self._deadline = self._last_rx + self._settings.handshake_timeout
        self._watchdog: asyncio.TimerHandle | None = None
        # Requests queued during one loop iteration leave in one write: one TLS record, one send().
        self._outbox: list[bytes] = []

    def __repr__(self) -> str:
        return f"<AgentSession {self.agent_id or '(no hello)'} {self.peer}>"

    @property
    def is_open(self) -> bool:
        return not self._closing

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # -- life cycle -------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it is closed by either side; never raises (except on cancellation)."""
        log_event(_log, logging.DEBUG, "session.opened", peer=self.peer)
        self._watchdog = self._loop.call_at(self._deadline, self._on_watchdog)
        reason = "closed"
        try:
            reason = await self._read_loop()
        except (ConnectionError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # a bug: log it, close this connection, keep serving the others
            log_exception(_log, "session.failed", peer=self.peer, agent=self.agent_id)
            reason = f"internal error: {type(exc).__name__}"
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
            if not self._closing:
                self._closing = True
                self._close_reason = reason
            self._fail_pending()
            self._owner.on_closed(self, self._close_reason)
            self._writer.close()
        try:
            await self._writer.wait_closed()
        except Exception:  # the peer may reset the connection while TLS shuts down; nothing left to do
            pass

    def close(self, reason: str) -> None:
        """Close gracefully (queued writes are flushed first); calls in flight fail with agent_unavailable."""
        if self._closing:
            return
        self._closing = True
        self._close_reason = reason
        self._fail_pending()
        self._writer.close()

    def abort(self) -> None:
        """Drop the connection now (used when a graceful close takes too long)."""
        self._closing = True
        self._transport.abort()

    def _fail_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        error = RemoteError(AGENT_UNAVAILABLE, f"the session to agent {self.agent_id} closed before it replied "
                                               f"({self._close_reason})")
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(error)

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self._closing:
            return
        now = self._loop.time()
        if self.agent_id is None:
            if now >= self._deadline:
                self._owner.count("handshake_timeout")
                log_event(_log, logging.WARNING, "handshake.timeout", peer=self.peer,
                          timeout=self._settings.handshake_timeout)
                self.close("no handshake.hello in time")
                return
            deadline = self._deadline
        else:
            deadline = self._last_rx + self._settings.idle_timeout
            if now >= deadline:
                log_event(_log, logging.WARNING, "session.idle", agent=self.agent_id, peer=self.peer,
                          idle_s=round(now - self._last_rx, 3))
                self.close(f"received nothing for {self._settings.idle_timeout:g} s")
                return
        self._watchdog = self._loop.call_at(deadline, self._on_watchdog)

    # -- receiving --------------------------------------------------------------------------------------------

    async def _read_loop(self) -> str:
        read = self._reader.read
        splitter = self._splitter
        on_frame = self._on_frame
        loop_time = self._loop.time
        data = await read(_READ_SIZE)
        if data[:4] == b"GET " or data[:5] == b"HEAD ":  # the TUF repository over HTTP (`_repohttp.py`)
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            return await self._owner.serve_http(self, self._reader, self._writer, data)
        while True:
            if not data:
                return "closed by the agent"
            self._last_rx = loop_time()
            for frame in splitter.feed(data):
                on_frame(frame)
                if self._closing:
                    return self._close_reason
            if splitter.overflow:
                limit = splitter.limit
                self._owner.count("frame_too_large")
                self._refuse(FRAME_TOO_LARGE, f"frame too large: over the limit of {limit} bytes", {"limit": limit})
            if self._closing:
                return self._close_reason
            data = await read(_READ_SIZE)

    def _on_frame(self, frame: bytes) -> None:
        try:
            msg = decode(frame)
        except ValueError as exc:
            self._refuse(PARSE_ERROR, f"parse error: the frame is not valid JSON ({exc})")
            return
        try:
            validate_message(msg)
        except ProtocolError as exc:
            self._refuse(exc.code, exc.message, exc.data)
            return
        if "method" in msg:
            self._on_request(msg)
        else:
            self._on_response(msg)

    def _on_response(self, msg: dict[str, Any]) -> None:
        if self.agent_id is None:
            self._refuse(INVALID_REQUEST, "handshake required: the first message must be handshake.hello")
            return
        msg_id = msg["id"]
        fut = self._pending.pop(msg_id, None) if isinstance(msg_id, int) else None
        if fut is None:
            if msg_id is None and "error" in msg:
                # The agent refused something we sent; it closes the connection next.
                error = msg["error"] if isinstance(msg["error"], dict) else {}
                log_event(_log, logging.WARNING, "agent.refused", agent=self.agent_id, peer=self.peer,
                          code=error.get("code"), reason=error.get("message"))
            else:
                log_event(_log, logging.DEBUG, "response.unmatched", agent=self.agent_id, id=repr(msg_id))
            return
        if fut.done():
            return
        if "error" in msg:
            fut.set_exception(RemoteError.from_error(msg["error"]))
        else:
            fut.set_result(msg["result"])

    def _on_request(self, msg: dict[str, Any]) -> None:
        method: str = msg["method"]
        msg_id: int | None = msg.get("id")
        params: dict[str, Any] = msg.get("params") or {}
        if self.agent_id is None:
            if method == "enroll.request" and msg_id is not None:
                self._on_enroll(msg_id, method, params)
            elif method != "handshake.hello":
                self._refuse(INVALID_REQUEST, f"handshake required: got {method!r} before handshake.hello",
                             msg_id=msg_id, event="handshake.refused")
            elif msg_id is None:
                self._refuse(INVALID_REQUEST, "handshake.hello must be a request with an 'id'",
                             event="handshake.refused")
            else:
                self._on_hello(msg_id, params)
            return
        if method == "heartbeat.post":
            self._on_heartbeat(msg_id, params)
            return
        retry_after = self._owner.allow_request(self)
        if retry_after > 0:
            self._owner.count("rate_limited")
            if msg_id is not None:
                self._send(error_response(msg_id, RATE_LIMITED, f"rate limited: too many requests from agent "
                                          f"{self.agent_id}; retry after {retry_after:.3g} s",
                                          {"retry_after": round(retry_after, 3)}))
            return
        if method.startswith("crash."):  # crash report uploads (`_crashes.py`); replies may come later
            self._owner.on_crash(self, msg_id, method, params)
            return
        if msg_id is None:
            log_event(_log, logging.DEBUG, "notification.ignored", agent=self.agent_id, method=method)
        elif method == "handshake.hello":
            self._send(error_response(msg_id, INVALID_REQUEST, "handshake already done on this connection"))
        elif method == "event.batch":
            try:
                self._send(response(msg_id, self._owner.on_events(self, params)))
            except (ProtocolError, RemoteError) as exc:
                self._send(error_response(msg_id, exc.code, exc.message, exc.data))
        elif method in ("registry.discover", "agent.call"):  # `_discovery.py`; an agent.call is answered later
            self._owner.on_agent_request(self, msg_id, method, params)
        elif method == "enroll.renew":
            if self.cert_agent_id is None:
                self._send(error_response(msg_id, UNAUTHORIZED, "unauthorized: enroll.renew needs a session "
                                          "authenticated with the agent's certificate"))
            else:
                self._on_enroll(msg_id, method, params)
        else:
            self._send(error_response(msg_id, METHOD_NOT_FOUND, f"method not found: the endpoint has no {method!r}"))

    def _on_enroll(self, msg_id: int, method: str, params: dict[str, Any]) -> None:
        self._enroll_requests += 1
        if self.agent_id is None and self._enroll_requests > self._settings.max_enroll_requests:
            self._refuse(RATE_LIMITED, f"rate limited: more than {self._settings.max_enroll_requests} enrollment "
                         "requests on one connection", {"retry_after": 5}, msg_id=msg_id, event="enroll.refused")
            return
        try:
            result = self._owner.enroll(self, method, params)
        except RemoteError as exc:
            self._owner.count("enroll_refused")
            level = logging.INFO if exc.code == ENROLLMENT_PENDING else logging.WARNING
            log_event(_log, level, "enroll.refused", peer=self.peer, agent=self.agent_id, method=method,
                      code=exc.code, reason=exc.message)
            self._send(error_response(msg_id, exc.code, exc.message, exc.data))
            return
        self._send(response(msg_id, result))

    def _authenticate(self, params: dict[str, Any]) -> str | None:
        """Why this hello is refused (unauthorized), or None. Identity comes from the client certificate."""
        claimed = params.get("agent_id")
        if self.cert_agent_id is not None:
            if claimed != self.cert_agent_id:
                return (f"unauthorized: the client certificate is for agent {self.cert_agent_id} but the hello "
                        f"claims agent_id {claimed!r}")
            # The CA signature proves an endpoint of this deployment enrolled the agent; the registry keeps what
            # operators decided since (an agent unknown here enrolled with another endpoint sharing the CA).
            status = self._owner.agent_status(self.cert_agent_id)
            if status not in (None, "active"):
                return f"unauthorized: agent {self.cert_agent_id} is {status}"
            return None
        if not self._settings.agent_token:
            return ("unauthorized: no client certificate; this endpoint accepts only enrolled agents (mutual TLS): "
                    "give the agent an enrollment token (`pyagent token create`)")
        token = params.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8"), self._settings.agent_token):
            return "unauthorized: bad or missing agent token" if token else "unauthorized: missing agent token"
        if isinstance(claimed, str) and self._owner.agent_status(claimed) in ("revoked", "rejected", "pending"):
            return f"unauthorized: agent {claimed} is {self._owner.agent_status(claimed)}"
        return None

    def _on_hello(self, msg_id: int, params: dict[str, Any]) -> None:
        problem = self._authenticate(params)
        if problem is not None:
            self._owner.count("handshake_refused")
            self._refuse(UNAUTHORIZED, problem, msg_id=msg_id, event="handshake.refused")
            return
        try:
            info = parse_hello(params)
        except ProtocolError as exc:
            self._owner.count("handshake_refused")
            self._refuse(exc.code, exc.message, exc.data, msg_id=msg_id, event="handshake.refused")
            return
        self.agent_id = info.agent_id
        self.name = info.name
        self._owner.on_hello(self, info)
        self._send(response(msg_id, {
            "agent_id": info.agent_id,
            "heartbeat_interval": self._settings.heartbeat_interval_json,
            "endpoint_time": now_ms(),
        }))
        log_event(_log, logging.INFO, "session.started", agent=info.agent_id, name=info.name, peer=self.peer,
                  host_version=info.host_version, bundles=",".join(str(b.get("name")) for b in info.bundles))
        # From now on the watchdog enforces the idle timeout.
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_at(self._last_rx + self._settings.idle_timeout, self._on_watchdog)

    def _on_heartbeat(self, msg_id: int | None, params: dict[str, Any]) -> None:
        try:
            heartbeat = parse_heartbeat(params)
        except ProtocolError as exc:
            if msg_id is not None:
                self._send(error_response(msg_id, exc.code, exc.message, exc.data))
            return
        now = now_ms()
        if msg_id is not None:
            self._send(response(msg_id, {"timestamp": now}))
        self._owner.on_heartbeat(self, heartbeat, now)

    # -- sending ----------------------------------------------------------------------------------------------

    def _send(self, msg: dict[str, Any]) -> None:
        if not self._closing:
            self._transport.write(encode(msg) + b"\n")

    def _flush_outbox(self) -> None:
        outbox, self._outbox = self._outbox, []
        if outbox and not self._closing:
            self._transport.write(b"".join(outbox))

    def send_response(self, msg_id: int, result: Any) -> None:
        """Answer a request of the agent (handlers that reply later, e.g. `crash.end`)."""
        self._send(response(msg_id, result))

    def send_error(self, msg_id: int, code: int, message: str, data: Any = None) -> None:
        self._send(error_response(msg_id, code, message, data))

    def refuse(self, code: int, message: str, event: str) -> None:
        """Tell the agent why the endpoint is closing its session (e.g. it was revoked), then close."""
        self._refuse(code, message, event=event)

    def _refuse(self, code: int, message: str, data: Any = None, *, msg_id: int | None = None,
                event: str = "frame.refused") -> None:
        """Answer a violation with one error response, log it, close the connection."""
        log_event(_log, logging.WARNING, event, peer=self.peer, agent=self.agent_id, code=code, reason=message)
        self._send(error_response(msg_id, code, message, data))
        self.close(message)

    async def call(self, obj: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        """Send `bundle.call` and wait for the reply; raises RemoteError (the agent's, or timeout/unavailable)."""
        return await self.request("bundle.call", {"agent": obj, "method": method, "params": params}, timeout)

    async def request(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        """Send any request (e.g. `agent.status`) and wait for the reply; raises RemoteError."""
        if self._closing:
            raise RemoteError(AGENT_UNAVAILABLE, f"agent {self.agent_id} is not connected")
        limit_calls = self._settings.max_in_flight
        if len(self._pending) >= limit_calls:
            self._owner.count("in_flight_refused")
            raise RemoteError(RATE_LIMITED, f"rate limited: {limit_calls} calls already in flight to agent "
                              f"{self.agent_id}", {"retry_after": 1})
        msg_id = self._next_id
        self._next_id = msg_id + 1
        try:
            data = encode({"v": VERSION, "id": msg_id, "method": method, "params": params})
        except (TypeError, ValueError) as exc:
            raise RemoteError(INVALID_PARAMS, f"params cannot be sent as JSON: {exc}") from None
        limit = self._settings.max_frame_bytes
        if len(data) > limit:
            raise RemoteError(FRAME_TOO_LARGE, f"the call is {len(data)} bytes, over the frame limit of {limit}",
                              {"limit": limit})
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[msg_id] = fut
        outbox = self._outbox
        if not outbox:
            self._loop.call_soon(self._flush_outbox)
        outbox.append(data)
        outbox.append(b"\n")
        timer = self._loop.call_later(timeout, _expire, fut, timeout)
        try:
            return await fut
        finally:
            timer.cancel()
            self._pending.pop(msg_id, None)
