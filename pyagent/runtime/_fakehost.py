"""`FakeHost`: a pure-Python stand-in for the `_pyagent_host` built-in module, for tests.

It has the same functions as the real module (`start`, `fileno`, `recv`, `send`, `stop`, `log`, `version`, `stats`,
and the `error` exception) and checks what the runtime hands it the way the C side would (the host config's keys,
complete `"<session> <json>\\n"` lines). Tests inject incoming lines with `inject()` (from any thread) and read what
the runtime sent with `sent_messages()` / `wait_sent()`.

    with FakeHost() as host:
        runtime = Runtime(host, agents, host_config)
        ...
        host.inject(1, {"v": "1", "id": 7, "method": "bundle.call", "params": {...}})
        [(session, reply)] = await host.wait_sent(1)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from typing import TYPE_CHECKING, Any

from pyagent.protocol import VERSION

_LINE_RE = re.compile(rb"(0|[1-9][0-9]*) (\{.*\})")
_REQUIRED_CONFIG: dict[str, type | tuple[type, ...]] = {
    "endpoints": list, "ca_file": str, "token": str, "max_frame_bytes": int, "reconnect_min_ms": int,
    "reconnect_max_ms": int, "reconnect_stable_ms": int, "hello": dict, "log_level": str,
}
_REQUIRED_ENDPOINT: dict[str, type] = {"host": str, "port": int, "server_name": str}


class FakeHostError(Exception):
    """What `FakeHost` raises where `_pyagent_host` raises `_pyagent_host.error`."""


class FakeHost:
    """Pure-Python `_pyagent_host` for tests; see the module docstring."""

    error: type[Exception] = FakeHostError

    def __init__(self, *, version: str = "0.0.0-fake", start_error: str | None = None) -> None:
        self._version = version
        self._start_error = start_error
        self._lock = threading.Lock()
        self._inbound: list[bytes] = []
        if hasattr(os, "eventfd"):
            self._rfd = self._wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self._rfd, self._wfd = os.pipe()
            os.set_blocking(self._rfd, False)
        self._closed = False
        self.config: dict[str, Any] | None = None  # the parsed config given to start()
        self.started = False
        self.stopped = False
        self.stop_timeout_ms: int | None = None
        self.sent: list[bytes] = []  # every chunk given to send(), in order
        self.logs: list[tuple[int, str]] = []  # every (level, line) given to log()
        self.sessions: dict[int, dict[str, Any]] = {}  # as announced with session_up()/session_down()
        self.recv_calls = 0

    # --- the _pyagent_host functions ---

    def start(self, config_json: str, /) -> None:
        if self.started:
            raise FakeHostError("already started")
        if self._start_error is not None:
            raise FakeHostError(self._start_error)
        try:
            config = json.loads(config_json)
        except (TypeError, ValueError) as exc:
            raise FakeHostError(f"config is not JSON: {exc}") from None
        _check_config(config)
        self.config = config
        self.started = True

    def fileno(self) -> int:
        self._check_open()
        return self._rfd

    def recv(self) -> bytes:
        self._check_open()
        with self._lock:
            self.recv_calls += 1
            self._reset_fd()
            data = b"".join(self._inbound)
            self._inbound.clear()
        return data

    def send(self, data: bytes, /) -> None:
        if not self.started or self.stopped:
            raise FakeHostError("send() while the host is not running")
        if not isinstance(data, bytes):
            raise FakeHostError(f"send() takes bytes, got {type(data).__name__}")
        if not data.endswith(b"\n"):
            raise FakeHostError("send() takes complete lines")
        for line in data[:-1].split(b"\n"):
            if not _LINE_RE.fullmatch(line):
                raise FakeHostError(f"malformed line: {line[:80]!r}")
        self.sent.append(data)

    def stop(self, timeout_ms: int, /) -> None:
        if not isinstance(timeout_ms, int):
            raise FakeHostError("stop() takes an integer timeout in milliseconds")
        self.stopped = True
        self.stop_timeout_ms = timeout_ms

    def log(self, level: int, line: str, /) -> None:
        if level not in (10, 20, 30, 40):
            raise FakeHostError(f"bad log level {level}")
        if "\n" in line:
            raise FakeHostError("log lines must not contain newlines")
        self.logs.append((level, line))

    def version(self) -> str:
        return self._version

    def stats(self) -> dict[str, Any]:
        with self._lock:
            queued = sum(len(chunk) for chunk in self._inbound)
        return {
            "sessions": [{"id": sid, "endpoint": s["endpoint"], "state": "up", "rtt_ms": None}
                         for sid, s in self.sessions.items()],
            "queued_bytes": queued,
            "dropped_lines": 0,
        }

    # --- the test side ---

    def inject_raw(self, data: bytes) -> None:
        """Queue raw bytes for the runtime (normally complete lines) and signal the fd; thread-safe."""
        self._check_open()
        with self._lock:
            was_empty = not self._inbound
            self._inbound.append(data)
            if was_empty:
                self._signal_fd()

    def inject(self, session: int, message: dict[str, Any] | bytes | str) -> None:
        """Queue one frame as if it arrived on `session` (a dict is encoded as JSON)."""
        if isinstance(message, dict):
            payload = json.dumps(message, separators=(",", ":")).encode()
        elif isinstance(message, str):
            payload = message.encode()
        else:
            payload = message
        self.inject_raw(b"%d %s\n" % (session, payload))

    def call(self, session: int, msg_id: int, agent: str, method: str, params: dict[str, Any] | None = None,
             **extra: Any) -> None:
        """Inject a `bundle.call` request."""
        call_params: dict[str, Any] = {"agent": agent, "method": method}
        if params is not None:
            call_params["params"] = params
        self.inject(session, {"v": VERSION, "id": msg_id, "method": "bundle.call", "params": call_params, **extra})

    def session_up(self, session: int, endpoint: str = "127.0.0.1:7443") -> None:
        """Announce a session the way the C host does (a `host.session` notice)."""
        self.sessions[session] = {"endpoint": endpoint, "since": time.time()}
        self.inject(session, {"v": VERSION, "method": "host.session",
                              "params": {"session": session, "state": "up", "endpoint": endpoint, "reason": ""}})

    def session_down(self, session: int, reason: str = "closed") -> None:
        endpoint = self.sessions.pop(session, {}).get("endpoint", "")
        self.inject(session, {"v": VERSION, "method": "host.session",
                              "params": {"session": session, "state": "down", "endpoint": endpoint,
                                         "reason": reason}})

    def sent_messages(self) -> list[tuple[int, dict[str, Any]]]:
        """Every line sent so far, as (session, decoded message)."""
        out: list[tuple[int, dict[str, Any]]] = []
        for chunk in self.sent:
            for line in chunk[:-1].split(b"\n"):
                session, _, payload = line.partition(b" ")
                out.append((int(session), json.loads(payload)))
        return out

    @property
    def send_calls(self) -> int:
        """How many times send() was called (one per event-loop iteration that had something to send)."""
        return len(self.sent)

    async def wait_sent(self, count: int, timeout: float = 5.0) -> list[tuple[int, dict[str, Any]]]:
        """Wait until at least `count` lines were sent in total and return them all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            messages = self.sent_messages()
            if len(messages) >= count:
                return messages
            if loop.time() > deadline:
                raise TimeoutError(f"{len(messages)} lines sent, expected {count}: {messages[-3:]}")
            await asyncio.sleep(0.002)

    def response_to(self, msg_id: int) -> tuple[int, dict[str, Any]]:
        """The (session, message) sent in reply to request `msg_id`; KeyError if none."""
        for session, msg in self.sent_messages():
            if msg.get("id") == msg_id and "method" not in msg:
                return session, msg
        raise KeyError(msg_id)

    def close(self) -> None:
        """Release the fd (call after the runtime stopped watching it)."""
        if self._closed:
            return
        self._closed = True
        os.close(self._rfd)
        if self._wfd != self._rfd:
            os.close(self._wfd)

    def __enter__(self) -> FakeHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---

    def _check_open(self) -> None:
        if self._closed:
            raise FakeHostError("the fake host is closed")

    def _signal_fd(self) -> None:
        if self._wfd == self._rfd:
            os.eventfd_write(self._wfd, 1)
        else:  # pragma: no cover - non-Linux
            os.write(self._wfd, b"\x01")

    def _reset_fd(self) -> None:
        try:
            if self._wfd == self._rfd:
                os.eventfd_read(self._rfd)
            else:  # pragma: no cover - non-Linux
                while os.read(self._rfd, 4096):
                    pass
        except BlockingIOError:
            pass


