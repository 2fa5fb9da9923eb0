"""The only module that touches `_pyagent_host`: line framing and batching across the C/Python bridge.

Lines are `b"<session> <json>\\n"`. Incoming: the host's eventfd is watched with `loop.add_reader`; each wakeup drains
the host's queue with one `recv()` and hands every line to the consumer. Outgoing: lines are appended to a list and
handed over with one `send()` per event-loop iteration (a `call_soon` flush is scheduled when the list goes from empty
to non-empty), so a burst of replies costs the C side a single wakeup.

Assumption about the C side: `recv()` resets the eventfd itself (before swapping its queue out), so the runtime
never reads the fd.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable
from typing import Any, Protocol, cast

from pyagent.runtime._errors import HostError
from pyagent.runtime._log import log_event

HOST_MODULE = "_pyagent_host"

_log = logging.getLogger("pyagent.runtime")


class HostModule(Protocol):
    """The functions of the `_pyagent_host` built-in module (see docs/architecture.md, "The bridge").

    `FakeHost` implements the same protocol in pure Python for tests.
    """

    @property
    def error(self) -> type[Exception]:
        """The exception the host raises (e.g. from `start` on a bad config)."""

    def start(self, config_json: str, /) -> object: ...
    def fileno(self) -> int: ...
    def recv(self) -> bytes: ...
    def send(self, data: bytes, /) -> object: ...
    def stop(self, timeout_ms: int, /) -> object: ...
    def log(self, level: int, line: str, /) -> object: ...
    def version(self) -> str: ...
    def stats(self) -> dict[str, Any]: ...


def import_host() -> HostModule:
    """Import the host's built-in module; raises HostError when not running inside `pyagent-host`."""
    try:
        return cast(HostModule, importlib.import_module(HOST_MODULE))
    except ImportError:
        raise HostError(f"the built-in module {HOST_MODULE} is missing: "
                        "pyagent.runtime.worker runs inside pyagent-host") from None


LineHandler = Callable[[int, bytes], None]


class Bridge:
    """Framing and batching over a HostModule for one event loop."""

    def __init__(self, host: HostModule, loop: asyncio.AbstractEventLoop, on_line: LineHandler) -> None:
        self.host = host
        self.loop = loop
        self.on_line = on_line
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._partial = b""
        self._fd: int | None = None
        self._started = False
        self._stopped = False
        self.send_calls = 0
        self.lines_in = 0
        self.lines_out = 0
        self.dropped_out = 0

    # --- lifecycle ---

    def start(self, config_json: str) -> None:
        """Start the host's libuv thread with `config_json`; translate the host's error into HostError."""
        try:
            self.host.start(config_json)
        except self.host.error as exc:
            raise HostError(f"the host refused the configuration: {exc}") from None
        self._started = True

    def attach(self) -> None:
        """Start reading: watch the host's fd and drain anything already queued."""
        self._fd = self.host.fileno()
        self.loop.add_reader(self._fd, self._on_readable)

    def detach(self) -> None:
        """Stop reading (nothing more is dispatched after this)."""
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self._fd = None

    def stop(self, timeout_ms: int) -> None:
        """Hand over what is buffered, then stop the host (it flushes its queues and joins its thread)."""
        self.detach()
        if not self._started or self._stopped:
            return
        self.flush()
        self._stopped = True
        try:
            self.host.stop(timeout_ms)
        except self.host.error as exc:
            log_event(_log, logging.ERROR, "host.stop.failed", f"host stop failed: {exc}")

    # --- incoming ---

    def _on_readable(self) -> None:
        if self._fd is None:
            return
        try:
            data = self.host.recv()
        except self.host.error as exc:
            log_event(_log, logging.ERROR, "bridge.recv.failed", f"recv failed: {exc}")
            return
        if not data:
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        lines = bytes(data).split(b"\n")
        self._partial = lines.pop()  # b"" when data ends with a newline, as it always should
        for line in lines:
            if line:
                self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        self.lines_in += 1
        space = line.find(b" ")
        try:
            if space <= 0:
                raise ValueError("no session prefix")
            session = int(line[:space])
        except ValueError:
            log_event(_log, logging.WARNING, "bridge.line.invalid", "dropped a line without a session prefix",
                      line=line[:80].decode("utf-8", "replace"))
            return
        try:
            self.on_line(session, line[space + 1:])
        except Exception:  # the consumer handles its own errors; this is the last guard for the reader callback
            log_event(_log, logging.ERROR, "bridge.dispatch.failed", "line handler raised", exc_info=True)

    # --- outgoing ---

    def send(self, session: int, payload: bytes) -> None:
        """Queue one line (`payload` is encoded JSON without newline) for session `session` (0 = healthiest)."""
        if self._stopped:
            self.dropped_out += 1
            return
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)
        self._out.append(b"%d %s\n" % (session, payload))

    def flush(self) -> None:
        """Hand everything buffered to the host in one `send()`."""
        self._flush_scheduled = False
        if not self._out or self._stopped:
            return
        lines, self._out = self._out, []
        self.send_calls += 1
        self.lines_out += len(lines)
        try:
            self.host.send(b"".join(lines))
        except self.host.error as exc:
            self.dropped_out += len(lines)
            log_event(_log, logging.ERROR, "bridge.send.failed", f"send failed, {len(lines)} lines dropped: {exc}")

    def stats(self) -> dict[str, int]:
        return {"send_calls": self.send_calls, "lines_in": self.lines_in, "lines_out": self.lines_out,
                "dropped_out": self.dropped_out, "buffered_out": len(self._out)}
