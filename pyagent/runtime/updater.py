"""`pyagent-host update`: download, verify and stage one update (docs/updates.md §2). A short-lived task process.

    pyagent-host update --config CFG --kind bundle|host --name N --version V --target PATH [--rollout ID]

The worker starts it for an `agent.update` offer and reads its stdout, one JSON object a line:

    {"state": "downloading", "bytes": B, "total": T}
    {"state": "verifying"}
    {"state": "staged", "dir": D}                                   exit 0
    {"state": "failed", "reason": R, "detail": TEXT}                exit 1

It is the only process of the agent that loads `tuf`, `urllib3`, `ssl` and `cryptography`. The repository is the
endpoint's (`https://<endpoint>/tuf/metadata/`, `/tuf/targets/`), reached with the agent's client certificate, the
pinned CA and the configured server name, over the config's endpoints in order. Trust starts from
`STATE/tuf/root.json` when an installer shipped one, else from `1.root.json` fetched over that mutual-TLS channel
(trust on first use); python-tuf's ngclient does the rest (root rotation, expiry, rollback and signature checks).
The target is downloaded to `STATE/updates/downloads/<sha256>.part` (resumed with `Range` after an interruption),
checked against the signed length and hashes, and staged:

- bundle: extracted (tarfile's `data` filter) into a temporary sibling of `STATE/bundles/<name>/<version>/`, its
  `bundle.toml` name and version checked, then renamed into place;
- host: copied to `STATE/host/<version>/pyagent-host` (0755), whose `--version` must print the version.

Then `STATE/updates/staged.json` is written atomically; the supervisor swaps it in once the worker exits.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater

from pyagent._files import write_atomic
from pyagent._updatenames import HOST_NAME, LINK_NAME, bundle_name_problem, platform_name, version_problem
from pyagent.runtime._config import AgentConfig, load_config
from pyagent.runtime._errors import ConfigError

EXIT_STAGED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

REPO_BASE = "https://pyagent-repository"  # a stand-in the fetcher replaces with the endpoint it reaches
ROOT_MAX_BYTES = 512 * 1024
CHUNK = 256 * 1024
PROGRESS_EVERY = 0.25  # seconds between two progress lines (the worker reports at most one a second)
SOCKET_TIMEOUT = 30.0
VERSION_TIMEOUT = 15.0
LEFTOVER_AGE = 86400.0  # partial downloads untouched this long are removed

REASONS = ("repository_unreachable", "metadata_expired", "bad_signature", "rollback", "hash_mismatch",
           "target_unknown", "bad_target", "io_error", "busy")

_log = logging.getLogger("pyagent.runtime.updater")


class UpdateFailedError(Exception):
    """The update failed for `reason` (one of REASONS)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Request:
    kind: str
    name: str
    version: str
    target: str
    rollout: str | None


# --- output ---

def emit(state: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"state": state, **fields}) + "\n")
    sys.stdout.flush()


# --- the fetcher: mutual TLS to the endpoints, in order ---

class MtlsFetcher(FetcherInterface):
    """python-tuf fetcher over urllib3 with the agent's client certificate and pinned CA. URLs start with
    REPO_BASE; each request goes to the first endpoint that answers (the next one on a connection error)."""

    def __init__(self, config: AgentConfig) -> None:
        self.pools: list[tuple[str, urllib3.HTTPSConnectionPool]] = []
        certificate = config.auth == "certificate"
        for ep in config.endpoints:
            pool = urllib3.HTTPSConnectionPool(
                ep.host, ep.port, cert_reqs="CERT_REQUIRED", ca_certs=str(config.ca),
                server_hostname=config.server_name_for(ep), maxsize=1, retries=False,
                timeout=urllib3.Timeout(connect=SOCKET_TIMEOUT, read=SOCKET_TIMEOUT),
                cert_file=str(config.cert_file) if certificate else None,
                key_file=str(config.key_file) if certificate else None)
            self.pools.append((str(ep), pool))
        self.preferred = 0

    def _path(self, url: str) -> str:
        if not url.startswith(REPO_BASE + "/"):
            raise tuf_errors.DownloadError(f"unexpected URL {url}")
        return url[len(REPO_BASE):]

    def open(self, url: str, headers: Mapping[str, str] | None = None) -> urllib3.BaseHTTPResponse:
        """GET `url` on the first endpoint that answers; raise DownloadError naming the endpoints."""
        path = self._path(url)
        problems: list[str] = []
        order = list(range(self.preferred, len(self.pools))) + list(range(self.preferred))
        for i in order:
            label, pool = self.pools[i]
            try:
                response = pool.urlopen("GET", path, headers=dict(headers or {}), preload_content=False,
                                        redirect=False)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                problems.append(f"{label}: {_describe(exc)}")
                continue
            self.preferred = i
            return response
        raise tuf_errors.DownloadError("repository unreachable (" + "; ".join(problems) + ")")

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self.open(url)
        if response.status >= 400:
            discard(response)
            raise tuf_errors.DownloadHTTPError(f"HTTP {response.status} for {self._path(url)}", response.status)
        return _chunks(response)


