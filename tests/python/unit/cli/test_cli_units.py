"""CLI pieces in-process: key=value parsing, output formatting, finding the API, exit codes."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from pyagent.cli import main
from pyagent.cli._call import describe_error, parse_params
from pyagent.cli._client import find_api
from pyagent.cli._errors import UnreachableError, UsageError
from pyagent.cli._format import ago, agents_table, millis, result_text, short_ids


def test_params_are_json_where_they_parse() -> None:
    assert parse_params(["name=world", "n=5", "x=1.5", "on=true", "off=false", "nothing=null", "tags=[1,\"a\"]",
                         "obj={\"k\":1}", "quoted=\"5\"", "empty=", "eq=a=b", "spaced=hello world"]) == {
        "name": "world", "n": 5, "x": 1.5, "on": True, "off": False, "nothing": None, "tags": [1, "a"],
        "obj": {"k": 1}, "quoted": "5", "empty": "", "eq": "a=b", "spaced": "hello world"}


@pytest.mark.parametrize("bad", [["name"], ["=x"], ["a=1", "a=2"]])
def test_bad_params(bad: list[str]) -> None:
    with pytest.raises(UsageError):
        parse_params(bad)


def test_result_text() -> None:
    assert result_text("Hello, world!") == "Hello, world!"
    assert result_text(5) == "5" and result_text(None) == "null" and result_text(True) == "true"
    assert json.loads(result_text({"a": [1]})) == {"a": [1]}


def test_describe_error() -> None:
    assert describe_error({"code": -32003, "message": "gone"}) == "gone (agent_unavailable -32003)"
    text = describe_error({"code": -32603, "message": "boom", "data": {"type": "ValueError",
                                                                       "traceback": "Traceback...\nValueError"}})
    assert text.startswith("boom (internal_error -32603)\nTraceback...")


def test_short_ids_stay_unique() -> None:
    assert short_ids(["0123456789", "abc"]) == {"0123456789": "01234567", "abc": "abc"}
    ids = short_ids(["aaaaaaaa1111", "aaaaaaaa2222"])
    assert len(set(ids.values())) == 2 and all(len(v) >= 8 for v in ids.values())


def test_human_formats() -> None:
    assert millis(0.214) == "0.21 ms" and millis(None) == "-" and millis(250.4) == "250 ms"
    now = 1_000_000.0
    assert ago(now * 1000, now) == "just now"
    assert ago((now - 42) * 1000, now) == "42s ago"
    assert ago((now - 3 * 3600) * 1000, now) == "3h ago"
    assert ago(None) == "-"
    table = agents_table([{"agent_id": "0123456789abcdef", "name": "web-1", "connected": True,
                           "host_version": "0.1.0", "bundles": [{"name": "hello", "version": "1.0.0"}],
                           "latency_ms": 0.21, "last_seen": None}])
    header, row = table.splitlines()
    assert header.split() == ["ID", "NAME", "STATUS", "CONNECTED", "HOST", "BUNDLES", "LATENCY", "LAST", "SEEN"]
    assert row.split() == ["01234567", "web-1", "active", "yes", "0.1.0", "hello@1.0.0", "0.21", "ms", "-"]


def test_find_api_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PYAGENT_API", "PYAGENT_TOKEN", "PYAGENT_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "endpoint.json").write_text(json.dumps({"pid": 0, "api": "http://127.0.0.1:9/"}))
    (tmp_path / "operator-token").write_text("file-token\n")
    target = find_api(tmp_path)
    assert (target.url, target.token) == ("http://127.0.0.1:9", "file-token")
    assert "not running" in target.hint
    monkeypatch.setenv("PYAGENT_STATE_DIR", str(tmp_path))
    assert find_api().url == "http://127.0.0.1:9"
    monkeypatch.setenv("PYAGENT_API", "http://env:1")
    monkeypatch.setenv("PYAGENT_TOKEN", "env-token")
    assert (find_api().url, find_api().token) == ("http://env:1", "env-token")
    assert find_api(api="http://flag:2").url == "http://flag:2"


def test_find_api_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("PYAGENT_API", "PYAGENT_TOKEN", "PYAGENT_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UnreachableError, match="endpoint.json does not exist"):
        find_api(tmp_path)
    with pytest.raises(UsageError, match="operator-token"):
        find_api(tmp_path, api="http://127.0.0.1:9")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYAGENT_TOKEN", "t")
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["agents", "ls", "--api", url]) == 3
    assert "cannot reach the endpoint API" in capsys.readouterr().err
    assert main(["--api", url, "call", "x", "hello.greet"]) == 3
    assert main(["call", "x", "greet", "--api", url]) == 2
    assert "OBJECT.METHOD" in capsys.readouterr().err
    assert main(["call", "x", "hello.greet", "oops", "--api", url]) == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["endpoint", "serve", "--heartbeat-interval", "soon"])
    assert info.value.code == 2


def test_serve_rejects_bad_addresses(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["endpoint", "serve", "--state-dir", str(tmp_path), "--listen", "nowhere"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["endpoint", "serve", "--state-dir", str(tmp_path), "--listen", "::1:80"]) == 2
    assert "brackets" in capsys.readouterr().err
    assert main(["endpoint", "serve", "--state-dir", str(tmp_path), "--heartbeat-interval", "0"]) == 2
    assert "heartbeat_interval" in capsys.readouterr().err
    assert not (tmp_path / "ca.pem").exists()
