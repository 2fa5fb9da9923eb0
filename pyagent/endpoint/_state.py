"""The endpoint's state directory: development PKI, tokens, the registry file and `endpoint.json`.

Everything is created on the first run and reused afterwards; nothing here is ever deleted.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyagent.endpoint import _pki
from pyagent._files import write_atomic
from pyagent.endpoint._errors import StateError
from pyagent.endpoint._log import log_event

_log = logging.getLogger("pyagent.endpoint.state")


@dataclass(frozen=True)
class StatePaths:
    """Where each file of the state directory lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def agent_token(self) -> Path:
        return self.root / "agent-token"

    @property
    def operator_token(self) -> Path:
        return self.root / "operator-token"

    @property
    def database(self) -> Path:
        return self.root / "endpoint.db"

    @property
    def endpoint_json(self) -> Path:
        return self.root / "endpoint.json"


@dataclass(frozen=True)
class State:
    paths: StatePaths
    agent_token_file: Path
    agent_token: str
    operator_token: str
    created: frozenset[str]  # what this run created: "state_dir", "ca", "server_cert", "agent_token", ...
    ca: _pki.KeyPair | None = None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log_event(_log, logging.WARNING, "state.permissions", file=str(path), mode=oct(mode),
                  hint="should be readable by its owner only (chmod 600)")


def _ensure_dir(root: Path, created: set[str]) -> None:
    if root.is_dir():
        return
    try:
        root.mkdir(mode=0o700, parents=True)
        os.chmod(root, 0o700)
    except OSError as exc:
        raise StateError(f"cannot create state directory {root}: {exc.strerror or exc}") from exc
    created.add("state_dir")


def _ensure_ca(paths: StatePaths, created: set[str]) -> _pki.KeyPair:
    have_cert, have_key = paths.ca_cert.exists(), paths.ca_key.exists()
    if have_cert != have_key:
        present, missing = (paths.ca_cert, paths.ca_key) if have_cert else (paths.ca_key, paths.ca_cert)
        raise StateError(f"{present} exists but {missing} does not; restore it, or remove both to create a new CA "
                         "(agents that pinned the old CA will then refuse this endpoint)")
    if have_cert:
        _check_private(paths.ca_key)
        try:
            return _pki.load_key_pair(_read(paths.ca_key), _read(paths.ca_cert))
        except (ValueError, TypeError) as exc:
            raise StateError(f"cannot load the CA from {paths.ca_cert} and {paths.ca_key}: {exc}") from exc
    ca = _pki.create_ca()
    write_atomic(paths.ca_key, ca.key_pem(), 0o600)
    write_atomic(paths.ca_cert, ca.cert_pem(), 0o644)
    created.add("ca")
    log_event(_log, logging.INFO, "pki.created", ca=str(paths.ca_cert), subject=ca.cert.subject.rfc4514_string())
    return ca


def _ensure_server_cert(paths: StatePaths, ca: _pki.KeyPair, listen_host: str, created: set[str]) -> None:
    problem: str | None = "missing"
    if paths.server_cert.exists() and paths.server_key.exists():
        try:
            server = _pki.load_key_pair(_read(paths.server_key), _read(paths.server_cert))
        except (ValueError, TypeError) as exc:
            problem = f"unreadable ({exc})"
        else:
            problem = _pki.server_cert_problem(server, ca, listen_host)
    if problem is None:
        return
    server = _pki.issue_server_cert(ca, listen_host)
    write_atomic(paths.server_key, server.key_pem(), 0o600)
    write_atomic(paths.server_cert, server.cert_pem(), 0o644)
    created.add("server_cert")
    if problem != "missing":
        log_event(_log, logging.INFO, "pki.server_cert_reissued", file=str(paths.server_cert), reason=problem)


def _ensure_token(path: Path, created: set[str], key: str, *, create: bool = True) -> str:
    if not path.exists():
        if not create:
            raise StateError(f"token file {path} does not exist")
        write_atomic(path, (secrets.token_urlsafe(32) + "\n").encode("ascii"), 0o600)
        created.add(key)
        log_event(_log, logging.INFO, "token.created", file=str(path))
    _check_private(path)
    try:
        token = _read(path).decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise StateError(f"token file {path} is not UTF-8 text") from exc
    if not token:
        raise StateError(f"token file {path} is empty")
    return token


def prepare_state(root: Path, listen_host: str, agent_token_file: Path | None = None, *,
                  allow_shared_token: bool = False) -> State:
    """Create what is missing in the state directory and load the rest. The shared agent token (a development
    option) is only created and read when `allow_shared_token` is set; otherwise `State.agent_token` is empty."""
    created: set[str] = set()
    root = root.expanduser().absolute()
    paths = StatePaths(root)
    _ensure_dir(root, created)
    ca = _ensure_ca(paths, created)
    _ensure_server_cert(paths, ca, listen_host, created)
    if not allow_shared_token:
        token_file = agent_token_file.expanduser().absolute() if agent_token_file else paths.agent_token
        agent_token = ""
    elif agent_token_file is None:
        token_file = paths.agent_token
        agent_token = _ensure_token(token_file, created, "agent_token")
    else:
        token_file = agent_token_file.expanduser().absolute()
        agent_token = _ensure_token(token_file, created, "agent_token", create=False)
    operator_token = _ensure_token(paths.operator_token, created, "operator_token")
    return State(paths, token_file, agent_token, operator_token, frozenset(created), ca)


def server_ssl_context(paths: StatePaths) -> ssl.SSLContext:
    """TLS 1.2 minimum (1.3 preferred by OpenSSL), the server certificate, and client certificates verified against
    the endpoint CA when presented (mutual TLS). A client without one may only enroll (the session checks that); a
    client with an invalid one (expired, another CA) fails the TLS handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.verify_mode = ssl.CERT_OPTIONAL
    try:
        ctx.load_verify_locations(cafile=str(paths.ca_cert))
    except (OSError, ssl.SSLError) as exc:
        raise StateError(f"cannot load the CA {paths.ca_cert}: {exc}") from exc
    try:
        ctx.load_cert_chain(paths.server_cert, paths.server_key)
    except (OSError, ssl.SSLError) as exc:
        raise StateError(f"cannot load {paths.server_cert} / {paths.server_key}: {exc}") from exc
    return ctx


def write_endpoint_json(paths: StatePaths, info: dict[str, Any]) -> None:
    write_atomic(paths.endpoint_json, (json.dumps(info, indent=2) + "\n").encode("utf-8"), 0o644)
