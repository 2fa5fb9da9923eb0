"""Enrollment: hashed enrollment and operator tokens, the agent's certificate request, approval and revocation.

All state lives in the registry's SQLite database (tables `enroll_tokens`, `operator_tokens`, and the `status`,
`pubkey_fp`, `cert_*` columns of `agents`). An agent is identified by its key: a retried `enroll.request` with the
same key (the agent keeps it while it waits for approval) finds its earlier request instead of spending another use of
the token.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypedDict

from cryptography.hazmat.primitives import serialization

from pyagent.endpoint import _pki
from pyagent.endpoint._log import log_event
from pyagent.endpoint._registry import Registry
from pyagent.endpoint._tokens import (
    ENROLL_PREFIX,
    OPERATOR_PREFIX,
    SCOPES,
    TokenFormatError,
    hash_token,
    new_token,
)
from pyagent.protocol import ENROLLMENT_PENDING, INVALID_PARAMS, UNAUTHORIZED, RemoteError

_log = logging.getLogger("pyagent.endpoint.enroll")

# Error code of `enroll.request` while an operator has not approved the agent yet (docs/protocol.md).
DEFAULT_PENDING_RETRY_S = 5
ENROLL_KEYS = frozenset({"token", "csr", "name", "labels"})
RENEW_KEYS = frozenset({"csr"})
MAX_NAME_CHARS = 256

AGENT_STATUSES = ("pending", "active", "rejected", "revoked")


def now_ms() -> int:
    return int(time.time() * 1000)


class EnrollTokenRecord(TypedDict):
    token_id: str
    labels: dict[str, str]
    max_uses: int | None
    uses: int
    expires_at: int | None
    approve: bool
    revoked: bool
    created_at: int


class OperatorTokenRecord(TypedDict):
    token_id: str
    scopes: list[str]
    label: str
    revoked: bool
    created_at: int


@dataclass(frozen=True)
class Issued:
    agent_id: str
    cert_pem: str
    not_after_ms: int


class TokenStore:
    """Enrollment and operator tokens, stored as SHA-256 hashes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    # -- enrollment tokens --

    def create_enroll_token(self, *, uses: int | None = None, expires_s: int | None = None,
                            labels: dict[str, str] | None = None, approve: bool = False) -> tuple[str, str]:
        """Store a new enrollment token; returns (token text, shown once; token id)."""
        if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or uses < 1):
            raise TokenFormatError(f"uses must be a positive integer, got {uses!r}")
        if expires_s is not None and (not isinstance(expires_s, int) or isinstance(expires_s, bool)
                                      or expires_s < 1):
            raise TokenFormatError(f"expires must be a positive number of seconds, got {expires_s!r}")
        token, token_id, digest = new_token(ENROLL_PREFIX)
        now = now_ms()
        self._db.execute(
            "INSERT INTO enroll_tokens (token_id, hash, labels, max_uses, expires_at, approve, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (token_id, digest, json.dumps(labels or {}), uses, None if expires_s is None else now + expires_s * 1000,
             int(approve), now))
        log_event(_log, logging.INFO, "token.created", kind="enroll", token_id=token_id, uses=uses,
                  expires_s=expires_s, approve=approve)
        return token, token_id

    def enroll_tokens(self) -> list[EnrollTokenRecord]:
        rows = self._db.execute("SELECT token_id, labels, max_uses, uses, expires_at, approve, revoked, created_at"
                                " FROM enroll_tokens ORDER BY created_at, token_id").fetchall()
        return [EnrollTokenRecord(token_id=r[0], labels=json.loads(r[1]), max_uses=r[2], uses=r[3], expires_at=r[4],
                                  approve=bool(r[5]), revoked=bool(r[6]), created_at=r[7]) for r in rows]

    def revoke_enroll_token(self, token_id: str) -> bool:
        changed = self._db.execute("UPDATE enroll_tokens SET revoked = 1 WHERE token_id = ?", (token_id,)).rowcount
        if changed:
            log_event(_log, logging.INFO, "token.revoked", kind="enroll", token_id=token_id)
        return bool(changed)

    def find_enroll_token(self, token: str) -> tuple[str, dict[str, str], bool, str | None]:
        """(token id, labels, approve, why it cannot be used or None) for a presented token; raises RemoteError
        (unauthorized) when no such token exists."""
        row = self._db.execute("SELECT token_id, labels, max_uses, uses, expires_at, approve, revoked"
                               " FROM enroll_tokens WHERE hash = ?", (hash_token(token),)).fetchone()
        if row is None:
            raise RemoteError(UNAUTHORIZED, "unauthorized: unknown enrollment token")
        token_id, labels, max_uses, uses, expires_at, approve, revoked = row
        problem = None
        if revoked:
            problem = f"enrollment token {token_id} was revoked"
        elif expires_at is not None and now_ms() >= expires_at:
            problem = f"enrollment token {token_id} expired"
        elif max_uses is not None and uses >= max_uses:
            problem = f"enrollment token {token_id} is used up ({uses} of {max_uses} uses)"
        return token_id, json.loads(labels), bool(approve), problem

    def use_enroll_token(self, token_id: str) -> None:
        self._db.execute("UPDATE enroll_tokens SET uses = uses + 1 WHERE token_id = ?", (token_id,))

    # -- operator tokens --

    def create_operator_token(self, scopes: tuple[str, ...], label: str = "") -> tuple[str, str]:
        for scope in scopes:
            if scope not in SCOPES:
                raise TokenFormatError(f"unknown scope {scope!r} (expected {', '.join(SCOPES)})")
        if not scopes:
            raise TokenFormatError("an operator token needs at least one scope")
        token, token_id, digest = new_token(OPERATOR_PREFIX)
        self.add_operator_token(token, token_id, scopes, label)
        return token, token_id

    def add_operator_token(self, token: str, token_id: str, scopes: tuple[str, ...], label: str) -> None:
        self._db.execute("INSERT INTO operator_tokens (token_id, hash, scopes, label, created_at)"
                         " VALUES (?, ?, ?, ?, ?)", (token_id, hash_token(token), ",".join(scopes), label, now_ms()))
        log_event(_log, logging.INFO, "token.created", kind="operator", token_id=token_id, scopes=",".join(scopes))

    def ensure_operator_token(self, token: str, token_id: str, scopes: tuple[str, ...], label: str) -> None:
        """Make sure `token` (e.g. the one in STATE_DIR/operator-token) is known, with these scopes."""
        digest = hash_token(token)
        row = self._db.execute("SELECT token_id FROM operator_tokens WHERE hash = ?", (digest,)).fetchone()
        if row is None:
            self._db.execute("DELETE FROM operator_tokens WHERE token_id = ?", (token_id,))
            self.add_operator_token(token, token_id, scopes, label)

    def operator_tokens(self) -> list[OperatorTokenRecord]:
        rows = self._db.execute("SELECT token_id, scopes, label, revoked, created_at FROM operator_tokens"
                                " ORDER BY created_at, token_id").fetchall()
        return [OperatorTokenRecord(token_id=r[0], scopes=r[1].split(","), label=r[2], revoked=bool(r[3]),
                                    created_at=r[4]) for r in rows]

    def revoke_operator_token(self, token_id: str) -> bool:
        changed = self._db.execute("UPDATE operator_tokens SET revoked = 1 WHERE token_id = ?", (token_id,)).rowcount
        if changed:
            log_event(_log, logging.INFO, "token.revoked", kind="operator", token_id=token_id)
        return bool(changed)

    def authenticate_operator(self, token: str) -> tuple[str, tuple[str, ...]] | None:
        """(token id, scopes) of a valid operator token, else None."""
        row = self._db.execute("SELECT token_id, scopes, revoked FROM operator_tokens WHERE hash = ?",
                               (hash_token(token),)).fetchone()
        if row is None or row[2]:
            return None
        return row[0], tuple(row[1].split(","))


