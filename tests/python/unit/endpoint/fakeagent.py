"""A tiny agent for tests: protocol v1 over TLS with Python's `ssl` module (asyncio streams), no C host needed.

    async with await FakeAgent.connect("127.0.0.1", port, ca_file, on_call=handler) as agent:
        reply = await agent.hello(token)            # the raw response message
        await agent.heartbeat(rtt_ms=0.5)
        msg = await agent.recv()                     # anything not matched to a request of ours

Responses to our own requests are matched by id; `bundle.call` requests are answered by `on_call(obj, method,
params)` (raise RemoteError to answer with an error), each in its own task so that replies may come out of order;
`heartbeat.post` from the endpoint is answered; everything else lands in the inbox read by `recv()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from pyagent.endpoint import EndpointConfig
from pyagent.protocol import (
    INTERNAL_ERROR,
    RemoteError,
    decode,
    encode,
    error_response,
    request,
    response,
)

DEFAULT_TIMEOUT = 5.0
CallHandler = Callable[[str, str, dict[str, Any]], Any]


def endpoint_config(state_dir: Path, **overrides: Any) -> EndpointConfig:
    """An endpoint config for tests: loopback, port 0 for agents and the API. The shared agent token is on (these
    tests exercise the protocol, not credentials); the security tests turn it off and enroll."""
    settings: dict[str, Any] = {"listen_host": "127.0.0.1", "listen_port": 0, "api_host": "127.0.0.1",
                                "api_port": 0, "allow_shared_token": True}
    settings.update(overrides)
    return EndpointConfig(state_dir=Path(state_dir), **settings)


def client_ssl_context(ca_file: Path | str, cert: Path | str | None = None,
                       key: Path | str | None = None) -> ssl.SSLContext:
    """What an agent does: trust only the pinned CA file, check the host name or IP address; with cert/key, present
    a client certificate (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key is not None else None)
    return ctx


def hello_params(token: str | None, agent_id: str = "agent-0001", name: str = "fake-1",
                 **overrides: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "agent_id": agent_id,
        "name": name,
        "token": token,
        "host": {"version": "0.1.0-fake", "python": "3.11.2"},
        "bundles": [{"name": "hello", "version": "0.1.0", "agents": ["hello"]}],
        "features": {"bundle.call": 1},
        "platform": {"system": "Linux", "release": "6.1", "machine": "x86_64", "hostname": "test"},
        "labels": {"env": "test"},
    }
    if token is None:
        del params["token"]
    params.update(overrides)
    return params


def run_async_test(pyfuncitem: Any) -> bool | None:
    """For a conftest's `pytest_pyfunc_call`: run an `async def` test in a fresh event loop (no plugin needed)."""
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        asyncio.run(pyfuncitem.obj(**kwargs))
        return True
    return None


async def greet(obj: str, method: str, params: dict[str, Any]) -> Any:
    """The hello bundle's behaviour, enough for round trips: hello.greet(name) -> "Hello, <name>!"."""
    if (obj, method) == ("hello", "greet"):
        return f"Hello, {params.get('name', 'world')}!"
    if (obj, method) == ("hello", "echo"):
        return params
    raise RemoteError(-32601, f"no method {obj}.{method}")


class FakeAgent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 on_call: CallHandler | None = None) -> None:
        self.reader = reader
        self.writer = writer
        self.on_call = on_call
        self.calls_received = 0
        self._inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self.eof = asyncio.Event()
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, ca_file: Path | str, *, server_hostname: str | None = None,
                      on_call: CallHandler | None = None, cert: Path | str | None = None,
                      key: Path | str | None = None) -> FakeAgent:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=client_ssl_context(ca_file, cert, key), server_hostname=server_hostname or host,
            limit=4 << 20, ssl_shutdown_timeout=2.0,
        )
        return cls(reader, writer, on_call)

    async def __aenter__(self) -> FakeAgent:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- sending ----------------------------------------------------------------------------------------------

    async def send(self, msg: dict[str, Any]) -> None:
        await self.send_raw(encode(msg) + b"\n")

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, params: dict[str, Any] | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """Send a request and return the raw response message (with "result" or "error")."""
        msg_id = self._next_id
        self._next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            await self.send(request(msg_id, method, params))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(msg_id, None)

    async def hello(self, token: str | None, **params: Any) -> dict[str, Any]:
        return await self.request("handshake.hello", hello_params(token, **params))

    async def heartbeat(self, **params: Any) -> dict[str, Any]:
        body = {"timestamp": int(time.time() * 1000), "seq": 1, "rtt_ms": None, "skew_ms": None, "py_lag_ms": 0}
        body.update(params)
        return await self.request("heartbeat.post", body)

    # -- receiving --------------------------------------------------------------------------------------------

    async def recv(self, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
        """The next message not matched to one of our requests; EOFError once the endpoint closed."""
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        if msg is None:
            self._inbox.put_nowait(None)  # stay at EOF for later callers
            raise EOFError("the endpoint closed the connection")
        return msg

    async def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        """Wait for the endpoint to close the connection; returns the messages received meanwhile."""
        received: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    received.append(await self.recv(timeout))
                except EOFError:
                    return received

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self.reader.readline()
                if not line:
                    break
                if line.strip():
                    self._on_message(decode(line))
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof.set()
            self._inbox.put_nowait(None)
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(EOFError("the endpoint closed the connection"))

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, dict) and "method" not in msg and msg.get("id") in self._pending:
            fut = self._pending.pop(msg["id"])
            if not fut.done():
                fut.set_result(msg)
            return
        if isinstance(msg, dict) and msg.get("method") == "bundle.call" and self.on_call is not None:
            task = asyncio.get_running_loop().create_task(self._answer_call(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        if isinstance(msg, dict) and msg.get("method") == "heartbeat.post" and "id" in msg:
            self.writer.write(encode(response(msg["id"], {"timestamp": int(time.time() * 1000)})) + b"\n")
            return
        self._inbox.put_nowait(msg)

    async def _answer_call(self, msg: dict[str, Any]) -> None:
        assert self.on_call is not None
        self.calls_received += 1
        params = msg.get("params", {})
        try:
            result = self.on_call(params["agent"], params["method"], params.get("params", {}))
            if inspect.isawaitable(result):
                result = await result
            reply = response(msg["id"], result)
        except RemoteError as exc:
            reply = error_response(msg["id"], exc.code, exc.message, exc.data)
        except Exception as exc:  # like the runtime: the method raised
            reply = error_response(msg["id"], INTERNAL_ERROR, str(exc), {"type": type(exc).__name__})
        if not self.writer.is_closing():
            self.writer.write(encode(reply) + b"\n")

    # -- closing ----------------------------------------------------------------------------------------------

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if not self.writer.is_closing():
            self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 3)
        if not self._reader_task.done():
            self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader_task
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=3)


__all__ = [
    "DEFAULT_TIMEOUT",
    "FakeAgent",
    "client_ssl_context",
    "endpoint_config",
    "greet",
    "hello_params",
    "run_async_test",
]
