"""The worker's entry point: `pyagent-host` calls `main(argv)` once the interpreter is up.

    pyagent-host [--version] [--config FILE] [--foreground] [check-config]

`main` never lets an exception (or SystemExit) escape: it returns the process exit code — 0 clean stop, 1 runtime
failure, 2 bad usage or bad config (with a message on stderr naming the file and the problem).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
import sys
import traceback
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pyagent.runtime._bridge import HostModule, import_host
from pyagent.runtime._bundle import Bundle, load_bundles
from pyagent.runtime._config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from pyagent.runtime._errors import BundleError, ConfigError, HostError, IdentityError
from pyagent.runtime._identity import load_or_create_agent_id
from pyagent.runtime._log import LogSetup, log_event
from pyagent.runtime._runtime import Runtime

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

FEATURES = {"bundle.call": 1}
CONFIG_ENV = "PYAGENT_CONFIG"

USAGE = """\
usage: pyagent-host [--version] [--config FILE] [--foreground] [check-config]

  --config FILE   agent config (default: $PYAGENT_CONFIG, else /etc/pyagent/agent.toml)
  --foreground    run the worker without a supervisor (the only mode for now)
  check-config    validate the config and the bundles, print "config ok: FILE" and exit
  --version       print the host version and exit"""

_log = logging.getLogger("pyagent.runtime")


class _UsageError(Exception):
    pass


@dataclass
class Args:
    config: str | None = None
    foreground: bool = False
    command: str | None = None
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
        elif arg == "check-config":
            if args.command is not None:
                raise _UsageError(f"unexpected argument '{arg}'")
            args.command = arg
        elif arg.startswith("-"):
            raise _UsageError(f"unknown option '{arg}'")
        else:
            raise _UsageError(f"unknown command '{arg}'")
        i += 1
    return args


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
    }


def build_host_config(config: AgentConfig, hello: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document for `_pyagent_host.start` (docs/architecture.md, "Host config")."""
    return {
        "endpoints": [{"host": ep.host, "port": ep.port, "server_name": config.server_name_for(ep)}
                      for ep in config.endpoints],
        "ca_file": str(config.ca),
        "token": config.token,
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


def _main(argv: list[str], host: HostModule | None, environ: Mapping[str, str]) -> int:
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
        return EXIT_USAGE

    saved_path = list(sys.path)
    sys.path.extend(str(p) for p in config.python_path if str(p) not in sys.path)
    logs = LogSetup(host.log, config.log_level)
    try:
        try:
            bundles = load_bundles(config.bundles)
        except BundleError as exc:
            _print_err(f"pyagent-host: config error: {config.path}: {exc}")
            log_event(_log, logging.ERROR, "bundle.failed", str(exc))
            return EXIT_USAGE
        if args.command == "check-config":
            _print_out(f"config ok: {config.path}")
            return EXIT_OK
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
            return run_bounded(_serve(host, config, bundles, host_config))
        except HostError as exc:
            _print_err(f"pyagent-host: config error: {config.path}: {exc}")
            log_event(_log, logging.ERROR, "host.start.failed", str(exc))
            return EXIT_USAGE
    finally:
        logs.close()
        sys.path[:] = saved_path


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
                 host_config: Mapping[str, Any]) -> int:
    agents = {name: agent for bundle in bundles for name, agent in bundle.agents.items()}
    runtime = Runtime(host, agents, host_config, max_concurrent_calls=config.limits.max_concurrent_calls,
                      max_frame_bytes=config.limits.max_frame_bytes)
    return await runtime.run()


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
