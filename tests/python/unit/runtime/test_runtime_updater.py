"""`pyagent-host update` (pyagent/runtime/updater.py): the real task process against a TUF repository made here with
python-tuf's Metadata API, served over HTTPS on 127.0.0.1 by a small server that requires the agent's client
certificate. Covers staging of a bundle and a host, trust on first use, resume with Range, and every refusal:
tampered target, wrong signing key, expired metadata, rollback, mix-and-match, unknown target, unreachable."""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from pyagent.endpoint import _pki

ROLES = ("root", "targets", "snapshot", "timestamp")
UPDATE_TIMEOUT = 60
MACHINE = f"{platform.system()}-{platform.machine()}".lower()  # the updater's platform check


def host_binary() -> str:
    found = shutil.which("pyagent-host") or str(Path(sys.executable).parent / "pyagent-host")
    if not Path(found).exists():
        raise AssertionError("pyagent-host is not installed (pip install . builds it)")
    return found


def _in(days: float) -> dt.datetime:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=days)).replace(microsecond=0)


class Repo:
    """A TUF repository on disk, laid out like the endpoint's (consistent snapshots)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.meta_dir = base / "tuf" / "metadata"
        self.targets_dir = base / "tuf" / "targets"
        self.meta_dir.mkdir(parents=True)
        self.targets_dir.mkdir(parents=True)
        self.signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        root = Root(expires=_in(365), consistent_snapshot=True)
        for role in ROLES:
            root.add_key(self.signers[role].public_key, role)
        self.root = Metadata(root)
        self.targets = Metadata(Targets(expires=_in(90)))
        self.snapshot = Metadata(Snapshot(expires=_in(7)))
        self.timestamp = Metadata(Timestamp(expires=_in(1)))
        self._write(self.root, "1.root.json", "root")
        self.timestamps: dict[int, bytes] = {}

    def _write(self, md: Metadata[Any], name: str, role: str, signer: CryptoSigner | None = None) -> bytes:
        md.signatures.clear()
        md.sign(signer or self.signers[role])
        data = md.to_bytes(JSONSerializer(compact=False))
        (self.meta_dir / name).write_bytes(data)
        return data

    def add(self, path: str, data: bytes, custom: dict[str, Any]) -> str:
        """Store a target file (consistent name) and list it in targets; returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        directory, sep, base = path.rpartition("/")
        file = self.targets_dir / f"{directory}{sep}{sha}.{base}"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)
        target = TargetFile(len(data), {"sha256": sha}, path, unrecognized_fields={"custom": {"pyagent": custom}})
        self.targets.signed.targets[path] = target
        return sha

    def publish(self, *, targets_signer: CryptoSigner | None = None, timestamp_days: float = 1) -> None:
        self.targets.signed.version += 1
        self._write(self.targets, f"{self.targets.signed.version}.targets.json", "targets", targets_signer)
        self.snapshot.signed.version += 1
        self.snapshot.signed.meta["targets.json"] = MetaFile(version=self.targets.signed.version)
        self._write(self.snapshot, f"{self.snapshot.signed.version}.snapshot.json", "snapshot")
        self.timestamp.signed.version += 1
        self.timestamp.signed.expires = _in(timestamp_days)
        self.timestamp.signed.snapshot_meta = MetaFile(version=self.snapshot.signed.version)
        self.timestamps[self.timestamp.signed.version] = self._write(self.timestamp, "timestamp.json", "timestamp")


