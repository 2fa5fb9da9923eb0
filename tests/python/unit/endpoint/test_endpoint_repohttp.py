"""The TUF repository served on the agent TLS port (`_repohttp.py`): a real endpoint in this process, a real
enrolled client certificate, python-tuf's ngclient `Updater` and `http.client` over mutual TLS."""

from __future__ import annotations

import asyncio
import http.client
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fakeagent import FakeAgent, client_ssl_context, endpoint_config
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface, Updater

from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._release import bundle_archive, publish
from pyagent.endpoint import Endpoint
from pyagent.runtime.enroll import make_csr

REPO = Path(__file__).resolve().parents[4]


class MtlsFetcher(FetcherInterface):
    """What the agent's updater does: urllib3 with the pinned CA and the agent's client certificate."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self._pool = urllib3.PoolManager(ssl_context=ctx, retries=False)

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self._pool.request("GET", url, preload_content=False, timeout=10.0)
        if response.status >= 400:
            response.drain_conn()
            response.release_conn()
            raise DownloadHTTPError(f"HTTP {response.status}", response.status)
        return iter(response.stream(65536))


async def enroll(ep: Endpoint, tmp: Path, name: str = "web-1") -> tuple[str, Path, Path]:
    """Enroll an agent over TLS like `pyagent-host enroll`; returns (agent_id, cert file, key file)."""
    token, _ = ep.tokens.create_enroll_token()
    key = ec.generate_private_key(ec.SECP256R1())
    async with await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert) as agent:
        reply = await agent.request("enroll.request", {"token": token, "name": name, "csr": make_csr(key, name)})
    assert "result" in reply, reply
    cert, key_file = tmp / f"{name}.crt", tmp / f"{name}.key"
    cert.write_text(reply["result"]["certificate"])
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return reply["result"]["agent_id"], cert, key_file


def https(ep: Endpoint, cert: Path | None, key: Path | None) -> http.client.HTTPSConnection:
    ctx = client_ssl_context(ep.paths.ca_cert, cert, key)
    return http.client.HTTPSConnection("127.0.0.1", ep.listen_port, context=ctx, timeout=10)


def get(conn: http.client.HTTPSConnection, path: str, method: str = "GET",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


async def release_hello(ep: Endpoint) -> tuple[str, bytes]:
    """`pyagent release bundle bundles/hello` through the real operator API; returns (target path, archive)."""
    name, version, archive = bundle_archive(REPO / "bundles" / "hello")
    client = ApiClient(find_api(ep.paths.root))
    path = f"bundles/{name}/{version}.tar.gz"
    reply = await asyncio.to_thread(publish, client, ep.paths.root / "tuf-keys", path, archive,
                                    {"kind": "bundle", "name": name, "version": version})
    assert reply["version"] == 2, reply
    return path, archive


def ngclient_download(ep: Endpoint, cert: Path, key: Path, tmp: Path, target: str) -> bytes:
    """A fresh ngclient Updater trusting the endpoint's 1.root.json (read from disk: the right root)."""
    meta, dl = tmp / "meta", tmp / "dl"
    meta.mkdir(parents=True, exist_ok=True)
    dl.mkdir(exist_ok=True)
    base = f"https://127.0.0.1:{ep.listen_port}/tuf"
    updater = Updater(str(meta), base + "/metadata/", str(dl), base + "/targets/",
                      fetcher=MtlsFetcher(client_ssl_context(ep.paths.ca_cert, cert, key)),
                      bootstrap=(ep.paths.root / "tuf" / "metadata" / "1.root.json").read_bytes())
    updater.refresh()
    info = updater.get_targetinfo(target)
    assert info is not None, f"ngclient does not know {target}"
    assert info.custom == {"pyagent": {"kind": "bundle", "name": "hello", "version": "1.0.0"}}
    return Path(updater.download_target(info)).read_bytes()


