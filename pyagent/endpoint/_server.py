"""The TLS server agents dial: accepts connections, keeps the live sessions by agent id and name, routes calls."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from pyagent.endpoint._log import log_event
from pyagent.endpoint._net import bind_listeners, peer_name
from pyagent.endpoint._params import Heartbeat
from pyagent.endpoint._registry import AgentInfo, Registry
from pyagent.endpoint._session import AgentSession, SessionSettings, now_ms
from pyagent.endpoint._crashes import CrashStore
from pyagent.endpoint._events import EventHub
from pyagent.endpoint._discovery import AgentRequests
from pyagent.endpoint._targets import AgentView
from pyagent.endpoint import _repohttp
from pyagent.endpoint._tufrepo import TufRepo
from pyagent.protocol import AGENT_UNAVAILABLE, INVALID_PARAMS, METHOD_NOT_FOUND, UNAUTHORIZED, RemoteError

_log = logging.getLogger("pyagent.endpoint.server")

# A TLS close waits this long for the agent's close_notify before dropping the connection.
_TLS_SHUTDOWN_TIMEOUT = 2.0
# Refusals of connections over the limit are logged at most this often (the counter counts them all).
_REFUSAL_LOG_INTERVAL = 1.0

COUNTERS = ("connections_accepted", "connections_refused", "tls_failed", "handshake_timeout", "handshake_refused",
            "frame_too_large", "rate_limited", "in_flight_refused", "enroll_refused", "sessions_revoked")
EnrollHandler = Callable[[str, dict[str, Any], str, "str | None"], dict[str, Any]]
StatusLookup = Callable[[str], "str | None"]


def cert_agent_id(peercert: Any) -> str | None:
    """The agent id a verified client certificate names (its subject commonName), or None without one."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and isinstance(value, str) and value:
                return value
    return None


class _Bucket:
    """Token bucket: `rate` requests per second, bursts up to `burst`."""

    __slots__ = ("tokens", "stamp")

    def __init__(self, burst: int) -> None:
        self.tokens = float(burst)
        self.stamp = time.monotonic()


