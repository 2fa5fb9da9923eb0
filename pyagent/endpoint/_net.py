"""Listening sockets and peer addresses."""

from __future__ import annotations

import socket
from typing import Any

from pyagent.endpoint._config import format_address
from pyagent.endpoint._errors import EndpointError

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def bind_listeners(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Bind a listening socket on every address of `host`, all on the same port (the first one's when `port` is 0).

    asyncio would bind a name that resolves to several addresses itself, but with port 0 each socket would get a
    different port; the endpoint announces one `host:port`.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EndpointError(f"cannot resolve listen address {host!r}: {exc}") from exc
    seen: set[tuple[Any, ...]] = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, addr in infos:
            key = (family, addr[0])
            if key in seen:
                continue
            seen.add(key)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and len(infos) > 1:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            bind_addr = (addr[0], port, *addr[2:])
            try:
                sock.bind(bind_addr)
            except OSError as exc:
                raise EndpointError(f"cannot listen on {format_address(str(addr[0]), port)}: {exc.strerror or exc}") from exc
            if port == 0:
                port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def dial_host(host: str) -> str:
    """The address a local client should dial to reach a server bound on `host` (wildcards become loopback)."""
    return _WILDCARDS.get(host, host)


def peer_name(peername: Any) -> str:
    """`host:port` of a socket peer, as reported by `get_extra_info("peername")`."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return format_address(str(peername[0]), int(peername[1]))
    return str(peername) if peername else "unknown"