async def test_ngclient_downloads_a_released_bundle_over_mtls(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path / "state", allow_shared_token=False)) as ep:
        agent_id, cert, key = await enroll(ep, tmp_path)
        path, archive = await release_hello(ep)
        assert ep.repo.find_target("bundle", "hello", "1.0.0") == path
        got = await asyncio.to_thread(ngclient_download, ep, cert, key, tmp_path / "client", path)
        assert got == archive

        # Resume: a range from byte N answers 206 with the tail; HEAD gives the length and no body; keep-alive.
        sha = ep.repo.targets.signed.targets[path].hashes["sha256"]
        url = f"/tuf/targets/bundles/hello/{sha}.1.0.0.tar.gz"
        conn = https(ep, cert, key)
        try:
            status, headers, body = await asyncio.to_thread(get, conn, url, "GET", {"Range": "bytes=100-"})
            assert status == 206 and body == archive[100:]
            assert headers["content-range"] == f"bytes 100-{len(archive) - 1}/{len(archive)}"
            status, headers, body = await asyncio.to_thread(get, conn, url, "HEAD")
            assert status == 200 and body == b"" and headers["content-length"] == str(len(archive))
            status, _, body = await asyncio.to_thread(get, conn, url, "GET", {"Range": f"bytes={len(archive)}-"})
            assert status == 416
            status, _, body = await asyncio.to_thread(get, conn, "/tuf/metadata/timestamp.json")
            assert status == 200 and b'"timestamp"' in body
            # Traversal and unknown files.
            for bad in ("/tuf/targets/../../x", "/tuf/targets/../online/timestamp.key",
                        "/tuf/metadata/..%2Fonline%2Ftimestamp.key", "/tuf/targets/bundles//x"):
                status, _, body = await asyncio.to_thread(get, conn, bad)
                assert status in (400, 404), (bad, status)
                assert b"PRIVATE" not in body
            assert (await asyncio.to_thread(get, conn, "/tuf/metadata/99.root.json"))[0] == 404
            assert (await asyncio.to_thread(get, conn, "/tuf/targets/bundles/hello/1.0.0.tar.gz"))[0] == 404
            assert (await asyncio.to_thread(get, conn, "/other"))[0] == 404
        finally:
            conn.close()


async def test_only_active_agents_are_served(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path / "state", allow_shared_token=False)) as ep:
        agent_id, cert, key = await enroll(ep, tmp_path)
        ok = https(ep, cert, key)
        assert (await asyncio.to_thread(get, ok, "/tuf/metadata/1.root.json"))[0] == 200
        ok.close()
        anonymous = https(ep, None, None)  # TLS without a client certificate (as enrollment is)
        status, _, body = await asyncio.to_thread(get, anonymous, "/tuf/metadata/1.root.json")
        anonymous.close()
        assert status == 403 and b"no agent certificate" in body
        # Pending (an operator un-approved it) and revoked agents: 403 naming the status.
        ep.registry_db.execute("UPDATE agents SET status = 'pending' WHERE agent_id = ?", (agent_id,))
        conn = https(ep, cert, key)
        status, _, body = await asyncio.to_thread(get, conn, "/tuf/metadata/1.root.json")
        conn.close()
        assert status == 403 and b"agent is pending" in body
        ep.registry_db.execute("UPDATE agents SET status = 'active' WHERE agent_id = ?", (agent_id,))
        conn = https(ep, cert, key)
        assert (await asyncio.to_thread(get, conn, "/tuf/metadata/1.root.json"))[0] == 200
        ep.set_agent_status(agent_id, "revoked")  # on the same kept-alive connection: checked per request
        status, _, body = await asyncio.to_thread(get, conn, "/tuf/metadata/1.root.json")
        conn.close()
        assert status == 403 and b"agent is revoked" in body


async def test_non_http_first_line_still_goes_to_ndjson(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path / "state")) as ep:
        async with await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert) as agent:
            await agent.send_raw(b"GETX garbage that is not JSON\n")
            received = await agent.wait_closed()
        assert received and received[0]["error"]["code"] == -32700, received
        async with await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert) as agent:
            reply = await agent.hello(ep.state.agent_token)
            assert "result" in reply, reply


