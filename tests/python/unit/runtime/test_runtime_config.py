"""pyagent.runtime._config: the agent TOML."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyagent.runtime import AgentConfig, ConfigError, Endpoint, Limits, Reconnect, load_config, parse_endpoint

WriteConfig = Callable[[str], Path]

MINIMAL = """\
endpoints = ["127.0.0.1:7443"]
ca = "ca.pem"
"""


def test_defaults(write_config: WriteConfig) -> None:
    path = write_config(MINIMAL)
    config = load_config(path, environ={})
    assert config == AgentConfig(
        path=path, name=socket.gethostname(), state_dir=Path("/var/lib/pyagent"),
        endpoints=(Endpoint("127.0.0.1", 7443),), ca=path.parent / "ca.pem", server_name="", token="",
    )
    assert config.bundles == () and config.python_path == () and dict(config.labels) == {}
    assert config.log_level == "info"
    assert config.limits == Limits(max_frame_bytes=1048576, max_concurrent_calls=64)
    assert config.reconnect == Reconnect(min_ms=500, max_ms=60000, stable_ms=30000)
    assert config.server_name_for(config.endpoints[0]) == "127.0.0.1"


def test_every_key(write_config: WriteConfig, tmp_path: Path) -> None:
    (tmp_path / "etc" / "lib").mkdir(parents=True)
    path = write_config("""\
        name = "web-1"
        state_dir = "state"
        endpoints = ["a.example:7443", "[::1]:7444", "10.0.0.1:1"]
        ca = "ca.pem"
        server_name = "endpoint.example"
        token = "secret"
        bundles = ["bundles/hello", "/abs/other"]
        labels = { env = "dev", role = "web" }
        log_level = "DEBUG"
        python_path = ["lib"]

        [limits]
        max_frame_bytes = 65536
        max_concurrent_calls = 8

        [reconnect]
        min_ms = 100
        max_ms = 1000
        stable_ms = 0
    """)
    etc = path.parent
    config = load_config(path, environ={})
    assert config.name == "web-1"
    assert config.state_dir == etc / "state"
    assert config.endpoints == (Endpoint("a.example", 7443), Endpoint("::1", 7444), Endpoint("10.0.0.1", 1))
    assert [str(e) for e in config.endpoints] == ["a.example:7443", "[::1]:7444", "10.0.0.1:1"]
    assert config.server_name_for(config.endpoints[1]) == "endpoint.example"
    assert config.token == "secret"
    assert "secret" not in repr(config)
    assert config.bundles == (etc / "bundles" / "hello", Path("/abs/other"))
    assert dict(config.labels) == {"env": "dev", "role": "web"}
    assert config.log_level == "debug"
    assert config.python_path == (etc / "lib",)
    assert config.limits == Limits(65536, 8)
    assert config.reconnect == Reconnect(100, 1000, 0)


@pytest.mark.parametrize(("text", "message"), [
    ('endpoint = ["a:1"]\n', "unknown key 'endpoint' (did you mean 'endpoints'?)"),
    ('endpoints = ["a:1"]\nfrobnicate = 1\n', "unknown key 'frobnicate'"),
    ('endpoints = ["a:1"]\n[limits]\nmax_calls = 3\n',
     "unknown key 'limits.max_calls' (did you mean 'limits.max_concurrent_calls'?)"),
    ('endpoints = ["a:1"]\n[reconnect]\nmin = 3\n', "unknown key 'reconnect.min' (did you mean 'reconnect.min_ms'?)"),
    ('endpoints = ["a:1"]\nlimits = 3\n', "key 'limits' must be a table, got integer"),
])
def test_unknown_keys_are_named(write_config: WriteConfig, text: str, message: str) -> None:
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value) == f"{path}: {message}"


@pytest.mark.parametrize(("text", "message"), [
    ('endpoints = "a:1"\n', "key 'endpoints' must be an array of strings, got string"),
    ('endpoints = [1]\n', "key 'endpoints'[0] must be a string, got integer"),
    ('endpoints = []\n', "key 'endpoints' must list at least one endpoint"),
    ('endpoints = ["a:1", "a:1"]\n', "key 'endpoints'[1]: duplicate endpoint 'a:1'"),
    ('', "missing key 'endpoints'"),
    ('endpoints = ["a:1"]\nname = 3\n', "key 'name' must be a string, got integer"),
    ('endpoints = ["a:1"]\nname = ""\n', "key 'name' must be 1 to 255 printable characters"),
    ('endpoints = ["a:1"]\ntoken = true\n', "key 'token' must be a string, got boolean"),
    ('endpoints = ["a:1"]\nlog_level = "loud"\n', "key 'log_level' must be one of debug, info, warning, error"),
    ('endpoints = ["a:1"]\nlabels = { env = 1 }\n', "key 'labels.env' must be a string, got integer"),
    ('endpoints = ["a:1"]\nlabels = ["x"]\n', "key 'labels' must be a table of strings, got array"),
    ('endpoints = ["a:1"]\nbundles = [""]\n', "key 'bundles'[0] must not be empty"),
    ('endpoints = ["a:1"]\npython_path = ["nope"]\n', "key 'python_path'[0]: not found"),
    ('endpoints = ["a:1"]\nca = "missing.pem"\n', "key 'ca': CA file not found"),
    ('endpoints = ["a:1"]\nstate_dir = 7\n', "key 'state_dir' must be a string, got integer"),
    ('endpoints = ["a:1"]\n[limits]\nmax_frame_bytes = "1"\n',
     "key 'limits.max_frame_bytes' must be an integer, got string"),
    ('endpoints = ["a:1"]\n[limits]\nmax_frame_bytes = 10\n',
     "key 'limits.max_frame_bytes' must be between 4096 and 268435456, got 10"),
    ('endpoints = ["a:1"]\n[limits]\nmax_concurrent_calls = 0\n', "key 'limits.max_concurrent_calls' must be between"),
    ('endpoints = ["a:1"]\n[limits]\nmax_concurrent_calls = true\n',
     "key 'limits.max_concurrent_calls' must be an integer, got boolean"),
    ('endpoints = ["a:1"]\n[reconnect]\nmin_ms = 1.5\n', "key 'reconnect.min_ms' must be an integer, got float"),
    ('endpoints = ["a:1"]\n[reconnect]\nmin_ms = 5000\nmax_ms = 1000\n',
     "key 'reconnect.max_ms' (1000) must not be less than 'reconnect.min_ms' (5000)"),
    ('endpoints = ["a:1"\n', "invalid TOML"),
])
def test_bad_values_name_the_key(write_config: WriteConfig, text: str, message: str) -> None:
    if "ca =" not in text:
        text = 'ca = "ca.pem"\n' + text  # top-level keys come before tables
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.toml: cannot read the config file: No such file"):
        load_config(tmp_path / "agent.toml", environ={})


def test_default_ca_must_exist(write_config: WriteConfig) -> None:
    path = write_config('endpoints = ["a:1"]\n')
    if Path("/etc/pyagent/ca.pem").exists():  # pragma: no cover - a machine with pyagent installed
        pytest.skip("/etc/pyagent/ca.pem exists here")
    with pytest.raises(ConfigError, match="key 'ca': CA file not found: /etc/pyagent/ca.pem"):
        load_config(path, environ={})


def test_environment_overrides(write_config: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(MINIMAL + 'token = "from-file"\nname = "file"\n')
    (tmp_path / "other-ca.pem").write_text("x")
    monkeypatch.chdir(tmp_path)
    env = {
        "PYAGENT_TOKEN": "from-env",
        "PYAGENT_NAME": "env-name",
        "PYAGENT_LOG_LEVEL": "warning",
        "PYAGENT_ENDPOINTS": " a:1 , [::1]:2",
        "PYAGENT_STATE_DIR": "relative-state",
        "PYAGENT_CA": "other-ca.pem",
        "PYAGENT_SERVER_NAME": "sni.example",
        "PYAGENT_CONFIG": "ignored: not a key",
        "PYAGENT_UNRELATED": "ignored",
    }
    config = load_config(path, environ=env)
    assert config.token == "from-env"
    assert config.name == "env-name"
    assert config.log_level == "warning"
    assert config.endpoints == (Endpoint("a", 1), Endpoint("::1", 2))
    assert config.state_dir == tmp_path / "relative-state"  # relative to the current directory
    assert config.ca == tmp_path / "other-ca.pem"
    assert config.server_name == "sni.example"


def test_environment_override_errors_name_the_variable(write_config: WriteConfig) -> None:
    path = write_config(MINIMAL)
    with pytest.raises(ConfigError, match=r"PYAGENT_LOG_LEVEL \(environment\) must be one of"):
        load_config(path, environ={"PYAGENT_LOG_LEVEL": "verbose"})
    with pytest.raises(ConfigError, match=r"PYAGENT_ENDPOINTS \(environment\)\[1\]: 'b' has no port"):
        load_config(path, environ={"PYAGENT_ENDPOINTS": "a:1,b"})


def test_os_environ_is_the_default(write_config: WriteConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYAGENT_TOKEN", "os-env")
    assert load_config(write_config(MINIMAL)).token == "os-env"


def test_relative_config_path(write_config: WriteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(MINIMAL + 'state_dir = "s"\n')
    monkeypatch.chdir(path.parent)
    config = load_config("agent.toml", environ={})
    assert config.path == path and config.state_dir == path.parent / "s"


@pytest.mark.parametrize(("text", "expected"), [
    ("localhost:7443", Endpoint("localhost", 7443)),
    ("127.0.0.1:1", Endpoint("127.0.0.1", 1)),
    ("[::1]:65535", Endpoint("::1", 65535)),
    ("[fe80::1%eth0]:7443", Endpoint("fe80::1%eth0", 7443)),
    ("a-b.example.com.:80", Endpoint("a-b.example.com.", 80)),
])
def test_parse_endpoint(text: str, expected: Endpoint) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty endpoint"),
    ("localhost", "has no port"),
    (":7443", "has no host"),
    ("::1:7443", "an IPv6 address needs brackets"),
    ("[::1]", "has no port"),
    ("[::1:7443", "no closing ']'"),
    ("[abc]:1", "'abc' is not an IPv6 address"),
    ("[]:1", "'' is not an IPv6 address"),
    ("host:port", "port 'port' is not a number"),
    ("host:", "port '' is not a number"),
    ("host:0", "port 0 is out of range"),
    ("host:65536", "port 65536 is out of range"),
    ("host:٣", "is not a number"),
    ("bad host:1", "is not a valid host name"),
    ("-bad:1", "is not a valid host name"),
    ("a..b:1", "is not a valid host name"),
])
def test_parse_endpoint_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_endpoint(text)


@given(st.text(max_size=40))
def test_parse_endpoint_never_crashes(text: str) -> None:
    try:
        endpoint = parse_endpoint(text)
    except ValueError:
        return
    assert 1 <= endpoint.port <= 65535
    assert parse_endpoint(str(endpoint)) == endpoint


def test_config_is_frozen(write_config: WriteConfig) -> None:
    config = load_config(write_config(MINIMAL), environ={})
    with pytest.raises(AttributeError):
        config.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.labels["x"] = "y"  # type: ignore[index]
    assert os.path.isabs(config.path)