def _text(params: dict[str, Any], key: str, max_chars: int) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise RemoteError(INVALID_PARAMS, f"enroll: '{key}' must be a non-empty string")
    if len(value) > max_chars:
        raise RemoteError(INVALID_PARAMS, f"enroll: '{key}' is longer than {max_chars} characters")
    return value


def _check_keys(params: dict[str, Any], allowed: frozenset[str], method: str) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise RemoteError(INVALID_PARAMS, f"{method}: unknown parameter '{unknown[0]}'")


class Enroller:
    """Turns a token and a CSR into an agent id and a client certificate; approves, rejects and revokes agents."""

    def __init__(self, registry: Registry, tokens: TokenStore, ca: _pki.KeyPair, cert_lifetime: dt.timedelta,
                 pending_retry_s: int = DEFAULT_PENDING_RETRY_S) -> None:
        self._registry = registry
        self._db = registry.db
        self._tokens = tokens
        self._ca = ca
        self.cert_lifetime = cert_lifetime
        self.pending_retry_s = pending_retry_s

    def _csr(self, params: dict[str, Any], method: str) -> Any:
        try:
            return _pki.load_csr(params.get("csr"))  # type: ignore[arg-type]
        except _pki.CsrError as exc:
            raise RemoteError(INVALID_PARAMS, f"{method}: {exc}") from None

    def request(self, params: dict[str, Any], peer: str) -> dict[str, Any]:
        """`enroll.request`: the result `{agent_id, certificate, ca, not_after}`; raises RemoteError: unauthorized
        (bad token, rejected, revoked), ENROLLMENT_PENDING (with data agent_id, retry_after), invalid_params."""
        m = "enroll.request"
        _check_keys(params, ENROLL_KEYS, m)
        token = _text(params, "token", 1024)
        name = _text(params, "name", MAX_NAME_CHARS)
        labels = params.get("labels", {})
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise RemoteError(INVALID_PARAMS, f"{m}: 'labels' must be an object of strings")
        csr = self._csr(params, m)
        token_id, token_labels, approve, problem = self._tokens.find_enroll_token(token)
        fp = _pki.public_key_fingerprint(csr)
        row = self._db.execute("SELECT agent_id, status, token_id FROM agents WHERE pubkey_fp = ?", (fp,)).fetchone()
        if row is not None:
            agent_id, status, first_token = row
            if first_token != token_id:
                raise RemoteError(UNAUTHORIZED, "unauthorized: this key was enrolled with another token")
            return self._outcome(agent_id, status, csr, peer)
        if problem is not None:
            raise RemoteError(UNAUTHORIZED, f"unauthorized: {problem}")
        agent_id = uuid.uuid4().hex
        status = "pending" if approve else "active"
        now = now_ms()
        all_labels = {**labels, **token_labels}  # the operator's labels win over the agent's
        with self._db:
            self._db.execute("BEGIN")
            self._tokens.use_enroll_token(token_id)
            self._db.execute(
                "INSERT INTO agents (agent_id, name, labels, first_seen, last_seen, connected, status, pubkey_fp,"
                " token_id) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (agent_id, name, json.dumps(all_labels), now, now, status, fp, token_id))
        log_event(_log, logging.INFO, "enroll.accepted" if status == "active" else "enroll.pending",
                  agent=agent_id, name=name, token_id=token_id, peer=peer)
        return self._outcome(agent_id, status, csr, peer)

    def _outcome(self, agent_id: str, status: str, csr: Any, peer: str) -> dict[str, Any]:
        if status == "pending":
            raise RemoteError(ENROLLMENT_PENDING, f"enrollment pending: agent {agent_id} waits for an operator "
                              f"(`pyagent agents approve {agent_id}`)",
                              {"agent_id": agent_id, "retry_after": self.pending_retry_s})
        if status == "rejected":
            log_event(_log, logging.WARNING, "enroll.refused", agent=agent_id, peer=peer, reason="rejected")
            raise RemoteError(UNAUTHORIZED, f"unauthorized: enrollment of agent {agent_id} was rejected by an "
                              "operator")
        if status == "revoked":
            log_event(_log, logging.WARNING, "enroll.refused", agent=agent_id, peer=peer, reason="revoked")
            raise RemoteError(UNAUTHORIZED, f"unauthorized: agent {agent_id} is revoked")
        issued = self._issue(agent_id, csr)
        log_event(_log, logging.INFO, "enroll.issued", agent=agent_id, peer=peer,
                  not_after=dt.datetime.fromtimestamp(issued.not_after_ms / 1000, dt.timezone.utc).isoformat())
        return self._result(issued)

    def _issue(self, agent_id: str, csr: Any) -> Issued:
        cert = _pki.issue_client_cert(self._ca, csr, agent_id, self.cert_lifetime)
        not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
        self._db.execute("UPDATE agents SET cert_serial = ?, cert_not_after = ?, pubkey_fp = ? WHERE agent_id = ?",
                         (format(cert.serial_number, "x"), not_after, _pki.public_key_fingerprint(csr), agent_id))
        return Issued(agent_id, cert.public_bytes(serialization.Encoding.PEM).decode("ascii"), not_after)

    def _result(self, issued: Issued) -> dict[str, Any]:
        return {"agent_id": issued.agent_id, "certificate": issued.cert_pem, "not_after": issued.not_after_ms,
                "ca": self._ca.cert_pem().decode("ascii")}

    def renew(self, agent_id: str, params: dict[str, Any], peer: str) -> dict[str, Any]:
        """`enroll.renew` over an authenticated session: a new certificate for the same agent on a (new) key."""
        m = "enroll.renew"
        _check_keys(params, RENEW_KEYS, m)
        csr = self._csr(params, m)
        status = self.status(agent_id)
        if status != "active":
            raise RemoteError(UNAUTHORIZED, f"unauthorized: agent {agent_id} is {status or 'unknown'}")
        fp = _pki.public_key_fingerprint(csr)
        other = self._db.execute("SELECT agent_id FROM agents WHERE pubkey_fp = ? AND agent_id != ?",
                                 (fp, agent_id)).fetchone()
        if other is not None:
            raise RemoteError(UNAUTHORIZED, "unauthorized: this key belongs to another agent")
        issued = self._issue(agent_id, csr)
        log_event(_log, logging.INFO, "cert.renewed", agent=agent_id, peer=peer,
                  not_after=dt.datetime.fromtimestamp(issued.not_after_ms / 1000, dt.timezone.utc).isoformat())
        return self._result(issued)

    # -- operator decisions --

    def status(self, agent_id: str) -> str | None:
        row = self._db.execute("SELECT status FROM agents WHERE agent_id = ?", (agent_id,)).fetchone()
        return None if row is None else str(row[0])

    def set_status(self, agent_id: str, status: str) -> str:
        """Approve (pending -> active), reject (pending -> rejected) or revoke (any -> revoked); returns the old
        status. Raises KeyError for an unknown agent, ValueError for a transition that makes no sense."""
        old = self.status(agent_id)
        if old is None:
            raise KeyError(agent_id)
        allowed = {"active": ("pending",), "rejected": ("pending",), "revoked": AGENT_STATUSES}[status]
        if old not in allowed:
            raise ValueError(f"agent {agent_id} is {old}; only {' or '.join(allowed)} agents can be "
                             f"{'approved' if status == 'active' else status}")
        self._db.execute("UPDATE agents SET status = ? WHERE agent_id = ?", (status, agent_id))
        log_event(_log, logging.INFO, "agent.status", agent=agent_id, old=old, new=status)
        return old