async def test_bad_http_requests_get_clear_errors(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path / "state", allow_shared_token=False)) as ep:
        _, cert, key = await enroll(ep, tmp_path)
        ctx = client_ssl_context(ep.paths.ca_cert, cert, key)

        async def raw(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", ep.listen_port, ssl=ctx,
                                                           server_hostname="127.0.0.1")
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(1 << 16), 5)
            writer.close()
            return data

        huge = b"GET /tuf/metadata/root.json HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n"
        assert (await raw(huge)).startswith(b"HTTP/1.1 431")
        post = b"GET /tuf/metadata/root.json HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        assert (await raw(post)).startswith(b"HTTP/1.1 400")
        assert (await raw(b"GET /tuf/metadata/root.json HTTP/9\r\n\r\n")).startswith(b"HTTP/1.1 400")
        head: Any = await raw(b"HEAD /tuf/metadata/root.json HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")


async def test_file_bodies_are_read_off_the_event_loop_in_chunks(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pyagent.endpoint import _repohttp

    reads: list[tuple[int, int, int]] = []  # (thread id, size, offset) of every read
    real = _repohttp._read_chunk

    def recording(fd: int, size: int, offset: int) -> bytes:
        reads.append((threading.get_ident(), size, offset))
        return real(fd, size, offset)

    monkeypatch.setattr(_repohttp, "_read_chunk", recording)
    async with Endpoint(endpoint_config(tmp_path / "state", allow_shared_token=False)) as ep:
        _, cert, key = await enroll(ep, tmp_path)
        data = os.urandom(_repohttp._CHUNK * 2 + 12345)
        big = ep.repo.targets_dir / "hosts" / "big.bin"
        big.parent.mkdir(parents=True)
        big.write_bytes(data)
        conn = https(ep, cert, key)
        try:  # one kept-alive connection: whole file, a range over a chunk boundary, HEAD, whole file again
            status, _, body = await asyncio.to_thread(get, conn, "/tuf/targets/hosts/big.bin")
            assert status == 200 and body == data
            start = _repohttp._CHUNK - 10
            status, headers, body = await asyncio.to_thread(get, conn, "/tuf/targets/hosts/big.bin", "GET",
                                                            {"Range": f"bytes={start}-{start + 99}"})
            assert status == 206 and body == data[start:start + 100]
            assert headers["content-range"] == f"bytes {start}-{start + 99}/{len(data)}"
            before = len(reads)
            status, headers, body = await asyncio.to_thread(get, conn, "/tuf/targets/hosts/big.bin", "HEAD")
            assert status == 200 and body == b"" and headers["content-length"] == str(len(data))
            assert len(reads) == before  # HEAD reads nothing
            status, _, body = await asyncio.to_thread(get, conn, "/tuf/targets/hosts/big.bin")
            assert status == 200 and body == data
        finally:
            conn.close()
    loop_thread = threading.get_ident()  # this test runs on the endpoint's loop thread
    assert reads and all(thread != loop_thread for thread, _, _ in reads)
    assert [(size, offset) for _, size, offset in reads[:4]] == [
        (_repohttp._CHUNK, 0), (_repohttp._CHUNK, _repohttp._CHUNK), (12345, 2 * _repohttp._CHUNK),
        (100, start)]


async def _exchange(ep: Endpoint, ctx: ssl.SSLContext, request: bytes, timeout: float = 5.0) -> bytes:
    """Send `request` (one or more pipelined requests) and read until the endpoint closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", ep.listen_port, ssl=ctx, server_hostname="127.0.0.1")
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), timeout)  # TimeoutError: the connection was held open
    finally:
        writer.close()


async def test_a_forbidden_peer_holds_no_connection(tmp_path: Path) -> None:
    async with Endpoint(endpoint_config(tmp_path / "state", allow_shared_token=False)) as ep:
        agent_id, cert, key = await enroll(ep, tmp_path)
        request = b"GET /tuf/metadata/1.root.json HTTP/1.1\r\nHost: x\r\n\r\n"
        # No certificate: one 403, `connection: close`, and the endpoint closes (the second request is not served).
        data = await _exchange(ep, client_ssl_context(ep.paths.ca_cert, None, None), request * 2)
        assert data.startswith(b"HTTP/1.1 403") and data.count(b"HTTP/1.1") == 1
        assert b"connection: close" in data.lower()
        ep.set_agent_status(agent_id, "revoked")
        data = await _exchange(ep, client_ssl_context(ep.paths.ca_cert, cert, key), request * 2)
        assert data.startswith(b"HTTP/1.1 403") and data.count(b"HTTP/1.1") == 1 and b"agent is revoked" in data


async def test_connections_end_after_max_requests_and_a_slow_request(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from pyagent.endpoint import _repohttp

    monkeypatch.setattr(_repohttp, "MAX_REQUESTS", 3)
    monkeypatch.setattr(_repohttp, "IDLE_TIMEOUT", 0.5)
    async with Endpoint(endpoint_config(tmp_path / "state", allow_shared_token=False)) as ep:
        _, cert, key = await enroll(ep, tmp_path)
        ctx = client_ssl_context(ep.paths.ca_cert, cert, key)
        request = b"GET /tuf/metadata/1.root.json HTTP/1.1\r\nHost: x\r\n\r\n"
        data = await _exchange(ep, ctx, request * 5)  # pipelined: three answers, the third closes
        assert data.count(b"HTTP/1.1 200") == 3 and data.lower().count(b"connection: close") == 1
        # A request dribbled a byte at a time does not hold the connection: the whole request has IDLE_TIMEOUT.
        reader, writer = await asyncio.open_connection("127.0.0.1", ep.listen_port, ssl=ctx,
                                                       server_hostname="127.0.0.1")
        try:
            started = asyncio.get_running_loop().time()
            writer.write(b"GET /tuf/")
            closed = asyncio.ensure_future(reader.read(-1))
            for byte in b"metadata/1.root.json HTTP/1.1\r\nX-Slow: " + b"a" * 40:
                if closed.done():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.1)
            assert closed.done() and await closed == b""
            assert asyncio.get_running_loop().time() - started < 2.0
        finally:
            writer.close()


async def test_a_file_removed_after_its_lookup_is_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyagent.endpoint import _repohttp

    real_open = _repohttp._open

    async def pruned_first(path: Path) -> int:  # housekeeping removes the file between lookup and open
        path.unlink()
        return await real_open(path)

    async with Endpoint(endpoint_config(tmp_path / "state", allow_shared_token=False)) as ep:
        _, cert, key = await enroll(ep, tmp_path)
        for name in ("a.bin", "b.bin"):
            (ep.repo.targets_dir / "hosts").mkdir(parents=True, exist_ok=True)
            (ep.repo.targets_dir / "hosts" / name).write_bytes(b"x" * 100)
        conn = https(ep, cert, key)
        try:
            monkeypatch.setattr(_repohttp, "_open", pruned_first)
            status, _, body = await asyncio.to_thread(get, conn, "/tuf/targets/hosts/a.bin")
            assert status == 404 and b"not found" in body
            monkeypatch.setattr(_repohttp, "_open", real_open)
            # Removed between the lookup and its size: also 404 (the lookup still names the file).
            gone = ep.repo.targets_dir / "hosts" / "b.bin"
            monkeypatch.setattr(ep.repo, "target_file", lambda path: gone)
            gone.unlink()
            status, _, body = await asyncio.to_thread(get, conn, "/tuf/targets/hosts/b.bin")
            assert status == 404 and b"no target hosts/b.bin" in body
            monkeypatch.undo()
            # The connection still serves.
            assert (await asyncio.to_thread(get, conn, "/tuf/metadata/1.root.json"))[0] == 200
        finally:
            conn.close()
