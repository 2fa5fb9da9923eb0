"""`SharedService`: one local server process shared by several agent objects (MAGI's SharedServer).

    WEB = SharedService("web", [python, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                        ready=r"port (\\d+)")

    class Site(Agent):
        async def init(self) -> None:
            match = await WEB.acquire()      # the first user starts the process and waits until it is ready
            self.port = int(match.group(1))
        async def fini(self) -> None:
            await WEB.release()              # the last user stops it

Define the service at module level in the bundle, so every agent object of the bundle shares the same instance.
The process is stopped with SIGTERM, then SIGKILL after `stop_timeout`. Start and stop are serialised by a lock, so
concurrent `acquire`/`release` calls never start two processes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
from collections.abc import Mapping, Sequence

from pyagent.runtime._log import log_event

_log = logging.getLogger("pyagent.runtime.shared")


class SharedServiceError(Exception):
    pass


class SharedService:
    """A reference-counted child process; see the module docstring."""

    def __init__(self, name: str, argv: Sequence[str], *, ready: str | None = None, ready_timeout: float = 10.0,
                 stop_timeout: float = 2.0, env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        if not argv:
            raise ValueError("SharedService needs a command")
        self.name = name
        self.argv = list(argv)
        self.ready = re.compile(ready) if ready is not None else None
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.users = 0
        self.starts = 0
        self.process: asyncio.subprocess.Process | None = None
        self.match: re.Match[str] | None = None
        self._lock: asyncio.Lock | None = None
        self._drain: asyncio.Task[None] | None = None

    def _get_lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def acquire(self) -> re.Match[str] | None:
        """Count one more user; start the process if it is not running. Returns the `ready` match (or None)."""
        async with self._get_lock():
            if not self.running:
                await self._start()
            self.users += 1
            return self.match

    async def release(self) -> None:
        """Count one user less; stop the process after the last one. Extra releases are ignored."""
        async with self._get_lock():
            if self.users == 0:
                return
            self.users -= 1
            if self.users == 0:
                await self._stop()

    async def _start(self) -> None:
        self.match = None
        proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env, cwd=self.cwd)
        self.process = proc
        self.starts += 1
        log_event(_log, logging.INFO, "shared.started", f"shared service {self.name} started", service=self.name,
                  pid=proc.pid)
        if self.ready is not None:
            try:
                self.match = await asyncio.wait_for(self._wait_ready(proc), self.ready_timeout)
            except (TimeoutError, SharedServiceError) as exc:
                await self._stop()
                raise SharedServiceError(f"shared service {self.name}: not ready: {exc or 'timed out'}") from None
        self._drain = asyncio.get_running_loop().create_task(self._drain_output(proc))

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> re.Match[str]:
        assert proc.stdout is not None and self.ready is not None
        for _ in range(10_000):  # bounded: a chatty process that never prints the ready line times out anyway
            line = await proc.stdout.readline()
            if not line:
                raise SharedServiceError(f"exited with code {await proc.wait()} before it was ready")
            match = self.ready.search(line.decode("utf-8", "replace"))
            if match is not None:
                return match
        raise SharedServiceError("no ready line in the first 10,000 lines")

    async def _drain_output(self, proc: asyncio.subprocess.Process) -> None:
        """Keep reading the output so that the child never blocks on a full pipe."""
        assert proc.stdout is not None
        while await proc.stdout.read(65536):
            pass

    async def _stop(self) -> None:
        proc, self.process = self.process, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            await asyncio.wait({self._drain}, timeout=0.5)
            self._drain = None
        log_event(_log, logging.INFO, "shared.stopped", f"shared service {self.name} stopped", service=self.name,
                  pid=proc.pid, code=proc.returncode)
