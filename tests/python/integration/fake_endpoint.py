"""A scripted TLS endpoint for tests that need the endpoint to misbehave on purpose.

It speaks just enough of protocol v1 (hello, heartbeats) to bring a real `pyagent-host` session up, then runs one
`script` per session: a coroutine that gets the session and may send anything, including garbage.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

Script = Callable[["FakeSession"], Awaitable[None]]


class FakeSession:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received: list[Any] = []
        self.hello: dict[str, Any] | None = None

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, msg: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(msg).encode() + b"\n")

    async def recv(self, timeout: float = 10) -> Any:
        """The next message that is not a heartbeat (heartbeats are answered here)."""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise EOFError("the agent closed the connection")
            msg = json.loads(line)
            self.received.append(msg)
            if msg.get("method") == "heartbeat.post" and "id" in msg:
                try:
                    await self.send({"v": "1", "id": msg["id"], "result": {"timestamp": time.time() * 1000}})
                except (ConnectionError, ssl.SSLError):
                    pass  # the agent may be closing this session already; what it sent next is still readable
                continue
            return msg

    async def closed_by_peer(self, timeout: float = 10) -> bool:
        """Read until the agent closes; True if it did within the timeout."""
        try:
            while True:
                line = await asyncio.wait_for(self.reader.readline(), timeout)
                if not line:
                    return True
                self.received.append(json.loads(line))
        except asyncio.TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, ValueError):
            # A reset is a close too: a peer that closes with our unread bytes in its buffer sends RST, not FIN.
            return True


class FakeEndpoint:
    """Runs an asyncio TLS server in a thread; `scripts[i]` drives the i-th session. Sessions after the scripted ones
    run the last script again with `repeat_last`; otherwise (the agent reconnecting while the test winds down) they are
    held open and never count as errors."""

    def __init__(self, cert: Path, key: Path, scripts: list[Script], heartbeat_interval: float = 0.5,
                 repeat_last: bool = False) -> None:
        self.cert, self.key = cert, key
        self.scripts = scripts
        self.repeat_last = repeat_last
        self.heartbeat_interval = heartbeat_interval
        self.sessions: list[FakeSession] = []
        self.errors: list[BaseException] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = FakeSession(reader, writer)
        index = len(self.sessions)
        scripted = True
        self.sessions.append(session)
        try:
            hello = await session.recv()
            assert hello.get("method") == "handshake.hello", hello
            session.hello = hello
            await session.send({"v": "1", "id": hello["id"], "result": {
                "agent_id": hello["params"]["agent_id"], "heartbeat_interval": self.heartbeat_interval,
                "endpoint_time": time.time() * 1000}})
            scripted = index < len(self.scripts) or self.repeat_last
            if scripted:
                await self.scripts[min(index, len(self.scripts) - 1)](session)
            else:
                await session.closed_by_peer(timeout=60)
        except BaseException as exc:  # recorded for the test to see
            if scripted:
                self.errors.append(exc)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass

    def start(self) -> "FakeEndpoint":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert), str(self.key))
        self._thread.start()

        async def serve() -> int:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ctx)
            return int(self._server.sockets[0].getsockname()[1])

        self.port = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                self._server.close_clients() if hasattr(self._server, "close_clients") else None
            for s in self.sessions:
                s.writer.close()
            await asyncio.sleep(0.05)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
