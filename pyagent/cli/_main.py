"""The `pyagent` command line: argument parsing and dispatch to one module per command group."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pyagent
from pyagent.cli._agents import run_ls, run_show
from pyagent.cli._call import run_call
from pyagent.cli._crashes import add_crash_commands
from pyagent.cli._control import add_control_commands
from pyagent.cli._describe import run_describe
from pyagent.cli._events import add_events_command
from pyagent.cli._demo import run_demo
from pyagent.cli._errors import EXIT_FAILED, EXIT_INTERRUPTED, CliError
from pyagent.cli._release import add_release_commands
from pyagent.cli._rollout import add_rollout_commands
from pyagent.cli._serve import add_serve_arguments, run_serve
from pyagent.cli._updates import add_updates_commands
from pyagent.cli._tokens import add_agent_status_commands, add_token_commands


STATE_DIR_HELP = ("the endpoint's state directory (default: $PYAGENT_STATE_DIR or "
                  "~/.local/state/pyagent/endpoint)")
API_URL_HELP = ("operator API URL (default: $PYAGENT_API, else read from STATE_DIR/endpoint.json); the token comes "
                "from $PYAGENT_TOKEN, else STATE_DIR/operator-token")


def _client_options() -> argparse.ArgumentParser:
    """--state-dir/--api after the command too (`pyagent agents ls --state-dir D`); SUPPRESS keeps a value given
    before the command (`pyagent --state-dir D agents ls`) from being reset by the subcommand's default."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("finding the endpoint")
    group.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR", help=STATE_DIR_HELP)
    group.add_argument("--api", default=argparse.SUPPRESS, metavar="URL", help=API_URL_HELP)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyagent", description="Operate a pyagent endpoint and its agents.")
    parser.add_argument("--version", action="version", version=f"pyagent {pyagent.__version__}")
    parser.add_argument("--state-dir", type=Path, default=None, metavar="DIR", help=STATE_DIR_HELP)
    parser.add_argument("--api", default=None, metavar="URL", help=API_URL_HELP)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    client = _client_options()

    endpoint = commands.add_parser("endpoint", help="run the endpoint")
    endpoint_commands = endpoint.add_subparsers(dest="endpoint_command", metavar="COMMAND", required=True)
    serve = endpoint_commands.add_parser("serve", help="serve agents and the operator API until SIGINT/SIGTERM")
    add_serve_arguments(serve)
    serve.set_defaults(handler=run_serve)

    agents = commands.add_parser("agents", help="list and inspect agents")
    agents_commands = agents.add_subparsers(dest="agents_command", metavar="COMMAND", required=True)
    ls = agents_commands.add_parser("ls", parents=[client], help="list the agents the endpoint knows")
    ls.add_argument("--json", action="store_true", help='print {"agents": [...]} as JSON')
    ls.set_defaults(handler=run_ls)
    show = agents_commands.add_parser("show", parents=[client], help="show one agent")
    show.add_argument("agent", metavar="ID", help="agent id, unique id prefix, or name")
    show.add_argument("--json", action="store_true", help="print the agent record as JSON")
    show.set_defaults(handler=run_show)
    add_agent_status_commands(agents_commands, client)
    add_token_commands(commands, client)
    add_crash_commands(commands, client)
    add_release_commands(commands, client)

    call = commands.add_parser(
        "call", parents=[client], help="call a method of an agent object",
        description="Call OBJECT.METHOD on an agent. Parameters are key=value; a value is read as JSON when it "
                    "parses (n=5, on=true, tags='[\"a\"]'), else as a string (name=world).",
        epilog="exit status: 0 result, 1 error from the agent or endpoint, 2 usage, 3 endpoint unreachable")
    call.add_argument("target", metavar="TARGET", help="agent id or name, or a selector: group:NAME, "
                      "env=prod,role=web, capability:NAME or * (per-agent results)")
    call.add_argument("method", metavar="OBJECT.METHOD", help="e.g. hello.greet")
    call.add_argument("params", nargs="*", metavar="KEY=VALUE")
    call.add_argument("--json", action="store_true", help='print the whole {"result": ...} or {"error": ...}')
    call.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="default: %(default)s")
    call.add_argument("--concurrency", type=int, default=None, metavar="N",
                      help="with a selector: at most N calls at a time (default 64)")
    call.set_defaults(handler=run_call)

    describe = commands.add_parser("describe", parents=[client], help="show the methods, config and capabilities "
                                   "an agent published")
    describe.add_argument("target", metavar="TARGET", help="agent id or name")
    describe.add_argument("object", metavar="OBJECT", nargs="?", help="only this agent object")
    describe.add_argument("--json", action="store_true", help="print the interface as a JSON Schema document")
    describe.set_defaults(handler=run_describe)
    add_events_command(commands, client)
    add_control_commands(commands, client)
    add_rollout_commands(commands, client)
    add_updates_commands(commands, client)

    demo = commands.add_parser("demo", help="start an endpoint and a real agent, call hello.greet, stop both")
    demo.add_argument("--keep", action="store_true", help="keep the demo's files (configs, logs) afterwards")
    demo.set_defaults(handler=run_demo)

    from pyagent.cli._package import add_package_arguments, run_package
    package = commands.add_parser(
        "package", help="build a .deb or .rpm of the agent for an endpoint (nfpm)",
        description="Build a ready-to-install agent package: the host, the runtime, the bundles, a hardened systemd "
                    "unit and /etc/pyagent/agent.toml filled in for the endpoint. Prints the package's path.",
        epilog="exit status: 0 built, 1 build failed, 2 usage. See docs/installers.md")
    add_package_arguments(package)
    package.set_defaults(handler=run_package)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except CliError as exc:
        print(f"pyagent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILED


__all__ = ["build_parser", "main"]
