"""pyagent.runtime.worker: arguments, exit codes, the hello params and host config, and a whole run."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from runtime_helpers import HELLO_BUNDLE, REPO, BundleFactory

from pyagent.runtime import FakeHost, load_bundles, load_config
from pyagent.runtime.worker import Args, _UsageError, build_hello_params, build_host_config, main, parse_args

WriteConfig = Callable[[str], Path]


def agent_toml(tmp_path: Path, *bundles: Path, extra: str = "") -> str:
    listed = ", ".join(json.dumps(str(b)) for b in bundles)
    return textwrap.dedent(f"""\
        name = "test-agent"
        state_dir = "{tmp_path / 'state'}"
        endpoints = ["127.0.0.1:7443", "[::1]:7444"]
        ca = "ca.pem"
        token = "tok"
        auth = "shared-token"
        bundles = [{listed}]
        labels = {{ env = "test" }}
        {extra}
    """)


@pytest.mark.parametrize(("argv", "expected"), [
    ([], Args()),
    (["--foreground"], Args(foreground=True)),
    (["--config", "/x.toml", "check-config"], Args(config="/x.toml", command="check-config")),
    (["check-config", "--config=/y.toml", "--foreground"], Args(config="/y.toml", foreground=True,
                                                                 command="check-config")),
    (["--help"], Args(help=True)),
])
def test_parse_args(argv: list[str], expected: Args) -> None:
    assert parse_args(argv) == expected


@pytest.mark.parametrize(("argv", "message"), [
    (["--config"], "--config needs a FILE"),
    (["--config="], "--config needs a FILE"),
    (["--bogus"], "unknown option '--bogus'"),
    (["serve"], "unknown command 'serve'"),
    (["check-config", "check-config"], "unexpected argument 'check-config'"),
])
def test_parse_args_errors(argv: list[str], message: str) -> None:
    with pytest.raises(_UsageError, match=message):
        parse_args(argv)


def test_bad_usage_exits_2(fake_host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"], host=fake_host) == 2
    err = capsys.readouterr().err
    assert "pyagent-host: unknown option '--bogus'" in err and "usage: pyagent-host" in err


def test_help_and_version(fake_host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], host=fake_host) == 0
    assert capsys.readouterr().out.startswith("usage: pyagent-host")
    assert main(["--version"], host=fake_host) == 0
    assert capsys.readouterr().out == "pyagent-host 0.0.0-fake\n"


def test_bad_config_exits_2_naming_file_and_key(fake_host: FakeHost, write_config: WriteConfig,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config('endpoint = ["127.0.0.1:7443"]\nca = "ca.pem"\n')
    assert main(["--config", str(path)], host=fake_host, environ={}) == 2
    assert capsys.readouterr().err == (f"pyagent-host: config error: {path}: unknown key 'endpoint' "
                                       "(did you mean 'endpoints'?)\n")
    assert not fake_host.started


def test_missing_config_file_exits_2(fake_host: FakeHost, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "none.toml")], host=fake_host, environ={}) == 2
    assert f"pyagent-host: config error: {tmp_path / 'none.toml'}: cannot read" in capsys.readouterr().err


def test_config_path_from_environment(fake_host: FakeHost, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    env = {"PYAGENT_CONFIG": str(tmp_path / "from-env.toml")}
    assert main([], host=fake_host, environ=env) == 2
    assert "from-env.toml: cannot read" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "flag.toml")], host=fake_host, environ=env) == 2
    assert "flag.toml: cannot read" in capsys.readouterr().err


def test_default_config_path(fake_host: FakeHost, capsys: pytest.CaptureFixture[str]) -> None:
    if Path("/etc/pyagent/agent.toml").exists():  # pragma: no cover
        pytest.skip("an agent config is installed here")
    assert main([], host=fake_host, environ={}) == 2
    assert "/etc/pyagent/agent.toml: cannot read" in capsys.readouterr().err


def test_check_config(fake_host: FakeHost, write_config: WriteConfig, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(agent_toml(tmp_path, HELLO_BUNDLE))
    assert main(["--config", str(path), "check-config"], host=fake_host, environ={}) == 0
    assert capsys.readouterr().out == f"config ok: {path}\n"
    assert not fake_host.started
    assert not (tmp_path / "state").exists()  # check-config creates no identity
    assert any("event=bundle.loaded bundle=hello" in line for _, line in fake_host.logs)


def test_check_config_with_a_broken_bundle(fake_host: FakeHost, write_config: WriteConfig, tmp_path: Path,
                                           make_bundle: BundleFactory, capsys: pytest.CaptureFixture[str]) -> None:
    broken = make_bundle("broken", "class Thing:\n    pass\n")
    path = write_config(agent_toml(tmp_path, HELLO_BUNDLE, broken))
    assert main(["--config", str(path), "check-config"], host=fake_host, environ={}) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyagent-host: config error: {path}: bundle {broken}: agent 'broken': 'mod:Thing' is not")
    assert any("event=bundle.failed" in line and str(broken) in line for _, line in fake_host.logs)


def test_python_path_is_used_for_bundles_and_restored(fake_host: FakeHost, write_config: WriteConfig,
                                                      tmp_path: Path, make_bundle: BundleFactory) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "shared_helper_xyz.py").write_text("NAME = 'helper'\n")
    bundle = make_bundle("uses_lib", "import shared_helper_xyz\n" + textwrap.dedent("""\
        from pyagent.runtime import Agent

        class Thing(Agent):
            pass
    """))
    path = write_config(agent_toml(tmp_path, bundle, extra=f'python_path = ["{lib}"]'))
    before = list(sys.path)
    try:
        assert main(["--config", str(path), "check-config"], host=fake_host, environ={}) == 0
        assert sys.path == before
    finally:
        sys.modules.pop("shared_helper_xyz", None)


def test_identity_error_exits_1(fake_host: FakeHost, write_config: WriteConfig, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "agent-id").write_text("garbage")
    path = write_config(agent_toml(tmp_path))
    assert main(["--config", str(path)], host=fake_host, environ={}) == 1
    assert "agent-id: not a valid agent id" in capsys.readouterr().err
    assert not fake_host.started


def test_host_refusing_config_exits_2(write_config: WriteConfig, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(agent_toml(tmp_path, HELLO_BUNDLE))
    with FakeHost(start_error="cannot load CA") as host:
        assert main(["--config", str(path)], host=host, environ={}) == 2
    assert f"pyagent-host: config error: {path}: the host refused the configuration: cannot load CA" in \
        capsys.readouterr().err


def test_outside_the_host(capsys: pytest.CaptureFixture[str]) -> None:
    assert "_pyagent_host" not in sys.modules
    assert main(["check-config"], environ={}) == 1
    assert "the built-in module _pyagent_host is missing" in capsys.readouterr().err


def test_main_never_raises(fake_host: FakeHost, write_config: WriteConfig, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(agent_toml(tmp_path, HELLO_BUNDLE))

    def explode() -> str:
        raise SystemExit(7)

    fake_host.version = explode  # type: ignore[method-assign]
    assert main(["--config", str(path)], host=fake_host, environ={}) == 7

    def explode2() -> str:
        raise ZeroDivisionError("bug")

    fake_host.version = explode2  # type: ignore[method-assign]
    assert main(["--config", str(path)], host=fake_host, environ={}) == 1
    assert "pyagent-host: internal error:" in capsys.readouterr().err


def test_hello_params_and_host_config(write_config: WriteConfig, tmp_path: Path) -> None:
    config = load_config(write_config(agent_toml(tmp_path, HELLO_BUNDLE, extra='server_name = ""')), environ={})
    bundles = load_bundles(config.bundles)
    hello = build_hello_params(config, "ab" * 16, bundles, "9.9.9")
    interface = hello.pop("interface")
    assert set(interface) == {"hello"} and "greet" in interface["hello"]["methods"]
    assert interface["hello"]["capabilities"] == ["greeting"]
    assert hello == {
        "agent_id": "ab" * 16,
        "name": "test-agent",
        "host": {"version": "9.9.9", "python": platform.python_version()},
        "bundles": [{"name": "hello", "version": "1.0.0", "agents": ["hello"]}],
        "features": {"bundle.call": 1},
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "hostname": socket.gethostname()},
        "labels": {"env": "test"},
    }
    host_config = build_host_config(config, hello)
    assert host_config == {
        "endpoints": [{"host": "127.0.0.1", "port": 7443, "server_name": "127.0.0.1"},
                      {"host": "::1", "port": 7444, "server_name": "::1"}],
        "ca_file": str(config.ca),
        "token": "tok",
        "max_frame_bytes": 1048576,
        "reconnect_min_ms": 500,
        "reconnect_max_ms": 60000,
        "reconnect_stable_ms": 30000,
        "hello": hello,
        "log_level": "info",
    }
    json.dumps(host_config)
    config = load_config(config.path, environ={"PYAGENT_SERVER_NAME": "endpoint.example"})
    assert [e["server_name"] for e in build_host_config(config, hello)["endpoints"]] == ["endpoint.example"] * 2


# A whole worker in a child process: the host's isolation (no site, ssl blocked), FakeHost in place of
# _pyagent_host, real signals. The child prints what it sends, one "SENT" line per send() call, and at the end the
# log lines about signals. Each call in $CALLS (JSON [[agent, method, params], ...]) is injected at start.
CHILD = """\
import json, os, sys
sys.path.insert(0, sys.argv[1])
sys.path.append(os.environ["MSGSPEC_PATH"])  # the host adds its site-packages
sys.modules["ssl"] = None  # as pyagent-host does
from pyagent.runtime import FakeHost
from pyagent.runtime import worker

