"""`pyagent crashes ls`, `pyagent crashes show ID` and `pyagent crashes clear-loop AGENT`: crash reports the endpoint
received from agents, and the crash-loop flag."""

from __future__ import annotations

import argparse
import json
import urllib.parse
from typing import Any

from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._errors import EXIT_OK, ApiError, CliError
from pyagent.cli._format import short_ids, table, timestamp

TOP_MODULES = 12
SIGNATURE_CHARS = 10


def add_crash_commands(commands: Any, client: argparse.ArgumentParser) -> None:
    crashes = commands.add_parser("crashes", help="crash reports from agents (crashes, Python errors, hangs)")
    sub = crashes.add_subparsers(dest="crashes_command", metavar="COMMAND", required=True)
    ls = sub.add_parser("ls", parents=[client], help="list crash reports, newest first, or their groups")
    ls.add_argument("--json", action="store_true", help='print {"crashes": [...], "loops": [...]} as JSON')
    ls.add_argument("--agent", metavar="A", help="only this agent (id, unique id prefix, or name)")
    ls.add_argument("--kind", choices=("crash", "python_exception", "hang"), help="only this kind of report")
    ls.add_argument("--group", action="store_true", help="one line per signature, with the count")
    ls.add_argument("--limit", type=int, default=500, metavar="N", help="at most N reports (default: %(default)s)")
    ls.set_defaults(handler=run_crashes_ls)
    show = sub.add_parser("show", parents=[client], help="show one crash report")
    show.add_argument("id", metavar="ID", help="report id or unique prefix (from `pyagent crashes ls`)")
    show.add_argument("--json", action="store_true", help="print the whole report as JSON")
    show.add_argument("--modules", type=int, default=TOP_MODULES, metavar="N",
                      help="list the first N modules (default: %(default)s)")
    show.set_defaults(handler=run_crashes_show)
    clear = sub.add_parser("clear-loop", parents=[client],
                           help="clear an agent's crash-loop flag (only crashes after this count towards a new one)")
    clear.add_argument("agent", metavar="AGENT", help="agent id, unique id prefix, or name")
    clear.set_defaults(handler=run_crashes_clear_loop)


def _agent_id(client: ApiClient, ref: str) -> str:
    try:
        return str(client.agent(ref)["agent_id"])
    except ApiError as exc:
        if exc.status != 404:
            raise
    matches = [r for r in client.agents() if str(r.get("agent_id", "")).startswith(ref)]
    if len(matches) != 1:
        raise CliError(f"{'no agent' if not matches else f'{len(matches)} agents'} with id, id prefix or name "
                       f"{ref!r}") from None
    return str(matches[0]["agent_id"])


def _what(r: dict[str, Any]) -> str:
    if r.get("kind") == "crash":
        return str(r.get("signal_name") or "crash")
    return "python error" if r.get("kind") == "python_exception" else "hang"


