"""Token store, token text formats and the agent-facing parsers, with hypothesis for the parsers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pyagent.endpoint._enroll import TokenStore
from pyagent.endpoint._framing import FrameSplitter
from pyagent.endpoint._params import parse_heartbeat, parse_hello
from pyagent.endpoint._registry import Registry
from pyagent.endpoint._tokens import (
    TokenFormatError,
    hash_token,
    parse_duration,
    parse_label,
    parse_scopes,
    scope_allows,
)
from pyagent.protocol import ProtocolError, RemoteError

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=20)


def test_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("30s") == 30 and parse_duration("15m") == 900 and parse_duration("2h") == 7200
    assert parse_duration("7d") == 7 * 86400 and parse_duration("1w") == 7 * 86400
    assert parse_duration("1h30m") == 5400 and parse_duration(" 2H ") == 7200
    for bad in ("", "0", "0s", "soon", "1x", "h1", "1h 30m", "-5m", "1.5h", "99999999d"):
        with pytest.raises(TokenFormatError, match="duration"):
            parse_duration(bad)


@given(st.text(max_size=20))
@example("¹")  # str.isdigit() is true of it, int() is not: found by this test
@example("٣m")  # a non-ASCII digit before a unit
def test_duration_never_crashes(text: str) -> None:
    try:
        value = parse_duration(text)
    except TokenFormatError:
        return
    assert 0 < value <= 10 * 365 * 86400


@given(st.lists(st.tuples(st.integers(0, 500), st.sampled_from("smhdw")), min_size=1, max_size=4))
def test_duration_sums_its_parts(parts: list[tuple[int, str]]) -> None:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    total = sum(n * units[u] for n, u in parts)
    text = "".join(f"{n}{u}" for n, u in parts)
    if total == 0 or total > 10 * 365 * 86400:
        with pytest.raises(TokenFormatError):
            parse_duration(text)
    else:
        assert parse_duration(text) == total


@given(st.text(max_size=40))
def test_labels_and_scopes_never_crash(text: str) -> None:
    for parse in (parse_label, parse_scopes):
        try:
            parse(text)
        except TokenFormatError:
            pass


def test_labels_and_scopes() -> None:
    assert parse_label("env=prod") == ("env", "prod") and parse_label("a=") == ("a", "")
    for bad in ("env", "=x", "-a=b", "a b=c"):
        with pytest.raises(TokenFormatError, match="label"):
            parse_label(bad)
    assert parse_scopes("call,read") == ("read", "call")
    with pytest.raises(TokenFormatError, match="unknown scope 'root'"):
        parse_scopes("read,root")
    assert scope_allows(("admin",), "call") and scope_allows(("call",), "read")
    assert not scope_allows(("read",), "call") and not scope_allows(("call",), "admin")


def test_token_store_hashes_and_limits(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "db")
    store = TokenStore(registry.db)
    token, token_id = store.create_enroll_token(uses=2, expires_s=3600, labels={"env": "t"})
    assert token.startswith("pae_") and len(token) > 40
    registry.flush()
    assert token.encode() not in (tmp_path / "db").read_bytes() and hash_token(token) != token
    assert store.find_enroll_token(token) == (token_id, {"env": "t"}, False, None)
    store.use_enroll_token(token_id)
    store.use_enroll_token(token_id)
    assert "used up (2 of 2 uses)" in str(store.find_enroll_token(token)[3])
    with pytest.raises(RemoteError, match="unknown enrollment token"):
        store.find_enroll_token(token + "x")
    other, other_id = store.create_enroll_token(expires_s=1)
    registry.db.execute("UPDATE enroll_tokens SET expires_at = ? WHERE token_id = ?",
                        (int(time.time() * 1000) - 1, other_id))
    assert "expired" in str(store.find_enroll_token(other)[3])
    assert store.revoke_enroll_token(other_id) and not store.revoke_enroll_token("nope")
    assert "revoked" in str(store.find_enroll_token(other)[3])
    op, op_id = store.create_operator_token(("read",), "ci")
    assert store.authenticate_operator(op) == (op_id, ("read",))
    assert store.authenticate_operator(op[:-1]) is None
    store.revoke_operator_token(op_id)
    assert store.authenticate_operator(op) is None
    with pytest.raises(TokenFormatError):
        store.create_enroll_token(uses=0)
    registry.close()


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["agent_id", "name", "token", "host", "bundles", "features", "platform",
                                        "labels", "other"]), JSON, max_size=8))
def test_parse_hello_never_crashes(params: dict[str, Any]) -> None:
    try:
        info = parse_hello(params)
    except ProtocolError as exc:
        assert exc.code == -32602 and exc.message.startswith("handshake.hello: ")
        return
    assert info.agent_id and info.name


@given(st.dictionaries(st.sampled_from(["timestamp", "seq", "rtt_ms", "skew_ms", "py_lag_ms", "x"]), JSON))
def test_parse_heartbeat_never_crashes(params: dict[str, Any]) -> None:
    try:
        parse_heartbeat(params)
    except ProtocolError as exc:
        assert exc.code == -32602


@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(1, 32))
def test_frame_splitter_matches_a_reference(chunks: list[bytes], limit: int) -> None:
    splitter = FrameSplitter(limit)
    frames: list[bytes] = []
    for chunk in chunks:
        frames += splitter.feed(chunk)
        if splitter.overflow:
            break
    data = b"".join(chunks)
    lines = data.split(b"\n")
    complete, rest = lines[:-1], lines[-1]
    expected: list[bytes] = []
    overflow = False
    for line in complete:
        if len(line) > limit:
            overflow = True
            break
        if line:
            expected.append(line)
    if not overflow and len(rest) > limit:
        overflow = True
    assert splitter.overflow == overflow
    if not overflow:
        assert frames == expected
    else:
        assert frames == expected[:len(frames)]