host = FakeHost()
_start, _send, _stop = host.start, host.send, host.stop

def start(config_json):
    _start(config_json)
    print("STARTED", config_json, flush=True)
    host.session_up(1, "127.0.0.1:7443")
    for i, (agent, method, params) in enumerate(json.loads(os.environ["CALLS"]), 1):
        host.call(1, i, agent, method, params)

def send(data):
    _send(data)
    print("SENT", data.decode().rstrip("\\n").replace("\\n", "|"), flush=True)

def stop(timeout_ms):
    _stop(timeout_ms)
    print("STOPPED", timeout_ms, flush=True)

host.start, host.send, host.stop = start, send, stop
code = worker.main(sys.argv[2:], host=host)
print("LOGS", json.dumps([line for _, line in host.logs if "signal" in line or "abandoned" in line]))
print("EXIT", code, "ssl" in sys.modules and sys.modules["ssl"] is not None, flush=True)
host.close()
os._exit(code)  # skip finalisation: an abandoned task must not be able to delay the exit either
"""

STUBBORN = """\
import asyncio
from pyagent.runtime import Agent, method

class Thing(Agent):
    @method
    async def hang(self) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # ignores cancellation: the runtime must not wait for it forever
"""


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
@pytest.mark.parametrize("stubborn", [False, True], ids=["clean", "stubborn-call"])
def test_whole_run_with_signals(write_config: WriteConfig, tmp_path: Path, make_bundle: BundleFactory,
                                stop_signal: signal.Signals, stubborn: bool) -> None:
    bundles = [HELLO_BUNDLE]
    calls: list[list[object]] = [["hello", "greet", {"name": "child"}]]
    if stubborn:
        bundles.append(make_bundle("stubborn", STUBBORN))
        calls.insert(0, ["stubborn", "hang", {}])
    path = write_config(agent_toml(tmp_path, *bundles))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYAGENT_")}
    env["CALLS"] = json.dumps(calls)
    env["MSGSPEC_PATH"] = str(Path(msgspec.__file__).parents[1])
    child = subprocess.Popen([sys.executable, "-I", "-S", "-c", CHILD, str(REPO), "--config", str(path),
                              "--foreground"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            assert line, f"child ended early: {lines} {child.stderr.read() if child.stderr else ''}"
            lines.append(line.rstrip("\n"))
            if line.startswith("SENT") and '"Hello, child!"' in line:
                break
        started = json.loads(lines[0].removeprefix("STARTED "))
        assert [b["name"] for b in started["hello"]["bundles"]] == ["hello"] + (["stubborn"] if stubborn else [])
        assert len(started["hello"]["agent_id"]) == 32
        assert (tmp_path / "state" / "agent-id").read_text().strip() == started["hello"]["agent_id"]
        assert lines[-1] == f'SENT 1 {{"v":"1","id":{len(calls)},"result":"Hello, child!"}}'
        child.send_signal(signal.SIGHUP)  # logged, nothing else
        time.sleep(0.1)
        assert child.poll() is None
        signalled_at = time.monotonic()
        child.send_signal(stop_signal)
        out, err = child.communicate(timeout=10)
        elapsed = time.monotonic() - signalled_at
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    out_lines = out.splitlines()
    assert out_lines[-1] == "EXIT 0 False"  # exit code 0, ssl never imported
    assert "STOPPED 2000" in out_lines
    logs = json.loads(out_lines[-2].removeprefix("LOGS "))
    assert any("SIGHUP" in line for line in logs)
    assert any(f"{stop_signal.name}: stopping" in line for line in logs)
    assert elapsed < 2.0
    if stubborn:
        # the stubborn call got its error reply before the host stopped
        reply = next(line for line in out_lines if line.startswith("SENT 1") and '"id":1,' in line)
        assert '"code":-32003' in reply and "abandoned" in reply
        assert any("abandoned" in line for line in logs)
    else:
        assert err == ""
