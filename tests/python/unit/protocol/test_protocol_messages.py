"""Envelope building and checking (pyagent.protocol), shared by the runtime and the endpoint."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyagent.protocol import (
    INVALID_REQUEST,
    VERSION_MISMATCH,
    ProtocolError,
    RemoteError,
    decode,
    encode,
    error_response,
    notification,
    request,
    response,
    validate_message,
)


def test_builders_make_valid_envelopes() -> None:
    for msg in (request(1, "bundle.call", {"a": 1}, source="endpoint", target="x"),
                notification("host.session"),
                response(1, None, source="x", target="endpoint"),
                error_response(None, -32700, "bad", {"k": 1})):
        assert validate_message(decode(encode(msg))) == msg


def test_source_and_target_only_when_given() -> None:
    assert "source" not in request(1, "m") and "target" not in response(1, 2)
    assert request(1, "m", source="s")["source"] == "s"
    assert error_response(1, 1, "m", target="t")["target"] == "t"


def test_encode_is_compact_single_line_utf8() -> None:
    line = encode({"v": "1", "id": 1, "result": "héllo\nworld"})
    assert b"\n" not in line and b" " not in line
    assert decode(line)["result"] == "héllo\nworld"


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"v": "1", "id": 1, "result": float("nan")})


@pytest.mark.parametrize("msg,code,words", [
    ([1], INVALID_REQUEST, "JSON object"),
    ({"id": 1, "method": "m"}, VERSION_MISMATCH, "unsupported protocol version"),
    ({"v": 1, "id": 1, "method": "m"}, VERSION_MISMATCH, "unsupported protocol version"),
    ({"v": "1", "method": ""}, INVALID_REQUEST, "'method'"),
    ({"v": "1", "method": "m", "params": []}, INVALID_REQUEST, "'params'"),
    ({"v": "1", "method": "m", "id": "1"}, INVALID_REQUEST, "'id'"),
    ({"v": "1", "method": "m", "id": True}, INVALID_REQUEST, "'id'"),
    ({"v": "1", "result": 1}, INVALID_REQUEST, "'id'"),
    ({"v": "1", "id": 1}, INVALID_REQUEST, "exactly one"),
    ({"v": "1", "id": 1, "result": 1, "error": {}}, INVALID_REQUEST, "exactly one"),
])
def test_bad_envelopes_name_the_problem(msg: Any, code: int, words: str) -> None:
    with pytest.raises(ProtocolError) as info:
        validate_message(msg)
    assert info.value.code == code and words in info.value.message
    assert info.value.to_error()["code"] == code


def test_version_mismatch_says_what_is_supported() -> None:
    with pytest.raises(ProtocolError) as info:
        validate_message({"v": "2", "id": 1, "method": "m"})
    assert info.value.data == {"supported": ["1"]}


def test_remote_error_from_malformed_error_objects() -> None:
    assert RemoteError.from_error({"code": -32601, "message": "no"}).code == -32601
    odd = RemoteError.from_error("not an object")
    assert odd.code == -32603 and "malformed" in odd.message
    partial = RemoteError.from_error({"code": "x"})
    assert partial.code == -32603 and partial.message == "error without message"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@given(json_values)
def test_validate_never_raises_anything_but_protocol_error(value: Any) -> None:
    """Any decoded JSON is either a valid envelope or a ProtocolError: never another exception."""
    try:
        assert validate_message(value) is value
    except ProtocolError as err:
        assert err.code in (INVALID_REQUEST, VERSION_MISMATCH) and err.message


@given(st.binary(max_size=200))
def test_decode_raises_only_value_error_on_garbage(data: bytes) -> None:
    try:
        decode(data)
    except ValueError:
        pass  # json.JSONDecodeError and UnicodeDecodeError are both ValueError
    except RecursionError:
        pytest.fail("decode recursed on short input")


def test_deep_nesting_is_a_value_error() -> None:
    """json raises RecursionError on deep nesting; decode must turn it into the ValueError its callers handle."""
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(deep)
    with pytest.raises(ValueError, match="nested too deeply"):
        decode(deep)
