"""The TLS server agents dial: accepts connections, keeps the live sessions by agent id and name, routes calls."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from pyagent.endpoint._log import log_event
from pyagent.endpoint._net import bind_listeners
from pyagent.endpoint._params import Heartbeat
from pyagent.endpoint._registry import AgentInfo, Registry
from pyagent.endpoint._session import AgentSession, SessionSettings, now_ms
from pyagent.protocol import AGENT_UNAVAILABLE, INVALID_PARAMS, RemoteError

_log = logging.getLogger("pyagent.endpoint.server")

# A TLS close waits this long for the agent's close_notify before dropping the connection.
_TLS_SHUTDOWN_TIMEOUT = 2.0


class AgentServer:
    """Owns the listening sockets and every agent session; implements the sessions' `SessionOwner`."""

    def __init__(self, settings: SessionSettings, registry: Registry, ssl_context: ssl.SSLContext) -> None:
        self.settings = settings
        self._registry = registry
        self._ssl = ssl_context
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[AgentSession] = set()
        self._by_id: dict[str, AgentSession] = {}
        self._by_name: dict[str, dict[str, AgentSession]] = {}
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0: any free port); returns the bound port."""
        sockets = bind_listeners(host, port)
        self.port = sockets[0].getsockname()[1]
        try:
            for sock in sockets:
                server = await asyncio.start_server(
                    self._on_connect, sock=sock, ssl=self._ssl, limit=self.settings.max_frame_bytes + 1,
                    ssl_handshake_timeout=self.settings.handshake_timeout,
                    ssl_shutdown_timeout=_TLS_SHUTDOWN_TIMEOUT,
                )
                self._servers.append(server)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return self.port

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = AgentSession(self, reader, writer)
        self._sessions.add(session)
        task = asyncio.get_running_loop().create_task(session.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace: float = 1.0) -> None:
        """Stop listening, close every session, wait up to `grace` seconds, then drop what is left."""
        for server in self._servers:
            server.close()
        for session in list(self._sessions):
            session.close("endpoint shutting down")
        if self._tasks:
            _, still_running = await asyncio.wait(set(self._tasks), timeout=grace)
            if still_running:
                for session in list(self._sessions):
                    session.abort()
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
        self._registry.upsert_hello(info, session.peer, now_ms())

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

    def _unindex(self, session: AgentSession) -> None:
        assert session.agent_id is not None and session.name is not None
        if self._by_id.get(session.agent_id) is session:
            del self._by_id[session.agent_id]
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