def run_crashes_ls(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    if not 1 <= args.limit <= 10000:
        raise CliError("--limit must be from 1 to 10000")
    query: dict[str, str] = {"limit": str(args.limit)}
    if args.agent:
        query["agent"] = _agent_id(client, args.agent)
    if args.kind:
        query["kind"] = args.kind
    if args.group:
        query["group"] = "1"
    body = client.get("/api/v1/crashes?" + urllib.parse.urlencode(query))
    if args.json:
        print(json.dumps(body, indent=2, ensure_ascii=False))
        return EXIT_OK
    names = {str(a.get("agent_id")): str(a.get("name")) for a in client.agents()}
    if args.group:
        groups = body.get("groups", [])
        if not groups:
            print("no crash reports")
        else:
            print(table(["SIGNATURE", "KIND", "WHAT", "COUNT", "AGENTS", "FIRST", "LAST", "EXAMPLE"], [
                [str(g["signature"]), str(g["kind"]), _what(g), str(g["count"]), str(g["agents"]),
                 timestamp(g["first"]), timestamp(g["last"]), str(g["example"])] for g in groups]))
    else:
        reports = body.get("crashes", [])
        if not reports:
            print("no crash reports")
        else:
            agents = short_ids(sorted({str(r["agent_id"]) for r in reports}))
            print(table(["ID", "TIME", "AGENT", "KIND", "SIGNAL", "SIGNATURE", "VERSION"], [
                [str(r["id"]), timestamp(r["time"]),
                 f"{agents[str(r['agent_id'])]} ({names.get(str(r['agent_id']), '?')})", str(r["kind"]),
                 str(r.get("signal_name") or "-"), str(r["signature"])[:SIGNATURE_CHARS],
                 str(r.get("host_version") or "-")] for r in reports]))
    for loop in body.get("loops", []):
        if not args.agent or loop["agent_id"] == query.get("agent"):
            print(f"crash loop: agent {loop['agent_id']} ({names.get(str(loop['agent_id']), '?')}) crashed "
                  f"{loop['crashes']} times between {timestamp(loop['first_crash'])} and "
                  f"{timestamp(loop['last_crash'])}")
    return EXIT_OK


def run_crashes_show(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    try:
        report = client.get("/api/v1/crashes/" + urllib.parse.quote(args.id, safe=""))
    except ApiError as exc:
        if exc.status in (404, 409):
            raise CliError(str(exc)) from None
        raise
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(crash_details(report, args.modules))
    return EXIT_OK


def crash_details(r: dict[str, Any], top_modules: int = TOP_MODULES) -> str:
    s: dict[str, Any] = r.get("summary") or {}
    lines = [f"crash report {r['id']} ({r['kind']}), agent {r['agent_id']}, report {r['report']}",
             f"time:       {timestamp(r['time'])} (received {timestamp(r['received'])})",
             f"signature:  {r['signature']}",
             f"version:    host {r.get('host_version') or '-'}; bundles "
             + (", ".join(f"{k}@{v}" for k, v in sorted((r.get("bundles") or {}).items())) or "-")]
    if r["kind"] == "crash":
        address = s.get("address")
        lines += [f"signal:     {r.get('signal')} {r.get('signal_name') or ''}".rstrip(),
                  f"address:    {hex(address) if isinstance(address, int) else '-'}",
                  f"thread:     {s.get('crashing_thread', '-')}"
                  + (f" ({s['record']['thread']})" if isinstance(s.get("record"), dict)
                     and s["record"].get("thread") else "")]
        if s.get("dump_error"):
            lines.append(f"minidump:   {s['dump_error']}")
        frames = s.get("frames") or []
        if frames:
            lines.append("frames:")
            lines += [f"  {f}" for f in frames]
        modules = s.get("modules") or []
        if modules:
            lines.append(f"modules ({len(modules)}, first {min(top_modules, len(modules))}):")
            lines += [f"  {m['base']:#014x} {m['size']:>10}  {m['name']}" for m in modules[:top_modules]]
    elif r["kind"] == "python_exception":
        lines += [f"where:      {s.get('agent')}.{s.get('method')} ({s.get('where')})",
                  f"exception:  {s.get('type')}: {s.get('message')}"]
    annotations = s.get("annotations") or {}
    if annotations:
        lines.append("annotations:")
        lines += [f"  {k} = {v}" for k, v in sorted(annotations.items())]
    if s.get("files"):
        lines.append("files: " + ", ".join(f"{n} ({b} bytes)" for n, b in sorted(s["files"].items())))
    if s.get("skipped"):
        lines.append("not uploaded (over the size limit): " + ", ".join(f"{n} ({b} bytes)"
                                                                      for n, b in sorted(s["skipped"].items())))
    tb = r.get("python_traceback") or ""
    if tb.strip():
        lines += ["python traceback:" if r["kind"] != "hang" else "python tracebacks (event loop blocked):",
                  *[f"  {line}" for line in tb.rstrip().splitlines()]]
    backtrace = (s.get("record") or {}).get("backtrace") if isinstance(s.get("record"), dict) else None
    if backtrace:
        lines += ["fallback backtrace (host record):", *[f"  {line}" for line in backtrace.splitlines()]]
    if r.get("crash_loop"):
        loop = r["crash_loop"]
        lines.append(f"crash loop: this agent crashed {loop['crashes']} times between "
                     f"{timestamp(loop['first_crash'])} and {timestamp(loop['last_crash'])}")
    return "\n".join(lines)


def run_crashes_clear_loop(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    agent_id = _agent_id(client, args.agent)
    try:
        reply = client.delete("/api/v1/crash-loops/" + urllib.parse.quote(agent_id, safe=""))
    except ApiError as exc:
        if exc.status == 404:
            raise CliError(f"agent {args.agent!r} is not flagged as in a crash loop") from None
        raise
    loop = reply["cleared"]
    print(f"cleared the crash-loop flag of agent {agent_id} ({loop['crashes']} crashes between "
          f"{timestamp(loop['first_crash'])} and {timestamp(loop['last_crash'])})")
    return EXIT_OK
