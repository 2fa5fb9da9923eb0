"""`pyagent updates ls|pin|unpin|opt-out|opt-in`: per-agent update state and policy (docs/updates.md §4)."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from typing import Any

from pyagent._updatenames import HOST_NAME
from pyagent.cli._client import DEFAULT_HTTP_TIMEOUT, ApiClient, find_api
from pyagent.cli._errors import EXIT_OK, ApiError, CliError
from pyagent.cli._format import ago, table
from pyagent.cli._rollout import parse_bundle_spec


def add_updates_commands(commands: Any, client: argparse.ArgumentParser) -> None:
    updates = commands.add_parser("updates", help="per-agent update states, pins and opt-out")
    sub = updates.add_subparsers(dest="updates_command", metavar="COMMAND", required=True)
    ls = sub.add_parser("ls", parents=[client], help="the last update state of every agent and target")
    ls.add_argument("--json", action="store_true", help='print {"updates": [...], "policies": {...}} as JSON')
    ls.set_defaults(handler=run_updates_ls)
    pin = sub.add_parser("pin", parents=[client], help="keep an agent at a version: rollouts of other versions "
                         "of that target skip it")
    pin.add_argument("agent", metavar="AGENT", help="agent id or name")
    what = pin.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", metavar="NAME==VERSION")
    what.add_argument("--host", metavar="VERSION")
    pin.set_defaults(handler=run_updates_pin)
    unpin = sub.add_parser("unpin", parents=[client], help="remove an agent's pins (all, or of one target)")
    unpin.add_argument("agent", metavar="AGENT", help="agent id or name")
    which = unpin.add_mutually_exclusive_group()
    which.add_argument("--bundle", metavar="NAME", help="only this bundle's pin")
    which.add_argument("--host", action="store_true", help="only the host's pin")
    unpin.set_defaults(handler=run_updates_unpin)
    for name, value in (("opt-out", True), ("opt-in", False)):
        cmd = sub.add_parser(name, parents=[client], help="rollouts skip this agent" if value else
                             "rollouts include this agent again")
        cmd.add_argument("agent", metavar="AGENT", help="agent id or name")
        cmd.set_defaults(handler=run_updates_opt, opt_out=value)


def _agent_path(ref: str, tail: str) -> str:
    return f"/api/v1/agents/{urllib.parse.quote(ref, safe='')}/{tail}"


def _checked(exc: ApiError) -> CliError:
    return CliError(str(exc)) if 400 <= exc.status < 500 else exc


def describe_policy(agent: str, reply: dict[str, Any]) -> str:
    pins = ", ".join(f"{k.split(':', 1)[1]} {v}" for k, v in sorted(reply.get("pins", {}).items())) or "none"
    return f"agent {agent}: {'opted out of updates' if reply.get('opt_out') else 'takes updates'}; pins: {pins}"


def run_updates_ls(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    body = client.get("/api/v1/updates")
    if args.json:
        print(json.dumps(body, indent=2, ensure_ascii=False))
        return EXIT_OK
    rows = []
    for u in body.get("updates", []):
        progress = u.get("progress") or {}
        state = str(u["state"])
        if progress.get("total"):
            state += f" {int(progress['bytes']) * 100 // max(int(progress['total']), 1)}%"
        rows.append([str(u["agent_id"]), str(u.get("agent_name") or "-"), f"{u['kind']} {u['name']}",
                     str(u["version"]), state, str(u.get("rollout") or "-"), ago(u.get("updated_ms")),
                     str(u.get("detail") or "")])
    print(table(["AGENT", "NAME", "TARGET", "VERSION", "STATE", "ROLLOUT", "WHEN", "DETAIL"], rows)
          if rows else "no updates yet")
    for agent_id, policy in sorted(body.get("policies", {}).items()):
        print(describe_policy(agent_id, policy))
    return EXIT_OK


def run_updates_pin(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    if args.bundle is not None:
        name, version = parse_bundle_spec(args.bundle)
        body = {"kind": "bundle", "name": name, "version": version}
    else:
        body = {"kind": "host", "name": HOST_NAME, "version": args.host}
    try:
        # ApiClient has get/post/delete; PUT through its one request method.
        reply = client._request("PUT", _agent_path(args.agent, "pin"), json.dumps(body).encode("utf-8"),
                                DEFAULT_HTTP_TIMEOUT)
    except ApiError as exc:
        raise _checked(exc) from None
    print(describe_policy(args.agent, reply))
    return EXIT_OK


def run_updates_unpin(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    query: dict[str, str] = {}
    if args.bundle:
        query = {"kind": "bundle", "name": args.bundle}
    elif args.host:
        query = {"kind": "host", "name": HOST_NAME}
    path = _agent_path(args.agent, "pin") + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        reply = client.delete(path)
    except ApiError as exc:
        raise _checked(exc) from None
    print(f"removed {reply.get('removed', 0)} pin(s); " + describe_policy(args.agent, reply))
    return EXIT_OK


def run_updates_opt(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    try:
        reply = client.post(_agent_path(args.agent, "updates"), {"opt_out": args.opt_out})
    except ApiError as exc:
        raise _checked(exc) from None
    print(describe_policy(args.agent, reply))
    return EXIT_OK


__all__ = ["add_updates_commands", "describe_policy"]