class AgentServer:
    """Owns the listening sockets and every agent session; implements the sessions' `SessionOwner`."""

    def __init__(self, settings: SessionSettings, registry: Registry, ssl_context: ssl.SSLContext,
                 enroll_handler: EnrollHandler | None = None, status_lookup: StatusLookup | None = None) -> None:
        self.settings = settings
        self._registry = registry
        self._ssl = ssl_context
        self._enroll_handler = enroll_handler
        self._status_lookup = status_lookup
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._open_connections = 0
        self._last_refusal_log = 0.0
        self._buckets: dict[str, _Bucket] = {}
        self._closing = False
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[AgentSession] = set()
        self._by_id: dict[str, AgentSession] = {}
        self._by_name: dict[str, dict[str, AgentSession]] = {}
        self._views: dict[str, AgentView] = {}  # agent_id -> what its hello said, while connected
        self.events: EventHub | None = None  # set by the Endpoint: where `event.batch` goes
        self.crashes: CrashStore | None = None  # set by the Endpoint: where `crash.*` uploads go
        self.agent_requests: AgentRequests | None = None  # set by the Endpoint: registry.discover, agent.call
        self.repo: TufRepo | None = None  # set by the Endpoint: the TUF repository served over HTTP
        self.on_connected: Callable[[str], None] | None = None  # set by the Endpoint: rollouts (must not block)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0: any free port); returns the bound port."""
        sockets = bind_listeners(host, port)
        self.port = sockets[0].getsockname()[1]
        try:
            for sock in sockets:
                # Plain TCP first: the TLS handshake runs in `_serve`, so that its failures (no or bad client
                # certificate, expired, another CA, too slow) are logged with their reason and counted.
                server = await asyncio.start_server(self._on_connect, sock=sock,
                                                    limit=self.settings.max_frame_bytes + 1)
                self._servers.append(server)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return self.port

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        limit = self.settings.max_connections
        if self._open_connections >= limit:
            self.counters["connections_refused"] += 1
            now = time.monotonic()
            if now - self._last_refusal_log >= _REFUSAL_LOG_INTERVAL:
                self._last_refusal_log = now
                log_event(_log, logging.WARNING, "connection.refused", peer=peer_name(writer.get_extra_info("peername")),
                          reason=f"max_connections ({limit}) reached", refused_total=self.counters["connections_refused"])
            writer.transport.abort()
            return
        self._open_connections += 1
        self.counters["connections_accepted"] += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                await writer.start_tls(self._ssl, ssl_handshake_timeout=self.settings.tls_handshake_timeout)
            except Exception as exc:  # any failure of one handshake ends that connection only
                self.counters["tls_failed"] += 1
                reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc)
                if isinstance(exc, (TimeoutError, ConnectionAbortedError)) and "longer than" in str(exc):
                    reason = f"TLS handshake deadline ({self.settings.tls_handshake_timeout:g} s) passed"
                log_event(_log, logging.WARNING, "tls.failed", peer=peer_name(writer.get_extra_info("peername")),
                          reason=str(reason) or type(exc).__name__, error=type(exc).__name__)
                writer.transport.abort()
                return
            ssl_object = writer.get_extra_info("ssl_object")
            session = AgentSession(self, reader, writer,
                                   cert_agent_id(ssl_object.getpeercert() if ssl_object is not None else None))
            self._sessions.add(session)
            await session.run()
        finally:
            self._open_connections -= 1

    async def close(self, grace: float = 1.0) -> None:
        """Stop listening, close every session, wait up to `grace` seconds, then drop what is left."""
        self._closing = True
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            session.close("endpoint shutting down")
        if self._tasks:
            _, still_running = await asyncio.wait(set(self._tasks), timeout=grace)
            if still_running:
                for session in list(self._sessions):
                    session.abort()
                for task in still_running:  # connections still in their TLS handshake
                    task.cancel()
                await asyncio.wait(still_running, timeout=grace)
        for server in self._servers:
            # Python >= 3.12 also waits here for connections still in their TLS handshake: bounded.
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=grace)
            except TimeoutError:
                pass
        self._servers.clear()

    # -- SessionOwner -----------------------------------------------------------------------------------------

    def on_hello(self, session: AgentSession, info: AgentInfo) -> None:
        old = self._by_id.get(info.agent_id)
        if old is not None and old is not session:
            log_event(_log, logging.WARNING, "session.replaced", agent=info.agent_id, old_peer=old.peer,
                      new_peer=session.peer)
            self._unindex(old)
            old.close(f"replaced by a new session from {session.peer}")
        self._by_id[info.agent_id] = session
        self._by_name.setdefault(info.name, {})[info.agent_id] = session
        self._views[info.agent_id] = AgentView(info.agent_id, info.name, info.platform.get("hostname", ""),
                                               dict(info.labels), tuple(info.capabilities))
        self._registry.upsert_hello(info, session.peer, now_ms())
        if self.on_connected is not None:
            self.on_connected(info.agent_id)

    def on_heartbeat(self, session: AgentSession, heartbeat: Heartbeat, now: int) -> None:
        if session.agent_id is not None:
            self._registry.heartbeat(session.agent_id, now, heartbeat.rtt_ms, heartbeat.skew_ms, heartbeat.py_lag_ms)

    def on_closed(self, session: AgentSession, reason: str) -> None:
        self._sessions.discard(session)
        if session.agent_id is None:
            log_event(_log, logging.DEBUG, "session.closed", peer=session.peer, reason=reason)
            return
        if self._by_id.get(session.agent_id) is session:
            self._unindex(session)
            self._registry.set_disconnected(session.agent_id, now_ms())
        log_event(_log, logging.INFO, "session.closed", agent=session.agent_id, peer=session.peer, reason=reason)

    def on_events(self, session: AgentSession, params: dict[str, Any]) -> dict[str, Any]:
        view = self._views.get(session.agent_id or "")
        if self.events is None or view is None:
            raise RemoteError(METHOD_NOT_FOUND, "method not found: this endpoint does not store events")
        return self.events.store_batch(view, params)

    def on_crash(self, session: AgentSession, msg_id: int | None, method: str, params: dict[str, Any]) -> None:
        if self.crashes is None:
            if msg_id is not None:
                session.send_error(msg_id, METHOD_NOT_FOUND, "method not found: this endpoint does not store crash "
                                   "reports")
            return
        self.crashes.handle(session, msg_id, method, params)

    def on_agent_request(self, session: AgentSession, msg_id: int, method: str, params: dict[str, Any]) -> None:
        if self.agent_requests is None:
            session.send_error(msg_id, METHOD_NOT_FOUND, f"method not found: this endpoint does not serve {method}")
            return
        self.agent_requests.handle(session, msg_id, method, params)

    def agent_status(self, agent_id: str) -> str | None:
        return None if self._status_lookup is None else self._status_lookup(agent_id)

    async def serve_http(self, session: AgentSession, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         first: bytes) -> str:
        return await _repohttp.serve(reader, writer, first, session.cert_agent_id, self.agent_status, self.repo,
                                     session.peer)

    def enroll(self, session: AgentSession, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if self._enroll_handler is None:
            raise RemoteError(UNAUTHORIZED, "unauthorized: this endpoint does not enroll agents")
        return self._enroll_handler(method, params, session.peer, session.cert_agent_id)

    def allow_request(self, session: AgentSession) -> float:
        """0 when the agent may make one more request now, else the seconds until it may."""
        key = session.agent_id or session.peer
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.settings.rate_burst)
        now = time.monotonic()
        bucket.tokens = min(float(self.settings.rate_burst), bucket.tokens + (now - bucket.stamp) * self.settings.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.settings.rate

    def count(self, counter: str) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + 1

    def drop(self, agent_id: str, reason: str) -> bool:
        """Close the live session of this agent at once, telling it why (used by revocation)."""
        session = self._by_id.get(agent_id)
        if session is None:
            return False
        self.counters["sessions_revoked"] += 1
        session.refuse(UNAUTHORIZED, reason, event="session.revoked")
        return True

    @property
    def open_connections(self) -> int:
        return self._open_connections

    def _unindex(self, session: AgentSession) -> None:
        assert session.agent_id is not None and session.name is not None
        if self._by_id.get(session.agent_id) is session:
            del self._by_id[session.agent_id]
            self._views.pop(session.agent_id, None)
        named = self._by_name.get(session.name)
        if named is not None and named.get(session.agent_id) is session:
            del named[session.agent_id]
            if not named:
                del self._by_name[session.name]

    # -- routing ----------------------------------------------------------------------------------------------

    @property
    def connected(self) -> int:
        return len(self._by_id)

    def session_for(self, target: str) -> AgentSession:
        """The live session of the agent with this id, else of the one agent with this name."""
        session = self._by_id.get(target)
        if session is not None:
            return session
        named = self._by_name.get(target)
        if named:
            if len(named) == 1:
                return next(iter(named.values()))
            raise RemoteError(INVALID_PARAMS, f"target {target!r} names {len(named)} connected agents; "
                                              "use an agent id", {"agents": sorted(named)})
        if self._registry.get_agent(target) is not None:
            raise RemoteError(AGENT_UNAVAILABLE, f"agent {target!r} is not connected")
        raise RemoteError(AGENT_UNAVAILABLE, f"no agent with id or name {target!r}")

    async def call(self, target: str, obj: str, method: str, params: dict[str, Any], timeout: float) -> Any:
        return await self.session_for(target).call(obj, method, params, timeout)

    def session_of(self, agent_id: str) -> AgentSession | None:
        """The live session of this agent id, or None."""
        return self._by_id.get(agent_id)