def _check_config(config: Any) -> None:
    """The checks the C host makes on the config given to start()."""
    if not isinstance(config, dict):
        raise FakeHostError("config must be a JSON object")
    for key, kind in _REQUIRED_CONFIG.items():
        if key not in config:
            raise FakeHostError(f"config: missing '{key}'")
        if not isinstance(config[key], kind) or isinstance(config[key], bool):
            raise FakeHostError(f"config: '{key}' has the wrong type")
    unknown = set(config) - set(_REQUIRED_CONFIG)
    if unknown:
        raise FakeHostError(f"config: unknown keys {sorted(unknown)}")
    if not config["endpoints"]:
        raise FakeHostError("config: no endpoints")
    for ep in config["endpoints"]:
        if not isinstance(ep, dict) or set(ep) != set(_REQUIRED_ENDPOINT):
            raise FakeHostError(f"config: bad endpoint {ep!r}")
        for key, kind in _REQUIRED_ENDPOINT.items():
            if not isinstance(ep[key], kind):
                raise FakeHostError(f"config: endpoint '{key}' has the wrong type")
    if "token" in config["hello"]:
        raise FakeHostError("config: the hello params must not carry the token")


if TYPE_CHECKING:  # FakeHost must stay a HostModule
    from pyagent.runtime._bridge import HostModule

    _as_host: HostModule = FakeHost()
