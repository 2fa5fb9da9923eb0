"""The `shared_web` bundle: every `Site` object uses the same local HTTP server, started by the first and stopped
after the last (SharedService)."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

from pyagent.runtime import Agent, SharedService, method


def _python() -> str:
    """A Python interpreter for the server (inside pyagent-host, sys.executable is the host itself)."""
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    return shutil.which("python3") or "python3"


WEB = SharedService("http", [_python(), "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
                    ready=r"port (\d+)")


class Site(Agent):
    """Uses the shared local web server."""

    capabilities = ("web",)

    async def init(self) -> None:
        match = await WEB.acquire()
        assert match is not None
        self.port = int(match.group(1))

    async def fini(self) -> None:
        await WEB.release()

    @method
    def url(self) -> str:
        """The shared server's URL."""
        return f"http://127.0.0.1:{self.port}/"

    @method
    async def fetch(self, path: str = "/") -> int:
        """GET `path` from the shared server; returns the HTTP status."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()
        return int(status.split()[1])

    @method
    def users(self) -> int:
        """How many agent objects use the server."""
        return WEB.users
