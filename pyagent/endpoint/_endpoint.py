"""`Endpoint`: the state directory, the registry, the agent TLS server and the operator API, in one asyncio loop."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import pyagent
from pyagent.endpoint._api import DEFAULT_CALL_TIMEOUT, ApiServer, create_app
from pyagent.endpoint._config import EndpointConfig, format_address
from pyagent.endpoint._enroll import Enroller, TokenStore
from pyagent.endpoint._errors import EndpointError
from pyagent.endpoint._crashes import CrashStore
from pyagent.endpoint._discovery import AgentRequests
from pyagent.endpoint._events import EventHub
from pyagent.endpoint._targets import DEFAULT_CONCURRENCY, AgentView, Selector, TargetError, fan_out, views_from_db
from pyagent.endpoint._log import log_event
from pyagent.endpoint._net import dial_host
from pyagent.endpoint._registry import AgentRecord, Registry
from pyagent.endpoint._rollouts import RolloutManager
from pyagent.endpoint._updates import UpdateStore
from pyagent.endpoint._server import AgentServer
from pyagent.endpoint._session import SessionSettings
from pyagent.endpoint._tufrepo import Expiry, RepoError, TufRepo, open_or_create
from pyagent.endpoint._state import State, StatePaths, prepare_state, server_ssl_context, write_endpoint_json
from pyagent.protocol import AGENT_UNAVAILABLE, INVALID_PARAMS, NOT_ALLOWED, TIMEOUT, UNAUTHORIZED, RemoteError

_log = logging.getLogger("pyagent.endpoint")

# Methods the endpoint sends as requests of their own rather than inside `bundle.call`.
CONTROL_PREFIX = "agent."

# Buffered heartbeats are written to the registry this often (and before every read).
FLUSH_INTERVAL = 1.0


class Endpoint:
    """The controller agents dial.

    Use as `async with Endpoint(config) as ep:` (or `await ep.start()` ... `await ep.aclose()`); after start,
    `listen_address`, `listen_port` and `api_url` report where it really listens (ports may be configured as 0).
    """

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self._state: State | None = None
        self._registry: Registry | None = None
        self._server: AgentServer | None = None
        self._api: ApiServer | None = None
        self._tokens: TokenStore | None = None
        self._enroller: Enroller | None = None
        self._events: EventHub | None = None
        self._crashes: CrashStore | None = None
        self._rollouts: RolloutManager | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._repo: TufRepo | None = None
        self._repo_handle: asyncio.TimerHandle | None = None
        self._closed = asyncio.Event()
        self._closing = False
        self._started = False
        self.listen_port = 0
        self.api_port = 0

    # -- life cycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the state directory, open the registry, listen for agents and operators, write endpoint.json."""
        if self._server is not None:
            raise EndpointError("the endpoint is already started")
        config = self.config
        try:
            self._state = state = prepare_state(config.state_dir, config.listen_host, config.agent_token_file,
                                                allow_shared_token=config.allow_shared_token)
            self._registry = registry = Registry(state.paths.database)
            self._tokens = tokens = TokenStore(registry.db)
            # The token in STATE_DIR/operator-token is the administrator's (whoever can read the state directory).
            tokens.ensure_operator_token(state.operator_token, "state-dir", ("admin",), "STATE_DIR/operator-token")
            assert state.ca is not None
            self._enroller = enroller = Enroller(registry, tokens, state.ca,
                                                 dt.timedelta(days=config.cert_days))
            stale = registry.mark_all_disconnected()
            if stale:
                log_event(_log, logging.INFO, "registry.reset", agents_marked_disconnected=stale)
            settings = SessionSettings(
                agent_token=state.agent_token.encode("utf-8"),
                heartbeat_interval=config.heartbeat_interval,
                handshake_timeout=config.handshake_timeout,
                max_frame_bytes=config.max_frame_bytes,
                tls_handshake_timeout=config.tls_handshake_timeout,
                max_in_flight=config.max_in_flight,
                rate=config.rate,
                rate_burst=config.rate_burst,
                max_connections=config.max_connections,
            )
            self._server = AgentServer(settings, registry, server_ssl_context(state.paths), self._on_enroll,
                                       enroller.status)
            self._events = self._server.events = EventHub(registry.db)
            self._crashes = self._server.crashes = CrashStore(
                registry.db, state.paths.root / "crashes", max_report_bytes=config.crash_max_report_bytes,
                loop_count=config.crash_loop_count, loop_window=config.crash_loop_window)
            self._server.agent_requests = AgentRequests(self, config.agent_call_policy)
            self._repo = self._server.repo = self._open_repo(state.paths.root)
            self._rollouts = rollouts = RolloutManager(self, registry.db, UpdateStore(registry.db), self._crashes)
            self._events.add_listener(rollouts.on_event)
            self._server.on_connected = rollouts.on_hello
            rollouts.start()
            self.listen_port = await self._server.start(config.listen_host, config.listen_port)
            if config.api_enabled:
                self._api = ApiServer(create_app(self, tokens.authenticate_operator,
                                                 max_body_bytes=config.max_frame_bytes))
                self.api_port = await self._api.start(config.api_host, config.api_port)
            self._schedule_flush()
            write_endpoint_json(state.paths, {
                "pid": os.getpid(),
                "listen": self.listen_address,
                "api": self.api_url,
                "ca": str(state.paths.ca_cert),
                "version": pyagent.__version__,
                "shared_token": config.allow_shared_token,
            })
        except BaseException:
            await self.aclose()
            raise
        self._started = True
        log_event(_log, logging.INFO, "endpoint.started", listen=self.listen_address, api=self.api_url,
                  state_dir=str(state.paths.root), heartbeat_interval=config.heartbeat_interval,
                  version=pyagent.__version__)

    async def aclose(self) -> None:
        """Stop listening, close every session, mark agents disconnected, close the registry. Idempotent."""
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            if self._repo_handle is not None:
                self._repo_handle.cancel()
            closers = []
            if self._rollouts is not None:
                await self._rollouts.aclose()
            if self._events is not None:
                self._events.close()
            if self._server is not None:
                closers.append(self._server.close())
            if self._api is not None:
                closers.append(self._api.close())
            await asyncio.gather(*closers)
            if self._registry is not None:
                self._registry.mark_all_disconnected()
                self._registry.close()
            if self._started:
                log_event(_log, logging.INFO, "endpoint.stopped", listen=self.listen_address)
        finally:
            self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Endpoint:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def _schedule_flush(self) -> None:
        self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush)

    def _flush(self) -> None:
        if self._registry is not None and not self._closing:
            self._registry.flush()
            self._schedule_flush()

    # -- the TUF repository (docs/updates.md §1) ---------------------------------------------------------------

    def _open_repo(self, root: Path) -> TufRepo:
        expiry = Expiry(self.config.tuf_timestamp_expiry_s, self.config.tuf_snapshot_expiry_s,
                        self.config.tuf_targets_expiry_s)
        repo, made = open_or_create(root / "tuf", root / "tuf-keys", expiry)
        if any(path.parent == root / "tuf-keys" for path in made):
            log_event(_log, logging.WARNING, "tuf.created", keys=str(root / "tuf-keys"),
                      note="move root.key and targets.key offline and release with `pyagent release ... --keys DIR`")
        repo.refresh()
        self._schedule_repo_refresh()
        return repo

    def _schedule_repo_refresh(self) -> None:
        interval = min(60.0, max(0.5, self.config.tuf_timestamp_expiry_s / 8))
        self._repo_handle = asyncio.get_running_loop().call_later(interval, self._refresh_repo)

    def _refresh_repo(self) -> None:
        if self._repo is None or self._closing:
            return
        try:
            renewed = self._repo.refresh()
        except (OSError, RepoError) as exc:
            log_event(_log, logging.ERROR, "tuf.refresh_failed", reason=str(exc))
        else:
            if renewed:
                log_event(_log, logging.INFO, "tuf.refreshed", roles=",".join(renewed),
                          timestamp_expires=self._repo.timestamp.signed.expires.isoformat())
        self._schedule_repo_refresh()

    @property
    def repo(self) -> TufRepo:
        if self._repo is None or self._closing:
            raise EndpointError("the endpoint is not running")
        return self._repo

    # -- where it listens -------------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        if self._state is None:
            raise EndpointError("the endpoint is not started")
        return self._state

    @property
    def paths(self) -> StatePaths:
        return self.state.paths

    @property
    def listen_address(self) -> str:
        """`host:port` agents dial (the configured host, the bound port)."""
        return format_address(self.config.listen_host, self.listen_port)

    @property
    def api_url(self) -> str | None:
        if self._api is None:
            return None
        return "http://" + format_address(dial_host(self.config.api_host), self.api_port)

    # -- enrollment, tokens, approval and revocation ----------------------------------------------------------

    @property
    def tokens(self) -> TokenStore:
        if self._tokens is None or self._closing:
            raise EndpointError("the endpoint is not running")
        return self._tokens

    def _on_enroll(self, method: str, params: dict[str, Any], peer: str, cert_agent_id: str | None) -> dict[str, Any]:
        if self._enroller is None:
            raise RemoteError(UNAUTHORIZED, "unauthorized: the endpoint is not running")
        if method == "enroll.request":
            return self._enroller.request(params, peer)
        assert cert_agent_id is not None
        return self._enroller.renew(cert_agent_id, params, peer)

    def set_agent_status(self, agent_id: str, status: str) -> str:
        """approve (`active`), `rejected` or `revoked`; a revoked agent's live session is dropped at once.
        Raises KeyError (unknown agent) or ValueError (not possible from its current status)."""
        if self._enroller is None or self._closing:
            raise EndpointError("the endpoint is not running")
        record = self._require_registry().get_agent(agent_id)
        if record is None:
            raise KeyError(agent_id)
        old = self._enroller.set_status(record["agent_id"], status)
        if status == "revoked" and self._server is not None:
            self._server.drop(record["agent_id"], f"unauthorized: agent {record['agent_id']} was revoked by an "
                                                  "operator")
        return old

    def metrics(self) -> dict[str, Any]:
        """Counters of the agent server (refusals by reason, limits hit) and gauges."""
        if self._server is None:
            return {}
        events = {} if self._events is None else {
            "events_stored": self._events.stats.stored, "events_duplicates": self._events.stats.duplicates,
            "events_dropped_by_agents": self._events.stats.dropped_by_agents,
            "events_follower_drops": self._events.stats.follower_drops, "event_followers": self._events.followers}
        return {**self._server.counters, "connections_open": self._server.open_connections,
                "sessions": self._server.connected, **events}

    # -- agents and calls -------------------------------------------------------------------------------------

    def _require_registry(self) -> Registry:
        if self._registry is None or self._closing:
            raise EndpointError("the endpoint is not running")
        return self._registry

    @property
    def registry_db(self) -> Any:
        """The registry's SQLite connection (read by `_discovery.py`)."""
        return self._require_registry().db

    def agents(self) -> list[AgentRecord]:
        """Every agent the registry knows, connected or not."""
        return self._require_registry().list_agents()

    def agent(self, ref: str) -> AgentRecord | None:
        """One agent by id or name, or None."""
        return self._require_registry().get_agent(ref)

    def is_connected(self, target: str) -> bool:
        """Whether `target` (an agent id or name) has a live session."""
        if self._server is None:
            return False
        try:
            self._server.session_for(target)
        except RemoteError:
            return False
        return True

    @property
    def connected_count(self) -> int:
        return 0 if self._server is None else self._server.connected

    async def call(self, target: str, method: str, params: dict[str, Any] | None = None,
                   timeout: float = DEFAULT_CALL_TIMEOUT) -> Any:
        """Call `object.method` on the agent `target` (id or name) and return its result.

        Raises RemoteError: the agent's own error, agent_unavailable (-32003) when the target is unknown, not
        connected or its session is lost while waiting, timeout (-32004), invalid_params (-32602) for a bad method
        name, timeout or params.
        """
        obj, dot, name = method.rpartition(".")
        if not (obj and dot and name):
            raise RemoteError(INVALID_PARAMS, f"method must be 'object.method', got {method!r}")
        if not timeout > 0:
            raise RemoteError(INVALID_PARAMS, f"timeout must be positive, got {timeout!r}")
        if self._server is None or self._closing:
            raise RemoteError(AGENT_UNAVAILABLE, "the endpoint is not running")
        try:
            if method.startswith(CONTROL_PREFIX):  # agent.status, agent.pause, ...: a request of its own
                return await self._server.session_for(target).request(method, {} if params is None else params,
                                                                      timeout)
            return await self._server.call(target, obj, name, {} if params is None else params, timeout)
        except RemoteError as exc:
            if exc.code == NOT_ALLOWED:  # the agent's local allow-list refused it: both sides log the refusal
                log_event(_log, logging.WARNING, "call.not_allowed", agent=target, method=method, reason=exc.message)
            raise

    @property
    def crashes(self) -> CrashStore:
        """Crash reports (`_crashes.py`): listing, groups, `crash_counts(since, version)` for health gates."""
        if self._crashes is None or self._closing:
            raise EndpointError("the endpoint is not running")
        return self._crashes

    @property
    def rollouts(self) -> RolloutManager:
        """Rollouts and per-agent update state and policy (`_rollouts.py`, `_updates.py`)."""
        if self._rollouts is None or self._closing:
            raise EndpointError("the endpoint is not running")
        return self._rollouts

    # -- the agent API: targets, fan-out, interfaces, events --------------------------------------------------

    @property
    def events(self) -> EventHub:
        if self._events is None or self._closing:
            raise EndpointError("the endpoint is not running")
        return self._events

    def select(self, target: str) -> tuple[Selector, list[AgentView]]:
        """Parse `target` (raises TargetError) and return the registry's agents it matches."""
        selector = Selector.parse(target)
        return selector, selector.select(views_from_db(self._require_registry().db))

    def interface(self, ref: str) -> tuple[str, dict[str, Any]] | None:
        """(agent_id, the interface its hello published), by id or name; None when unknown."""
        return self._require_registry().interface(ref)

    async def call_target(self, target: str, method: str, params: dict[str, Any] | None = None,
                          timeout: float = DEFAULT_CALL_TIMEOUT,
                          concurrency: int = DEFAULT_CONCURRENCY) -> dict[str, Any]:
        """The operator API's call: `{"result"}`/`{"error"}` for one agent named by id or name, else
        `{"results": {agent_id: {"result"}|{"error"}}}` for every agent the target selects (docs/protocol.md)."""
        try:
            selector, views = self.select(target)
        except TargetError as exc:
            return {"error": RemoteError(INVALID_PARAMS, f"bad target {target!r}: {exc}").to_error()}
        if not selector.fanout and len(views) <= 1:
            try:
                return {"result": await self.call(views[0].agent_id if views else target, method, params, timeout)}
            except RemoteError as exc:
                return {"error": exc.to_error()}

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # for the whole fan-out: a call starting late gets what is left

        async def one(view: AgentView) -> Any:
            if self._server is None or self._server.session_of(view.agent_id) is None:
                raise RemoteError(AGENT_UNAVAILABLE, f"agent {view.agent_id} ({view.name}) is not connected",
                                  {"agent_id": view.agent_id, "connected": False})
            left = deadline - loop.time()
            if left <= 0:
                raise RemoteError(TIMEOUT, f"not called: the fan-out's {timeout:g} s passed first")
            return await self.call(view.agent_id, method, params, left)

        return {"results": await fan_out(views, one, concurrency)}
