"""The running agent: agents' lifecycle, the host bridge, the dispatcher, signals and shutdown.

`Runtime.run()` is the whole life of the worker's event loop:

1. install SIGTERM/SIGINT (clean stop) and SIGHUP (logged for now) handlers;
2. await every agent's `init()` in order (a failure, or a stop request, ends the run);
3. `_pyagent_host.start(config_json)`, then watch the host's fd;
4. serve until `stop()` (or a signal);
5. shutdown, bounded well under 2 s: stop reading, cancel the calls in flight (each gets an error reply), await
   `fini()` on every agent whose `init()` was attempted, flush, `_pyagent_host.stop(2000)`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyagent.protocol import DEFAULT_MAX_FRAME_BYTES
from pyagent.runtime._agent import Agent
from pyagent.runtime._allow import AllowList
from pyagent.runtime._bridge import Bridge, HostModule
from pyagent.runtime._control import Controller
from pyagent.runtime._dispatch import Dispatcher
from pyagent.runtime._errors import PyagentRuntimeError, RuntimeStoppedError
from pyagent.runtime._log import log_event
from pyagent.runtime._outbox import OUTBOX_FILE, Outbox
from pyagent.runtime._renew import Renewer

CALLS_SHUTDOWN_TIMEOUT = 0.5  # seconds to let cancelled calls finish
FINI_TIMEOUT = 0.6  # seconds for all fini() hooks together
HOST_STOP_TIMEOUT_MS = 2000

EXIT_OK = 0
EXIT_FAILURE = 1

_log = logging.getLogger("pyagent.runtime")


class Runtime:
    """One agent process's runtime over a HostModule (`_pyagent_host`, or `FakeHost` in tests).

    `host_config` is the JSON document given to `start` (see `worker.build_host_config`).
    """

    def __init__(self, host: HostModule, agents: Mapping[str, Agent], host_config: Mapping[str, Any], *,
                 max_concurrent_calls: int = 64, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 state_dir: Path | None = None, outbox_max_events: int = 10_000,
                 rng: random.Random | None = None, renewer: Renewer | None = None,
                 allow: AllowList | None = None) -> None:
        self.host = host
        self.agents = dict(agents)
        self.exit_code = EXIT_OK
        # Events: `Agent.emit` -> the outbox (on disk in state_dir when given) -> `event.batch` on session 0.
        self.outbox = Outbox(Path(state_dir) / OUTBOX_FILE if state_dir is not None else None,
                             max_events=outbox_max_events, max_batch_bytes=max_frame_bytes // 2)
        self.controller = Controller(self.agents, request_exit=self._exit, rng=rng)
        self._outbox_task: asyncio.Task[None] | None = None
        self.allow = allow  # the local allow-list (`_allow.py`); None: every existing kind (embedding, tests)
        self.renewer = renewer  # certificate renewal over the live session (`_renew.py`), None: off
        self._renew_task: asyncio.Task[None] | None = None
        for agent in self.agents.values():
            agent.__dict__["_pyagent_emit"] = self.outbox.put
            agent.__dict__["_pyagent_request"] = self.request  # Agent.discover / Agent.call
        self.host_config = host_config
        self.max_concurrent_calls = max_concurrent_calls
        self.max_frame_bytes = max_frame_bytes
        self._bridge: Bridge | None = None
        self._dispatcher: Dispatcher | None = None
        self._stop_requested = False
        self._stop_event: asyncio.Event | None = None
        self._started: asyncio.Event | None = None
        self._initialised: list[Agent] = []

    # --- control ---

    def exit(self, code: int) -> None:
        """A clean shutdown, then `run()` returns `code` (an update: EXIT_UPDATE)."""
        self._exit(code)

    def _exit(self, code: int) -> None:
        """agent.stop (0) / agent.restart (EXIT_RESTART): a clean shutdown, then `run()` returns `code`."""
        self.exit_code = code
        self.stop()

    def stop(self) -> None:
        """Ask the runtime to stop (safe to call from signal handlers, agents and tests, more than once)."""
        self._stop_requested = True
        if self._stop_event is not None:
            self._stop_event.set()

    async def wait_started(self) -> None:
        """Wait until the host is started and lines are being read."""
        if self._started is None:
            self._started = asyncio.Event()
        await self._started.wait()

    @property
    def dispatcher(self) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeStoppedError("the runtime is not running")
        return self._dispatcher

    async def request(self, method: str, params: Mapping[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Send a request to the endpoint on the healthiest session (session 0) and return its result."""
        return await self.dispatcher.request(method, params, timeout)

    def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a notification to the endpoint on the healthiest session."""
        self.dispatcher.notify(method, params)

    def stats(self) -> dict[str, Any]:
        """Runtime counters, the session table, and the host's own `stats()`."""
        out: dict[str, Any] = {}
        if self._dispatcher is not None:
            out.update(self._dispatcher.stats())
        out["outbox"] = self.outbox.stats()
        if self._bridge is not None:
            out["bridge"] = self._bridge.stats()
            try:
                out["host"] = self.host.stats()
            except self.host.error as exc:
                out["host"] = {"error": str(exc)}
        return out

    # --- the run ---

    async def run(self, *, install_signals: bool = True) -> int:
        """Run until stopped; return the exit code (0 clean stop, 1 an agent's init failed).

        Raises HostError (after cleaning up) when the host refuses the configuration.
        """
        loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self._started is None:
            self._started = asyncio.Event()
        if self._stop_requested:
            self._stop_event.set()
        signals = self._install_signals(loop) if install_signals else []
        bridge: Bridge | None = None
        try:
            if not await self._init_agents():
                return EXIT_FAILURE if not self._stop_requested else EXIT_OK
            self._dispatcher = Dispatcher(self.agents, self._send, max_concurrent_calls=self.max_concurrent_calls,
                                          max_frame_bytes=self.max_frame_bytes, controller=self.controller,
                                          allow=self.allow)
            bridge = Bridge(self.host, loop, self._dispatcher.handle_line)
            bridge.start(json.dumps(self.host_config))
            self._bridge = bridge
            bridge.attach()
            self.controller.start()
            dispatcher = self._dispatcher
            self._outbox_task = loop.create_task(
                self.outbox.deliver(dispatcher.request, lambda: bool(dispatcher.sessions), dispatcher.session_changed),
                name="outbox")
            if self.renewer is not None:
                self._renew_task = loop.create_task(
                    self.renewer.run(dispatcher.request, lambda: bool(dispatcher.sessions)), name="cert-renewal")
            self._started.set()
            log_event(_log, logging.INFO, "runtime.started", "runtime started", agents=",".join(self.agents),
                      host_version=self.host.version())
            await self._stop_event.wait()
            return self.exit_code
        finally:
            await self._shutdown(bridge)
            for sig in signals:
                loop.remove_signal_handler(sig)

    def _send(self, session: int, payload: bytes) -> None:
        if self._bridge is not None:
            self._bridge.send(session, payload)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_stop_signal, sig)
                installed.append(sig)
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # not the main thread, or no support
                log_event(_log, logging.WARNING, "signal.unavailable", f"cannot handle {sig.name}: {exc}")
        if hasattr(signal, "SIGHUP"):
            try:
                loop.add_signal_handler(signal.SIGHUP, self._on_hup)
                installed.append(signal.SIGHUP)
            except (RuntimeError, ValueError, NotImplementedError):
                pass
        return installed

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        log_event(_log, logging.INFO, "signal.received", f"{sig.name}: stopping", signal=sig.name)
        self.stop()

    def _on_hup(self) -> None:
        log_event(_log, logging.INFO, "signal.received", "SIGHUP: nothing to reload yet", signal="SIGHUP")

    async def _init_agents(self) -> bool:
        """Await each agent's init() in order; False when one failed or a stop was requested meanwhile."""
        assert self._stop_event is not None
        for name, agent in self.agents.items():
            if self._stop_event.is_set():
                return False
            self._initialised.append(agent)
            init = asyncio.ensure_future(_maybe_await(agent.init))
            stop = asyncio.ensure_future(self._stop_event.wait())
            try:
                await asyncio.wait({init, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if not init.done():
                init.cancel()
                await asyncio.wait({init})
                log_event(_log, logging.INFO, "agent.init.cancelled", f"stop requested during {name}.init()",
                          agent=name)
                return False
            exc = init.exception() if not init.cancelled() else None
            if init.cancelled() or exc is not None:
                log_event(_log, logging.ERROR, "agent.init.failed", f"{name}.init() failed: {exc!r}", agent=name,
                          traceback=_format(exc))
                return False
            log_event(_log, logging.DEBUG, "agent.init.complete", f"{name} initialised", agent=name)
        return True

    async def _shutdown(self, bridge: Bridge | None) -> None:
        log_event(_log, logging.INFO, "runtime.stopping", "runtime stopping")
        await self.controller.stop()
        if self._outbox_task is not None:
            self._outbox_task.cancel()
            await asyncio.wait({self._outbox_task}, timeout=0.2)
            self._outbox_task = None
        if self._renew_task is not None:
            self._renew_task.cancel()
            await asyncio.wait({self._renew_task}, timeout=3.5)  # an --install in progress finishes (bounded)
            self._renew_task = None
        if bridge is not None:
            bridge.detach()
        if self._dispatcher is not None:
            await self._dispatcher.shutdown(CALLS_SHUTDOWN_TIMEOUT)
        await self._fini_agents()
        self.outbox.close()
        if bridge is not None:
            bridge.stop(HOST_STOP_TIMEOUT_MS)
        self._bridge = None
        log_event(_log, logging.INFO, "runtime.stopped", "runtime stopped")

    async def _fini_agents(self) -> None:
        """fini() in reverse init order, all of them together bounded by FINI_TIMEOUT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FINI_TIMEOUT
        agents, self._initialised = self._initialised[::-1], []
        for agent in agents:
            remaining = max(deadline - loop.time(), 0.01)
            try:
                await asyncio.wait_for(_maybe_await(agent.fini), remaining)
            except TimeoutError:
                log_event(_log, logging.ERROR, "agent.fini.timeout", f"{agent.name}.fini() took too long",
                          agent=agent.name)
            except (Exception, SystemExit, KeyboardInterrupt) as exc:
                log_event(_log, logging.ERROR, "agent.fini.failed", f"{agent.name}.fini() failed: {exc!r}",
                          agent=agent.name, traceback=_format(exc))


async def _maybe_await(hook: Any) -> None:
    """Call a lifecycle hook that may be `async def` or a plain function.

    SystemExit and KeyboardInterrupt raised by a hook are turned into PyagentRuntimeError: inside a task asyncio would
    otherwise re-raise them out of the event loop and end the process without a shutdown.
    """
    try:
        result = hook()
        if inspect.isawaitable(result):
            await result
    except (SystemExit, KeyboardInterrupt) as exc:
        raise PyagentRuntimeError(f"{getattr(hook, '__qualname__', hook)} raised {type(exc).__name__}") from exc


def _format(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    import traceback

    return "".join(traceback.format_exception(exc)).rstrip()
