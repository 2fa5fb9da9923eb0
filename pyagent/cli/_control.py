"""`pyagent agent status|pause|resume|stop|restart TARGET [OBJECT]` and `pyagent agent config TARGET OBJECT
[get | set key=value...]`: the control actions every agent answers (docs/protocol.md, "Agent API messages")."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from pyagent.cli._call import describe_error, parse_params, print_results
from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._errors import EXIT_FAILED, EXIT_OK, UsageError

OBJECT_ACTIONS = ("status", "pause", "resume")
PROCESS_ACTIONS = ("stop", "restart")


def add_control_commands(commands: Any, client: argparse.ArgumentParser) -> None:
    agent = commands.add_parser("agent", help="control agents: status, pause, resume, stop, restart, config")
    actions = agent.add_subparsers(dest="agent_action", metavar="ACTION", required=True)
    helps = {"status": "state, periodic tasks and config of agent objects",
             "pause": "stop an object's periodic tasks and refuse its calls (error -32006)",
             "resume": "undo pause", "stop": "stop the agent's worker cleanly (exit 0)",
             "restart": "restart the agent's worker (exit 75: the supervisor starts it again)"}
    for action in (*OBJECT_ACTIONS, *PROCESS_ACTIONS):
        p = actions.add_parser(action, parents=[client], help=helps[action])
        p.add_argument("target", metavar="TARGET", help="agent id, name, group:NAME, env=prod,... or capability:X")
        if action in OBJECT_ACTIONS:
            p.add_argument("object", metavar="OBJECT", nargs="?",
                           help="agent object (default: every object the agent has)")
        _common(p)
        p.set_defaults(handler=run_control, action=action)
    p = actions.add_parser("config", parents=[client], help="get or set an object's config",
                           description="`get` prints the current values; `set k=v ...` changes them (values are "
                                       "JSON where they parse); a bad value is refused naming the field and the old "
                                       "config stays.")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("object", metavar="OBJECT")
    p.add_argument("op", metavar="get|set", nargs="?", default="get", choices=("get", "set"))
    p.add_argument("values", metavar="KEY=VALUE", nargs="*")
    _common(p)
    p.set_defaults(handler=run_config)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="default: %(default)s")


def _objects(client: ApiClient, target: str) -> list[str]:
    if target == "*" or "=" in target or target.partition(":")[0] in ("group", "capability"):
        raise UsageError("name the OBJECT when TARGET selects several agents")
    reply = client.get(f"/api/v1/agents/{urllib.parse.quote(target, safe='')}/interface")
    return sorted(reply.get("agents") or {})


def _report(args: argparse.Namespace, what: str, reply: dict[str, Any], summary: Any = None) -> int:
    if args.json:
        print(json.dumps(reply, indent=2, ensure_ascii=False))
    if "results" in reply:
        return print_results(reply["results"], args.json, what)
    if "error" in reply:
        print(f"pyagent: {what} on {args.target} failed: {describe_error(reply['error'])}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        result = reply.get("result")
        print(summary(result) if summary is not None else json.dumps(result, indent=2, ensure_ascii=False))
    return EXIT_OK


def _status_line(result: Any) -> str:
    if not isinstance(result, dict):
        return json.dumps(result)
    if "state" in result and "agent" in result and "periodic" in result:
        periodic = ", ".join(f"{p['name']} (runs {p['runs']}, next in {p['next_in']} s)" if p.get("running")
                             else f"{p['name']} (stopped, runs {p['runs']})" for p in result["periodic"])
        return (f"{result['agent']}: {result['state']}, {result['calls_running']} calls running"
                + (f"; periodic: {periodic}" if periodic else "") + f"; config {json.dumps(result['config'])}")
    if "agent" in result:
        return f"{result['agent']}: {result.get('state', json.dumps(result.get('values')))}"
    return f"{result.get('state')} (exit code {result.get('exit_code')})"


def run_control(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be in (0, 3600] seconds")
    client = ApiClient(find_api(args.state_dir, args.api))
    method = f"agent.{args.action}"
    if args.action in PROCESS_ACTIONS:
        return _report(args, method, client.call(args.target, method, {}, args.timeout), _status_line)
    objects = [args.object] if args.object else None
    if objects is None:
        objects = _objects(client, args.target)
        if not objects:
            raise UsageError(f"name the OBJECT: the interface of {args.target!r} lists no agent objects")
    code = EXIT_OK
    for obj in objects:
        reply = client.call(args.target, method, {"agent": obj}, args.timeout)
        code = max(code, _report(args, f"{method} {obj}", reply, _status_line))
    return code


def run_config(args: argparse.Namespace) -> int:
    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be in (0, 3600] seconds")
    if args.op == "get" and args.values:
        raise UsageError("`config ... get` takes no KEY=VALUE (did you mean `set`?)")
    if args.op == "set" and not args.values:
        raise UsageError("`config ... set` needs at least one KEY=VALUE")
    client = ApiClient(find_api(args.state_dir, args.api))
    if args.op == "get":
        reply = client.call(args.target, "agent.config.get", {"agent": args.object}, args.timeout)
    else:
        reply = client.call(args.target, "agent.config.set",
                            {"agent": args.object, "values": parse_params(args.values)}, args.timeout)

    def values(result: Any) -> str:
        vals = result.get("values") if isinstance(result, dict) else result
        if not isinstance(vals, dict):
            return json.dumps(vals)
        return "\n".join(f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in vals.items())

    return _report(args, f"agent.config.{args.op} {args.object}", reply, values)
