"""Handling of the lines that arrive from the host: calls into agent objects, responses, host notices.

- `bundle.call {agent, method, params}` runs the object's exposed method after checking `params` against its type
  hints (-32602 names the parameter). Async methods run concurrently, each in its own task, at most
  `max_concurrent_calls` at a time in the worker and `Agent.max_concurrent_calls` per agent object (semaphores; the
  others wait their turn); `@method(exclusive=True)` methods of one object run one at a time. Sync methods run inline
  on the event loop as soon as the line is read, so they must be quick. The reply goes back on the session the request
  came from. A paused object refuses calls with -32006.
- `agent.*` control actions (`_control.py`), as requests of their own or as `bundle.call` with `method: "agent.…"`.
- Every request passes the local allow-list (`_allow.py`) first, here and only here: a refused kind gets -32007.
- Responses (lines without `method`) complete the requests the runtime sent itself with `Dispatcher.request`.
- `host.session` notices maintain the session table; other notifications are ignored; other requests get -32601.
- Bad input is logged and dropped, never raised: the host already validated every frame, so this is a second guard.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyagent.protocol import (
    AGENT_UNAVAILABLE,
    DEFAULT_MAX_FRAME_BYTES,
    FRAME_TOO_LARGE,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    NOT_ALLOWED,
    ProtocolError,
    RemoteError,
    decode,
    encode,
    error_response,
    notification,
    request,
    response,
    validate_message,
)
from pyagent.runtime._agent import Agent
from pyagent.runtime._allow import AllowList
from pyagent.runtime._control import Controller
from pyagent.runtime._errors import MessageTooLargeError, RequestTimeoutError, RuntimeStoppedError
from pyagent.runtime._log import log_event
from pyagent.runtime._schema import to_builtins
from pyagent.runtime._signature import InvalidParamsError, MethodSpec, bind, describe

CALL_METHOD = "bundle.call"
SESSION_NOTICE = "host.session"
HEALTHIEST_SESSION = 0

_log = logging.getLogger("pyagent.runtime")

SendLine = Callable[[int, bytes], None]


@dataclass
class Session:
    """A connected endpoint session, as announced by the host."""

    id: int
    endpoint: str
    since: float  # time.time() when it came up

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "endpoint": self.endpoint, "since": self.since}


@dataclass
class _Target:
    func: Callable[..., Any]
    spec: MethodSpec
    where: str
    agent: str
    limit: asyncio.Semaphore
    lock: asyncio.Lock | None


class _Call:
    """One `bundle.call` in flight: where its reply goes, and whether it was sent."""

    __slots__ = ("session", "msg_id", "source", "target", "where", "replied", "orphan")

    def __init__(self, session: int, msg: Mapping[str, Any], where: str) -> None:
        self.session = session
        self.msg_id: Any = msg.get("id")
        # The reply swaps the request's source and target (both optional on the wire).
        self.source: str | None = msg.get("target") if isinstance(msg.get("target"), str) else None
        self.target: str | None = msg.get("source") if isinstance(msg.get("source"), str) else None
        self.where = where
        self.replied = False
        self.orphan: Awaitable[Any] | None = None  # an awaitable a sync method returned, closed if never awaited


class Dispatcher:
    """Routes incoming lines; `send(session, payload)` queues an encoded message (the bridge's `send`)."""

    def __init__(self, agents: Mapping[str, Agent], send: SendLine, *, max_concurrent_calls: int = 64,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, controller: Controller | None = None,
                 allow: AllowList | None = None) -> None:
        self._send = send
        # pyagent-host passes the config's [allow] list; without one (embedding, tests) every existing kind is allowed.
        self.allow = allow if allow is not None else AllowList.everything()
        self.calls_not_allowed = 0
        self.max_frame_bytes = max_frame_bytes
        self.max_concurrent_calls = max_concurrent_calls
        self.controller = controller or Controller(agents, request_exit=lambda code: None)
        self.session_changed = asyncio.Event()
        self._targets: dict[str, dict[str, _Target]] = {}
        for obj, agent in agents.items():
            methods: dict[str, _Target] = {}
            limit = asyncio.Semaphore(type(agent).max_concurrent_calls)
            lock = asyncio.Lock()
            for exposed, spec in describe(type(agent)).items():
                methods[exposed] = _Target(getattr(agent, spec.attr), spec, f"{obj}.{exposed}", obj, limit,
                                           lock if spec.exclusive else None)
            self._targets[obj] = methods
        self._semaphore = asyncio.Semaphore(max_concurrent_calls)
        self._calls: dict[asyncio.Task[None], _Call] = {}
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self.sessions: dict[int, Session] = {}
        self.accepting = True
        self.running = 0
        self.peak_running = 0
        self.calls_total = 0
        self.calls_failed = 0
        self.lines_dropped = 0

    # --- incoming ---

    def handle_line(self, session: int, payload: bytes) -> None:
        """Handle one frame (the JSON after the session prefix) that arrived on `session`."""
        try:
            msg = decode(payload)
        except ValueError as exc:
            self._drop(session, f"not valid JSON: {exc}", payload)
            return
        try:
            validate_message(msg)
        except ProtocolError as exc:
            msg_id = msg.get("id") if isinstance(msg, dict) and "method" in msg else None
            if isinstance(msg_id, int) and not isinstance(msg_id, bool):
                self._send_message(session, error_response(msg_id, exc.code, exc.message, exc.data))
            self._drop(session, exc.message, payload)
            return
        method = msg.get("method")
        if method is None:
            self._on_response(msg)
            return
        params = msg.get("params") or {}
        if "id" not in msg:
            if method == SESSION_NOTICE:
                self._on_session(params)
            else:
                log_event(_log, logging.DEBUG, "notification.ignored", f"ignored notification {method}",
                          session=session, method=method)
            return
        if not self._permitted(session, msg, method, params):
            return
        if method == CALL_METHOD:
            self._on_call(session, msg, params)
        elif self.controller.is_control(method):
            self.calls_total += 1
            self._on_control(_Call(session, msg, method), method, params)
        else:
            self._send_message(session, error_response(msg["id"], METHOD_NOT_FOUND, f"method '{method}' not found"))

    def _permitted(self, session: int, msg: Mapping[str, Any], method: str, params: Any) -> bool:
        """The allow-list check for every request; a refusal is answered (-32007) and logged here."""
        effective = method
        inner = params.get("method") if isinstance(params, dict) else None
        if method == CALL_METHOD and isinstance(inner, str) and self.controller.is_control(inner):
            effective = inner  # a control action sent as bundle.call is still a control action
        refusal = self.allow.refusal(effective)
        if refusal is None:
            return True
        kind, message = refusal
        self.calls_total += 1
        self.calls_not_allowed += 1
        agent = params.get("agent") if isinstance(params, dict) and isinstance(params.get("agent"), str) else None
        where = f"{agent}.{inner}" if method == CALL_METHOD and agent and isinstance(inner, str) else effective
        log_event(_log, logging.WARNING, "call.not_allowed", f"refused {where}: allow-list kind '{kind}' is off",
                  session=session, method=effective, kind=kind, target=where)
        self._reply_error(_Call(session, msg, method), NOT_ALLOWED, message, {"kind": kind, "method": effective})
        return False

    def _drop(self, session: int, problem: str, payload: bytes) -> None:
        self.lines_dropped += 1
        log_event(_log, logging.WARNING, "line.dropped", f"dropped a frame: {problem}", session=session,
                  frame=payload[:120].decode("utf-8", "replace"))

    def _on_session(self, params: Mapping[str, Any]) -> None:
        sid, state = params.get("session"), params.get("state")
        if not isinstance(sid, int) or isinstance(sid, bool) or state not in ("up", "down"):
            log_event(_log, logging.WARNING, "session.notice.invalid", f"bad host.session notice: {params!r}")
            return
        endpoint = params.get("endpoint")
        endpoint = endpoint if isinstance(endpoint, str) else ""
        self.session_changed.set()
        if state == "up":
            self.sessions[sid] = Session(sid, endpoint, time.time())
            log_event(_log, logging.INFO, "session.up", "session up", session=sid, endpoint=endpoint)
        else:
            self.sessions.pop(sid, None)
            log_event(_log, logging.INFO, "session.down", "session down", session=sid, endpoint=endpoint,
                      reason=params.get("reason", ""))

    def _on_response(self, msg: Mapping[str, Any]) -> None:
        msg_id = msg["id"]
        future = self._pending.pop(msg_id, None) if isinstance(msg_id, int) else None
        if future is None or future.done():
            if msg_id is None and "error" in msg:
                log_event(_log, logging.WARNING, "protocol.error", f"peer reported a protocol error: {msg['error']}")
            else:
                log_event(_log, logging.DEBUG, "response.unmatched", "response to no pending request", id=msg_id)
            return
        if "error" in msg:
            future.set_exception(RemoteError.from_error(msg["error"]))
        else:
            future.set_result(msg["result"])

    # --- bundle.call ---

    def _on_call(self, session: int, msg: Mapping[str, Any], params: Mapping[str, Any]) -> None:
        self.calls_total += 1
        call = _Call(session, msg, CALL_METHOD)
        if not self.accepting:
            self._reply_error(call, AGENT_UNAVAILABLE, "the agent is shutting down")
            return
        inner = params.get("params")
        if isinstance(params.get("agent"), str) and isinstance(params.get("method"), str) \
                and self.controller.is_control(params["method"]) and isinstance(inner if inner is not None else {},
                                                                                dict):
            call.where = f"{params['agent']}.{params['method']}"
            self._on_control(call, params["method"], {**(inner or {}), "agent": params["agent"]})
            return
        target = self._resolve(call, params)
        if target is None:
            return
        call.where = target.where
        try:
            self.controller.check_callable(target.agent)
        except ProtocolError as exc:
            self._reply_error(call, exc.code, f"{target.where}: {exc.message}", exc.data)
            return
        try:
            args, kwargs = bind(target.spec, target.where, params.get("params") or {})
        except InvalidParamsError as exc:
            self._reply_error(call, INVALID_PARAMS, str(exc), exc.data())
            return
        if target.spec.is_async:
            self._start(call, functools.partial(target.func, *args, **kwargs), target)
            return
        try:
            result = target.func(*args, **kwargs)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            self._reply_exception(call, exc)
            return
        if inspect.isawaitable(result):  # a plain function that returns a coroutine, e.g. a decorated one
            call.orphan = result
            awaitable = result
            self._start(call, lambda: awaitable, target)
            return
        self._reply_result(call, result)

    def _resolve(self, call: _Call, params: Mapping[str, Any]) -> _Target | None:
        for key in params:
            if key not in ("agent", "method", "params"):
                self._reply_error(call, INVALID_PARAMS, f"{CALL_METHOD}: unknown parameter '{key}'",
                                  {"parameter": key})
                return None
        for key, expected in (("agent", str), ("method", str), ("params", dict)):
            if key not in params:
                if key == "params":
                    continue
                self._reply_error(call, INVALID_PARAMS, f"{CALL_METHOD}: missing parameter '{key}'",
                                  {"parameter": key})
                return None
            if not isinstance(params[key], expected):
                kind = "string" if expected is str else "object"
                self._reply_error(call, INVALID_PARAMS, f"{CALL_METHOD}: parameter '{key}' must be a {kind}",
                                  {"parameter": key, "expected": kind})
                return None
        obj, name = params["agent"], params["method"]
        methods = self._targets.get(obj)
        if methods is None:
            have = ", ".join(sorted(self._targets)) or "none"
            self._reply_error(call, METHOD_NOT_FOUND, f"no agent object '{obj}' (available: {have})")
            return None
        target = methods.get(name)
        if target is None:
            have = ", ".join(sorted(methods)) or "none"
            self._reply_error(call, METHOD_NOT_FOUND,
                              f"agent object '{obj}' has no method '{name}' (available: {have})")
            return None
        return target

    def _on_control(self, call: _Call, method: str, params: Mapping[str, Any]) -> None:
        """Control actions run in a task of their own, outside the call limits (so a busy agent can be paused)."""
        task = asyncio.get_running_loop().create_task(self._run_control(call, method, params))
        self._calls[task] = call
        task.add_done_callback(self._call_done)

    async def _run_control(self, call: _Call, method: str, params: Mapping[str, Any]) -> None:
        try:
            result = await self.controller.handle(method, params)
        except ProtocolError as exc:
            self._reply_error(call, exc.code, exc.message, exc.data)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            self._reply_exception(call, exc)
        else:
            self._reply_result(call, result)

    def _start(self, call: _Call, factory: Callable[[], Awaitable[Any]], target: _Target | None = None) -> None:
        task = asyncio.get_running_loop().create_task(self._run(call, factory, target))
        self._calls[task] = call
        task.add_done_callback(self._call_done)

    async def _run(self, call: _Call, factory: Callable[[], Awaitable[Any]], target: _Target | None) -> None:
        try:
            async with self._semaphore:
                if target is None:
                    result = await self._run_counted(factory, None)
                elif target.lock is not None:
                    async with target.lock, target.limit:
                        result = await self._run_counted(factory, target.agent)
                else:
                    async with target.limit:
                        result = await self._run_counted(factory, target.agent)
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            self._reply_exception(call, exc)
        else:
            self._reply_result(call, result)

    async def _run_counted(self, factory: Callable[[], Awaitable[Any]], agent: str | None) -> Any:
        counts = self.controller.running_calls
        self.running += 1
        self.peak_running = max(self.peak_running, self.running)
        if agent is not None:
            counts[agent] = counts.get(agent, 0) + 1
        try:
            return await factory()
        finally:
            self.running -= 1
            if agent is not None:
                counts[agent] -= 1

    def _call_done(self, task: asyncio.Task[None]) -> None:
        call = self._calls.pop(task, None)
        if call is None:
            return
        if task.cancelled():
            if call.orphan is not None and inspect.iscoroutine(call.orphan):
                call.orphan.close()  # never awaited if cancelled before it started: no "never awaited" warning
            if not call.replied:
                self._reply_error(call, AGENT_UNAVAILABLE, f"{call.where}: cancelled, the agent is shutting down")
        elif not call.replied:  # a BaseException that _run does not catch (a bundle's own subclass)
            exc = task.exception()
            if exc is not None:
                self._reply_exception(call, exc)

    # --- replies ---

    def _reply_result(self, call: _Call, result: Any) -> None:
        try:
            msg = response(call.msg_id, to_builtins(result), source=call.source, target=call.target)
            payload = encode(msg)
        except (TypeError, ValueError) as exc:
            self._reply_error(call, INTERNAL_ERROR, f"{call.where}: the result is not JSON-serialisable: {exc}",
                              {"type": type(exc).__name__, "traceback": ""})
            return
        if len(payload) > self.max_frame_bytes:
            self._reply_error(call, FRAME_TOO_LARGE,
                              f"{call.where}: the result is {len(payload)} bytes, over max_frame_bytes",
                              {"limit": self.max_frame_bytes})
            return
        call.replied = True
        self._send(call.session, payload)

    def _reply_exception(self, call: _Call, exc: BaseException) -> None:
        # Skip the dispatcher's own frames: the traceback starts in the bundle's method.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        log_event(_log, logging.ERROR, "call.failed", f"{call.where} raised {type(exc).__name__}: {exc}",
                  method=call.where, session=call.session, traceback=text.rstrip())
        self._reply_error(call, INTERNAL_ERROR, f"{call.where}: {type(exc).__name__}: {exc}",
                          {"type": type(exc).__name__, "traceback": text})

    def _reply_error(self, call: _Call, code: int, message: str, data: Any = None) -> None:
        self.calls_failed += 1
        call.replied = True
        self._send_message(call.session, error_response(call.msg_id, code, message, data, source=call.source,
                                                        target=call.target))

    def _send_message(self, session: int, msg: dict[str, Any]) -> None:
        payload = encode(msg)
        if len(payload) > self.max_frame_bytes and "error" in msg:  # e.g. a huge traceback: keep the code
            err = msg["error"]
            msg["error"] = {"code": err["code"], "message": err["message"][:1000]}
            payload = encode(msg)
        self._send(session, payload)

    # --- requests from the runtime ---

    async def request(self, method: str, params: Mapping[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Send a request on the healthiest session and return its result.

        Raises RemoteError (the peer answered with an error), RequestTimeoutError, RuntimeStoppedError or
        MessageTooLargeError.
        """
        if not self.accepting:
            raise RuntimeStoppedError(f"{method}: the runtime is stopping")
        msg_id = self._next_id
        self._next_id += 1
        payload = encode(request(msg_id, method, dict(params or {})))
        if len(payload) > self.max_frame_bytes:
            raise MessageTooLargeError(f"{method}: request of {len(payload)} bytes is over max_frame_bytes "
                                       f"({self.max_frame_bytes})")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        self._send(HEALTHIEST_SESSION, payload)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise RequestTimeoutError(f"{method}: no response within {timeout} s") from None
        finally:
            self._pending.pop(msg_id, None)

    def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a notification on the healthiest session."""
        payload = encode(notification(method, dict(params or {})))
        if len(payload) > self.max_frame_bytes:
            raise MessageTooLargeError(f"{method}: notification of {len(payload)} bytes is over max_frame_bytes")
        self._send(HEALTHIEST_SESSION, payload)

    # --- shutdown and stats ---

    async def shutdown(self, timeout: float) -> None:
        """Refuse new calls, fail pending requests, cancel the calls in flight and wait for them (bounded).

        Every call still in flight gets an error reply (-32003, the agent is shutting down).
        """
        self.accepting = False
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RuntimeStoppedError("the runtime stopped before the response arrived"))
        self._pending.clear()
        tasks = list(self._calls)
        for task in tasks:
            task.cancel()
        if tasks:
            _, still_running = await asyncio.wait(tasks, timeout=timeout)
            for task in still_running:
                call = self._calls.pop(task, None)
                if call is not None and not call.replied:
                    self._reply_error(call, AGENT_UNAVAILABLE, f"{call.where}: abandoned, the agent is shutting down")
            if still_running:
                log_event(_log, logging.WARNING, "shutdown.calls.abandoned",
                          f"{len(still_running)} calls ignored cancellation", count=len(still_running))

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": [s.as_dict() for s in self.sessions.values()],
            "calls_total": self.calls_total,
            "calls_failed": self.calls_failed,
            "calls_not_allowed": self.calls_not_allowed,
            "allow": self.allow.as_dict(),
            "calls_in_flight": len(self._calls),
            "calls_running": self.running,
            "calls_peak_running": self.peak_running,
            "max_concurrent_calls": self.max_concurrent_calls,
            "requests_pending": len(self._pending),
            "lines_dropped": self.lines_dropped,
        }