def bundle_archive(name: str, version: str, *, toml_version: str | None = None) -> bytes:
    files = {"bundle.toml": f'name = "{name}"\nversion = "{toml_version or version}"\nentry = "mod:Thing"\n',
             "mod.py": "from pyagent.runtime import Agent\n\nclass Thing(Agent):\n    pass\n"}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for fname, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class Server:
    """HTTPS on 127.0.0.1, client certificate required, GET with `Range: bytes=N-`."""

    root: Path
    context: ssl.SSLContext
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path, range header)
    cut_after: int | None = None  # send only this many bytes of the next target, then drop the connection
    keep_alive_slow_404: bool = False  # HTTP/1.1 keep-alive; a 404's body sent 50 ms after its headers
    httpd: ThreadingHTTPServer | None = None

    def start(self) -> Server:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                if not (server.keep_alive_slow_404 and code == 404):
                    super().send_error(code, message, explain)
                    return
                body = f"no such file {self.path}\n".encode()
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(0.05)  # the body arrives after the client has read the headers
                self.wfile.write(body)

            def do_GET(self) -> None:
                rng = self.headers.get("Range", "")
                server.requests.append((self.path, rng))
                file = (server.root / self.path.lstrip("/")).resolve()
                if not self.path.startswith("/tuf/") or not file.is_file() or server.root not in file.parents:
                    self.send_error(404)
                    return
                data = file.read_bytes()
                start = 0
                if rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    if start >= len(data):
                        self.send_error(416)
                        return
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_after is not None and "/targets/" in self.path:
                    self.wfile.write(body[:server.cut_after])
                    server.cut_after = None
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        if self.keep_alive_slow_404:
            Handler.protocol_version = "HTTP/1.1"
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.socket = self.context.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@dataclass
class Env:
    tmp: Path
    repo: Repo
    server: Server
    config: Path
    state: Path

    def run(self, kind: str, name: str, version: str, target: str, *, rollout: str | None = None,
            env: dict[str, str] | None = None) -> tuple[int, list[dict[str, Any]], str]:
        # What an earlier run staged has been taken by the supervisor (the updater refuses to stage over it).
        (self.state / "updates" / "staged.json").unlink(missing_ok=True)
        cmd = [host_binary(), "update", "--config", str(self.config), "--kind", kind, "--name", name, "--version",
               version, "--target", target]
        if rollout:
            cmd += ["--rollout", rollout]
        proc = subprocess.run(cmd, capture_output=True, timeout=UPDATE_TIMEOUT, stdin=subprocess.DEVNULL,
                              env={**os.environ, **(env or {})})
        lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
        return proc.returncode, lines, proc.stderr.decode()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    ca = _pki.create_ca()
    server_pair = _pki.issue_server_cert(ca, "127.0.0.1")
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "ca.pem").write_bytes(ca.cert_pem())
    (pki / "server.pem").write_bytes(server_pair.cert_pem() + ca.cert_pem())
    (pki / "server.key").write_bytes(server_pair.key_pem())
    state = tmp_path / "state"
    state.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .sign(key, hashes.SHA256()))
    cert = _pki.issue_client_cert(ca, csr, "agent-1", dt.timedelta(days=1))
    client = _pki.KeyPair(key, cert)
    (state / "agent.crt").write_bytes(client.cert_pem())
    (state / "agent.key").write_bytes(client.key_pem())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.pem", pki / "server.key")
    context.load_verify_locations(pki / "ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    repo = Repo(tmp_path / "repo")
    server = Server(tmp_path / "repo", context).start()
    config = tmp_path / "agent.toml"
    config.write_text(f'endpoints = ["127.0.0.1:{server.port}"]\nca = "{pki / "ca.pem"}"\n'
                      f'state_dir = "{state}"\n')
    try:
        yield Env(tmp_path, repo, server, config, state)
    finally:
        server.stop()


def release_bundle(env: Env, name: str = "hello", version: str = "1.1.0", **kw: Any) -> tuple[str, bytes]:
    data = bundle_archive(name, version, **kw)
    path = f"bundles/{name}/{version}.tar.gz"
    env.repo.add(path, data, {"kind": "bundle", "name": name, "version": version})
    env.repo.publish()
    return path, data


def test_bundle_is_downloaded_verified_and_staged(env: Env) -> None:
    path, data = release_bundle(env)
    code, lines, err = env.run("bundle", "hello", "1.1.0", path, rollout="r-1")
    assert code == 0, (lines, err)
    states = [line["state"] for line in lines]
    assert states[0] == "downloading" and states[-2:] == ["verifying", "staged"]
    assert lines[-3] == {"state": "downloading", "bytes": len(data), "total": len(data)}
    staged_dir = env.state / "bundles" / "hello" / "1.1.0"
    assert lines[-1] == {"state": "staged", "dir": str(staged_dir)}
    assert "version = \"1.1.0\"" in (staged_dir / "bundle.toml").read_text()
    assert (staged_dir / "mod.py").is_file()
    staged = json.loads((env.state / "updates" / "staged.json").read_text())
    assert staged == {"kind": "bundle", "name": "hello", "version": "1.1.0", "dir": str(staged_dir),
                      "rollout": "r-1"}
    # trust on first use: 1.root.json came over mutual TLS and is now the trusted root
    assert (env.state / "tuf" / "metadata" / "root.json").is_file()
    assert ("/tuf/metadata/1.root.json", "") in env.server.requests
    assert not list((env.state / "updates" / "downloads").iterdir())  # the .part is gone once staged
    assert not [p for p in (env.state / "bundles" / "hello").iterdir() if p.name.startswith(".")]


def test_a_shipped_root_is_trusted_instead_of_first_use(env: Env) -> None:
    path, _ = release_bundle(env)
    (env.state / "tuf").mkdir()
    shutil.copy(env.repo.meta_dir / "1.root.json", env.state / "tuf" / "root.json")
    code, lines, err = env.run("bundle", "hello", "1.1.0", path)
    assert code == 0, (lines, err)
    assert all(p != "/tuf/metadata/1.root.json" for p, _ in env.server.requests)


def test_a_root_from_another_repository_refuses_everything(env: Env) -> None:
    path, _ = release_bundle(env)
    (env.state / "tuf").mkdir()
    other = Repo(env.tmp / "other")
    shutil.copy(other.meta_dir / "1.root.json", env.state / "tuf" / "root.json")
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1
    assert lines[-1]["state"] == "failed" and lines[-1]["reason"] == "bad_signature"
    assert not (env.state / "updates" / "staged.json").exists()


def test_interrupted_download_resumes_with_range(env: Env) -> None:
    data = bytes(range(256)) * 4000  # ~1 MB of "bundle" that will not stage: only the download is checked here
    env.repo.add("bundles/big/1.0.0.tar.gz", data, {"kind": "bundle", "name": "big", "version": "1.0.0"})
    env.repo.publish()
    env.server.cut_after = 300_000
    code, lines, _ = env.run("bundle", "big", "1.0.0", "bundles/big/1.0.0.tar.gz")
    assert code == 1 and lines[-1]["reason"] == "repository_unreachable", lines
    part = env.state / "updates" / "downloads" / f"{hashlib.sha256(data).hexdigest()}.part"
    kept = part.stat().st_size  # what arrived in whole chunks before the cut
    assert 0 < kept <= 300_000
    code, lines, _ = env.run("bundle", "big", "1.0.0", "bundles/big/1.0.0.tar.gz")
    target_requests = [r for p, r in env.server.requests if "/targets/" in p]
    assert target_requests == ["", f"bytes={kept}-"]
    assert lines[0] == {"state": "downloading", "bytes": kept, "total": len(data)}
    # verified (the hash matched across the two halves), then refused as an archive
    assert "verifying" in [line["state"] for line in lines]
    assert code == 1 and lines[-1]["reason"] == "bad_target", lines


def test_tampered_target_is_refused_and_not_kept(env: Env) -> None:
    path, data = release_bundle(env)
    sha = hashlib.sha256(data).hexdigest()
    served = env.repo.targets_dir / "bundles" / "hello" / f"{sha}.1.1.0.tar.gz"
    served.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines[-1]["state"] == "failed" and lines[-1]["reason"] == "hash_mismatch", lines
    assert not (env.state / "updates" / "downloads" / f"{sha}.part").exists()
    assert not (env.state / "bundles" / "hello" / "1.1.0").exists()
    assert not (env.state / "updates" / "staged.json").exists()


def test_targets_signed_by_the_wrong_key_are_refused(env: Env) -> None:
    data = bundle_archive("hello", "1.1.0")
    env.repo.add("bundles/hello/1.1.0.tar.gz", data, {"kind": "bundle", "name": "hello", "version": "1.1.0"})
    env.repo.publish(targets_signer=CryptoSigner.generate_ed25519())
    code, lines, _ = env.run("bundle", "hello", "1.1.0", "bundles/hello/1.1.0.tar.gz")
    assert code == 1 and lines[-1]["reason"] == "bad_signature", lines


def test_expired_timestamp_is_refused(env: Env) -> None:
    data = bundle_archive("hello", "1.1.0")
    env.repo.add("bundles/hello/1.1.0.tar.gz", data, {"kind": "bundle", "name": "hello", "version": "1.1.0"})
    env.repo.publish(timestamp_days=-1)
    code, lines, _ = env.run("bundle", "hello", "1.1.0", "bundles/hello/1.1.0.tar.gz")
    assert code == 1 and lines[-1]["reason"] == "metadata_expired", lines


def test_rollback_to_an_older_timestamp_is_refused(env: Env) -> None:
    path, _ = release_bundle(env)
    assert env.run("bundle", "hello", "1.1.0", path)[0] == 0
    release_bundle(env, version="1.2.0")  # timestamp v2, seen by the agent
    assert env.run("bundle", "hello", "1.2.0", "bundles/hello/1.2.0.tar.gz")[0] == 0
    (env.repo.meta_dir / "timestamp.json").write_bytes(env.repo.timestamps[min(env.repo.timestamps)])  # rollback
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines[-1]["reason"] == "rollback", lines


def test_mix_and_match_snapshot_is_refused(env: Env) -> None:
    path, _ = release_bundle(env)
    old_snapshot = (env.repo.meta_dir / f"{env.repo.snapshot.signed.version}.snapshot.json").read_bytes()
    release_bundle(env, version="1.2.0")
    # the new timestamp with the old (validly signed) snapshot served under the new snapshot's name
    (env.repo.meta_dir / f"{env.repo.snapshot.signed.version}.snapshot.json").write_bytes(old_snapshot)
    code, lines, _ = env.run("bundle", "hello", "1.2.0", "bundles/hello/1.2.0.tar.gz")
    assert code == 1 and lines[-1]["reason"] == "rollback" and "snapshot" in lines[-1]["detail"], lines
    assert not (env.state / "bundles" / "hello" / "1.2.0").exists()


def test_unknown_target_and_wrong_custom_fields(env: Env) -> None:
    path, _ = release_bundle(env)
    code, lines, _ = env.run("bundle", "hello", "9.9.9", "bundles/hello/9.9.9.tar.gz")
    assert code == 1 and lines[-1]["reason"] == "target_unknown", lines
    code, lines, _ = env.run("bundle", "other", "1.1.0", path)  # offered as another bundle than it was signed as
    assert code == 1 and lines[-1]["reason"] == "bad_target" and "signed as" in lines[-1]["detail"], lines


def test_bundle_whose_manifest_disagrees_is_refused(env: Env) -> None:
    path, _ = release_bundle(env, toml_version="1.0.0")
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines[-1]["reason"] == "bad_target" and "bundle.toml" in lines[-1]["detail"], lines
    assert not (env.state / "bundles" / "hello" / "1.1.0").exists()


def test_unreachable_repository(env: Env) -> None:
    path, _ = release_bundle(env)
    env.server.stop()
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines == [{"state": "failed", "reason": "repository_unreachable",
                                    "detail": lines[-1]["detail"]}]
    assert "127.0.0.1" in lines[-1]["detail"]


def test_without_the_client_certificate_the_repository_is_unreachable(env: Env) -> None:
    path, _ = release_bundle(env)
    (env.state / "agent.crt").unlink()
    (env.state / "agent.key").unlink()
    cfg = env.config.read_text() + 'auth = "shared-token"\ntoken = "x"\n'
    env.config.write_text(cfg)
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines[-1]["reason"] == "repository_unreachable", lines


def test_host_is_staged_and_its_version_checked(env: Env) -> None:
    binary = Path(host_binary()).read_bytes()
    version = subprocess.run([host_binary(), "--version"], capture_output=True, text=True,
                             check=True).stdout.split()[1]
    platform = MACHINE
    path = f"hosts/{platform}/{version}/pyagent-host"
    env.repo.add(path, binary, {"kind": "host", "platform": platform, "version": version})
    wrong = f"hosts/{platform}/7.7.7/pyagent-host"
    env.repo.add(wrong, binary, {"kind": "host", "platform": platform, "version": "7.7.7"})
    env.repo.publish()
    code, lines, err = env.run("host", "pyagent-host", version, path)
    assert code == 0, (lines, err)
    exe = env.state / "host" / version / "pyagent-host"
    assert lines[-1] == {"state": "staged", "dir": str(exe.parent)}
    assert exe.stat().st_mode & 0o777 == 0o755
    staged = json.loads((env.state / "updates" / "staged.json").read_text())
    assert staged["kind"] == "host" and staged["name"] == "pyagent-host" and staged["version"] == version
    code, lines, _ = env.run("host", "pyagent-host", "7.7.7", wrong)  # the binary says another version
    assert code == 1 and lines[-1]["reason"] == "bad_target" and "--version" in lines[-1]["detail"], lines
    assert not (env.state / "host" / "7.7.7").exists()


def test_bad_usage_exits_2() -> None:
    proc = subprocess.run([host_binary(), "update", "--kind", "bundle"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "required" in proc.stderr and proc.stdout == ""
    for version in ("current", "1..2", ".1"):  # versions are directory names beside the `current` link
        proc = subprocess.run([host_binary(), "update", "--config", "/nonexistent", "--kind", "bundle", "--name",
                               "hello", "--version", version, "--target", "bundles/hello/x.tar.gz"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "bad version" in proc.stderr and proc.stdout == "", (version, proc.stderr)


def test_host_for_another_platform_is_refused(env: Env) -> None:
    binary = Path(host_binary()).read_bytes()
    path = "hosts/linux-sparc64/9.9.9/pyagent-host"
    env.repo.add(path, binary, {"kind": "host", "platform": "linux-sparc64", "version": "9.9.9"})
    env.repo.publish()
    code, lines, _ = env.run("host", "pyagent-host", "9.9.9", path)
    assert code == 1 and lines[-1]["reason"] == "bad_target" and "linux-sparc64" in lines[-1]["detail"], lines
    assert not (env.state / "host" / "9.9.9").exists()


def test_one_update_at_a_time(env: Env) -> None:
    path, _ = release_bundle(env)
    updates = env.state / "updates"
    updates.mkdir(parents=True, exist_ok=True)
    (updates / "probation.json").write_text("{}")
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines[-1]["reason"] == "busy" and "probation" in lines[-1]["detail"], lines
    (updates / "probation.json").unlink()
    with open(updates / ".updater.lock", "a+b") as lock:  # another updater holds the lock
        fcntl.flock(lock, fcntl.LOCK_EX)
        code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines[-1]["reason"] == "busy" and "another update is running" in lines[-1]["detail"], lines
    assert not (env.state / "bundles" / "hello" / "1.1.0").exists()


def test_the_running_version_is_never_restaged(env: Env) -> None:
    path, _ = release_bundle(env)
    running = env.state / "bundles" / "hello" / "1.1.0"
    running.mkdir(parents=True)
    (running / "marker").write_text("the live copy")
    (running.parent / "current").symlink_to("1.1.0")
    code, lines, _ = env.run("bundle", "hello", "1.1.0", path)
    assert code == 1 and lines[-1]["reason"] == "bad_target" and "running now" in lines[-1]["detail"], lines
    assert (running / "marker").read_text() == "the live copy"


def test_leftovers_of_killed_updaters_are_cleaned(env: Env) -> None:
    path, _ = release_bundle(env)
    downloads = env.state / "updates" / "downloads"
    downloads.mkdir(parents=True)
    old_part = downloads / ("0" * 64 + ".part")
    old_part.write_bytes(b"x")
    os.utime(old_part, (time.time() - 2 * 86400,) * 2)
    fresh_part = downloads / ("1" * 64 + ".part")
    fresh_part.write_bytes(b"y")
    stale_tmp = env.state / "bundles" / "hello" / ".0.9.0.4242.tmp"
    stale_tmp.mkdir(parents=True)
    code, lines, err = env.run("bundle", "hello", "1.1.0", path)
    assert code == 0, (lines, err)
    assert not old_part.exists() and fresh_part.exists() and not stale_tmp.exists()


def test_an_unread_error_body_is_not_read_as_the_next_response(env: Env) -> None:
    """ngclient asks for N+1.root.json (404) and then, on the same kept-alive connection, for timestamp.json: the
    404's body must not be taken for the next status line (it was, under load, with the endpoint's repository)."""
    old_port = env.server.port
    env.server.stop()
    env.server.keep_alive_slow_404 = True
    env.server.start()
    env.config.write_text(env.config.read_text().replace(f":{old_port}", f":{env.server.port}"))
    path, _ = release_bundle(env)
    code, lines, err = env.run("bundle", "hello", "1.1.0", path)
    assert code == 0, (lines, err)
    assert ("/tuf/metadata/2.root.json", "") in env.server.requests