def _chunks(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    complete = False
    try:
        yield from response.stream(CHUNK)
        complete = True
    except urllib3.exceptions.HTTPError as exc:
        raise tuf_errors.SlowRetrievalError(f"download interrupted: {_describe(exc)}") from exc
    finally:
        if complete:
            response.release_conn()
        else:  # abandoned mid-body (too long, an error): what is left must not be read as the next response
            discard(response)


def discard(response: urllib3.BaseHTTPResponse) -> None:
    """Give up a response without reading its body: close its connection, so that the pool opens a new one rather
    than reading the rest of this body as the next response's status line (keep-alive)."""
    response.close()
    response.release_conn()


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason) if reason is not None else (str(exc) or type(exc).__name__)


# --- the update ---

class Update:
    def __init__(self, config: AgentConfig, request: Request, fetcher: MtlsFetcher | None = None) -> None:
        self.config = config
        self.request = request
        self.state = config.state_dir
        self.fetcher = fetcher or MtlsFetcher(config)

    def run(self) -> Path:
        """Download, verify and stage; return the staged directory. Raises UpdateFailedError. One updater at a time
        per state dir (an flock on updates/.updater.lock): a second one fails with reason `busy`."""
        updates = self.state / "updates"
        updates.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(updates / ".updater.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UpdateFailedError("busy", "another update is running on this agent") from None
            if (updates / "staged.json").exists() or (updates / "probation.json").exists():
                raise UpdateFailedError("busy", "another update is staged or in probation on this agent")
            self.clean_leftovers()
            return self._run()

    def clean_leftovers(self) -> None:
        """Partial downloads older than a day and staging directories of updaters that were killed."""
        cutoff = time.time() - LEFTOVER_AGE
        for part in (self.state / "updates" / "downloads").glob("*.part"):
            with contextlib.suppress(OSError):
                if part.stat().st_mtime < cutoff:
                    part.unlink()
        for parent in (self.state / "host", *(self.state / "bundles").glob("*")):
            for tmp in parent.glob(".*.tmp"):
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)

    def _run(self) -> Path:
        try:
            info = self.target_info()
            part = self.download(info)
            emit("verifying")
            self.verify(info, part)
            staged = self.stage(part)
            self.write_staged(staged)
            part.unlink(missing_ok=True)
            return staged
        except UpdateFailedError:
            raise
        except tuf_errors.ExpiredMetadataError as exc:
            raise UpdateFailedError("metadata_expired", str(exc)) from None
        except (tuf_errors.BadVersionNumberError, tuf_errors.EqualVersionNumberError) as exc:
            raise UpdateFailedError("rollback", str(exc)) from None
        except tuf_errors.UnsignedMetadataError as exc:
            raise UpdateFailedError("bad_signature", str(exc)) from None
        except tuf_errors.LengthOrHashMismatchError as exc:
            raise UpdateFailedError("hash_mismatch", str(exc)) from None
        except tuf_errors.DownloadLengthMismatchError as exc:
            raise UpdateFailedError("hash_mismatch", str(exc)) from None
        except tuf_errors.RepositoryError as exc:
            raise UpdateFailedError("bad_signature", f"{type(exc).__name__}: {exc}") from None
        except tuf_errors.DownloadHTTPError as exc:
            raise UpdateFailedError("repository_unreachable", str(exc)) from None
        except tuf_errors.DownloadError as exc:
            cause = exc.__cause__
            raise UpdateFailedError("repository_unreachable", str(exc) + (f": {_describe(cause)}" if cause else "")) \
                from None
        except OSError as exc:
            raise UpdateFailedError("io_error", str(exc)) from None

    # --- metadata ---

    def updater(self) -> Updater:
        tuf_dir = self.state / "tuf"
        metadata = tuf_dir / "metadata"
        metadata.mkdir(parents=True, exist_ok=True, mode=0o700)
        bootstrap: bytes | None = None
        if not (metadata / "root.json").exists():
            shipped = tuf_dir / "root.json"
            if shipped.is_file():
                bootstrap = shipped.read_bytes()
            else:  # trust on first use, over the mutual-TLS channel with the pinned CA
                with self.fetcher.download_file(f"{REPO_BASE}/tuf/metadata/1.root.json", ROOT_MAX_BYTES) as f:
                    bootstrap = f.read()
        return Updater(str(metadata), f"{REPO_BASE}/tuf/metadata/", None, f"{REPO_BASE}/tuf/targets/",
                       fetcher=self.fetcher, bootstrap=bootstrap)

    def target_info(self) -> TargetFile:
        updater = self.updater()
        updater.refresh()
        info = updater.get_targetinfo(self.request.target)
        if info is None:
            raise UpdateFailedError("target_unknown", f"the repository has no target {self.request.target}")
        custom = info.custom.get("pyagent") if isinstance(info.custom, dict) else None
        req = self.request
        expected: dict[str, str] = {"kind": req.kind, "version": req.version}
        if req.kind == "bundle":
            expected["name"] = req.name
        else:  # a host binary for another platform must not be staged here
            expected["platform"] = platform_name(platform.system(), platform.machine())
        if not isinstance(custom, dict) or any(custom.get(k) != v for k, v in expected.items()):
            raise UpdateFailedError("bad_target", f"target {req.target} is signed as {custom!r}, not as the offered "
                                                  f"{req.kind} {req.name} {req.version}")
        if "sha256" not in info.hashes:
            raise UpdateFailedError("bad_target", f"target {req.target} has no sha256 hash")
        return info

    # --- download ---

    def download(self, info: TargetFile) -> Path:
        sha = info.hashes["sha256"]
        downloads = self.state / "updates" / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        part = downloads / f"{sha}.part"
        directory, sep, base = info.path.rpartition("/")
        url = f"{REPO_BASE}/tuf/targets/{directory}{sep}{sha}.{base}"  # consistent snapshot file name
        for _ in range(2):  # a second time from 0 when the server refuses the range
            have = part.stat().st_size if part.exists() else 0
            if have > info.length:
                part.unlink()
                have = 0
            if have == info.length:
                emit("downloading", bytes=have, total=info.length)
                return part
            headers = {"Range": f"bytes={have}-"} if have else {}
            response = self.fetcher.open(url, headers)
            if response.status == 416:
                discard(response)
                part.unlink(missing_ok=True)
                continue
            if response.status >= 400:
                discard(response)
                if response.status == 404:
                    raise UpdateFailedError("target_unknown", f"the repository lists {info.path} but does not serve "
                                                              "its file (HTTP 404)")
                raise UpdateFailedError("repository_unreachable", f"HTTP {response.status} for {url[len(REPO_BASE):]}")
            if response.status != 206:
                have = 0  # the whole file: start again
            self._receive(response, part, have, info.length)
            return part
        raise UpdateFailedError("repository_unreachable", f"the repository refused every range of {info.path}")

    def _receive(self, response: urllib3.BaseHTTPResponse, part: Path, have: int, total: int) -> None:
        last = 0.0
        with open(part, "r+b" if have else "wb") as f:
            f.seek(have)
            f.truncate()
            emit("downloading", bytes=have, total=total)
            for chunk in _chunks(response):
                have += len(chunk)
                if have > total:
                    f.close()
                    part.unlink(missing_ok=True)
                    raise UpdateFailedError("hash_mismatch", f"the target is longer than its signed length {total}")
                f.write(chunk)
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY or have == total:
                    last = now
                    f.flush()
                    emit("downloading", bytes=have, total=total)
            f.flush()
            os.fsync(f.fileno())

    def verify(self, info: TargetFile, part: Path) -> None:
        with open(part, "rb") as f:
            try:
                info.verify_length_and_hashes(f)
            except tuf_errors.LengthOrHashMismatchError as exc:
                part.unlink(missing_ok=True)  # never resume from bad bytes
                raise UpdateFailedError("hash_mismatch", str(exc)) from None

    # --- staging ---

    def stage(self, part: Path) -> Path:
        req = self.request
        if req.kind == "bundle":
            final = self.state / "bundles" / req.name / req.version
        else:
            final = self.state / "host" / req.version
        final.parent.mkdir(parents=True, exist_ok=True)
        link = final.parent / LINK_NAME
        if final.is_symlink() or (link.is_symlink() and os.readlink(link) == req.version):
            raise UpdateFailedError("bad_target", f"{req.kind} {req.name} {req.version} is the version running now")
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        try:
            if req.kind == "bundle":
                self._stage_bundle(part, tmp)
            else:
                self._stage_host(part, tmp)
            if final.exists():  # an earlier staging of the same version: replace it
                old = final.with_name(f".{final.name}.{os.getpid()}.old")
                os.rename(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _stage_bundle(self, part: Path, tmp: Path) -> None:
        req = self.request
        try:
            with tarfile.open(part, "r:gz") as archive:
                members = _bundle_members(archive)
                if hasattr(tarfile, "data_filter"):
                    archive.extractall(tmp, members=members, filter="data")
                else:  # Python < 3.11.4: the members were checked above, with the data filter's rules that matter
                    archive.extractall(tmp, members=members)
        except (tarfile.TarError, EOFError, ValueError) as exc:
            raise UpdateFailedError("bad_target", f"{req.target}: not a usable bundle archive: {exc}") from None
        try:
            manifest = tomllib.loads((tmp / "bundle.toml").read_text("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UpdateFailedError("bad_target", f"{req.target}: no readable bundle.toml at its top: {exc}") from None
        got = (manifest.get("name"), manifest.get("version"))
        if got != (req.name, req.version):
            raise UpdateFailedError("bad_target", f"{req.target}: bundle.toml says name {got[0]!r} version "
                                                  f"{got[1]!r}, expected {req.name!r} {req.version!r}")

    def _stage_host(self, part: Path, tmp: Path) -> None:
        req = self.request
        exe = tmp / HOST_NAME
        shutil.copyfile(part, exe)
        os.chmod(exe, 0o755)
        try:
            out = subprocess.run([str(exe), "--version"], capture_output=True, timeout=VERSION_TIMEOUT,
                                 stdin=subprocess.DEVNULL, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpdateFailedError("bad_target", f"{req.target}: the new host does not run: {exc}") from None
        text = out.stdout.decode("utf-8", "replace").strip()
        if out.returncode != 0 or f" {req.version} " not in f" {text} ":
            raise UpdateFailedError("bad_target", f"{req.target}: `pyagent-host --version` printed {text[:200]!r} "
                                                  f"(exit code {out.returncode}), expected version {req.version}")

    def write_staged(self, staged: Path) -> None:
        req = self.request
        updates = self.state / "updates"
        updates.mkdir(parents=True, exist_ok=True)
        doc = {"kind": req.kind, "name": req.name, "version": req.version, "dir": str(staged),
               "rollout": req.rollout}
        write_atomic(updates / "staged.json", json.dumps(doc).encode() + b"\n", 0o644)


def _bundle_members(archive: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """A bundle archive holds regular files and directories only, under relative names without `..`; their modes
    are normalised (no set-id bits, not world-writable). Raises ValueError naming the first bad member."""
    members = archive.getmembers()
    for member in members:
        parts = member.name.split("/")
        if member.name.startswith("/") or ".." in parts or "\0" in member.name:
            raise ValueError(f"member {member.name!r} is outside the bundle")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"member {member.name!r} is not a regular file or a directory")
        member.mode = 0o755 if member.isdir() or member.mode & 0o100 else 0o644
        member.uid = member.gid = 0
        member.uname = member.gname = ""
    return members


# --- the command ---

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"pyagent-host update: {message}\n")
        raise SystemExit(EXIT_USAGE)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = _Parser(prog="pyagent-host update", add_help=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--kind", required=True, choices=("bundle", "host"))
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--rollout", default=None)
    return parser.parse_args(list(argv))


def main(argv: list[str]) -> int:
    """Run one update; return the exit code (0 staged, 1 failed, 2 bad usage)."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="pyagent-host update: %(message)s")
    problem = version_problem(args.version) or (bundle_name_problem(args.name) if args.kind == "bundle" else None)
    if problem:
        sys.stderr.write(f"pyagent-host update: {problem}\n")
        return EXIT_USAGE
    request = Request(args.kind, HOST_NAME if args.kind == "host" else args.name, args.version, args.target,
                      args.rollout)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        emit("failed", reason="io_error", detail=f"config error: {exc}")
        return EXIT_FAILED
    try:
        staged = Update(config, request).run()
    except UpdateFailedError as exc:
        emit("failed", reason=exc.reason, detail=exc.detail)
        return EXIT_FAILED
    except Exception as exc:  # a bug: still one clear line for the worker
        _log.exception("update failed")
        emit("failed", reason="io_error", detail=f"{type(exc).__name__}: {exc}")
        return EXIT_FAILED
    emit("staged", dir=str(staged))
    return EXIT_STAGED
