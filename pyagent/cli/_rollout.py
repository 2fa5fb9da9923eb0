"""`pyagent rollout start|status|halt|resume` (docs/updates.md §4)."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any, TextIO

from pyagent._updatenames import HOST_NAME
from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._errors import EXIT_FAILED, EXIT_OK, ApiError, CliError, UsageError
from pyagent.cli._format import table

FINAL_STATES = ("completed", "halted", "superseded")
BAR_WIDTH = 30
WATCH_INTERVAL = 1.0
DEFAULT_WATCH_TIMEOUT = 3600.0


def parse_bundle_spec(text: str) -> tuple[str, str]:
    """NAME==VERSION → (name, version); UsageError names the expected form."""
    name, sep, version = text.partition("==")
    if not sep or not name.strip() or not version.strip():
        raise UsageError(f"--bundle expects NAME==VERSION (e.g. hello==1.2.0), got {text!r}")
    return name.strip(), version.strip()


def add_rollout_commands(commands: Any, client: argparse.ArgumentParser) -> None:
    rollout = commands.add_parser("rollout", help="roll a bundle or host version out to agents in waves")
    sub = rollout.add_subparsers(dest="rollout_command", metavar="COMMAND", required=True)
    start = sub.add_parser("start", parents=[client], help="start a rollout (supersedes a running one of the same "
                           "bundle or of the host)",
                           epilog="a wave whose failure or crash rate passes its limit halts the rollout")
    what = start.add_mutually_exclusive_group(required=True)
    what.add_argument("--bundle", metavar="NAME==VERSION", help="a released bundle version")
    what.add_argument("--host", metavar="VERSION", help="a released host version (per agent platform)")
    start.add_argument("--select", default="*", metavar="SELECTOR",
                       help="which agents: group:NAME, env=prod,role=web, capability:NAME, a name, or * (default)")
    start.add_argument("--waves", default="1%,10%,50%,100%", metavar="P,P,...",
                       help="cumulative share of the agents per wave (default: %(default)s)")
    start.add_argument("--max-failure-rate", default="5%", metavar="R", help="halt above this (default: 5%%)")
    start.add_argument("--max-crash-rate", default=None, metavar="R",
                       help="halt above this many crash reports per ended member (default: the failure rate)")
    start.add_argument("--stall-timeout", type=float, default=None, metavar="SECONDS",
                       help="a member with no update report for this long has failed (default: 900, at most 7 days)")
    start.add_argument("--watch", action="store_true", help="show progress until it completes or halts")
    start.add_argument("--timeout", type=float, default=DEFAULT_WATCH_TIMEOUT, metavar="S",
                       help="with --watch: stop watching after S seconds (default: %(default)s)")
    start.add_argument("--json", action="store_true", help="print the rollout as JSON")
    start.set_defaults(handler=run_rollout_start)
    status = sub.add_parser("status", parents=[client], help="show rollouts, or one rollout with its agents")
    status.add_argument("id", nargs="?", metavar="ID", help="rollout id or unique prefix (default: the newest)")
    status.add_argument("--json", action="store_true", help="print as JSON")
    status.add_argument("--watch", action="store_true", help="show progress until it completes or halts")
    status.add_argument("--timeout", type=float, default=DEFAULT_WATCH_TIMEOUT, metavar="S",
                        help="with --watch: stop watching after S seconds (default: %(default)s)")
    status.set_defaults(handler=run_rollout_status)
    for action in ("halt", "resume"):
        cmd = sub.add_parser(action, parents=[client], help=f"{action} a rollout")
        cmd.add_argument("id", metavar="ID", help="rollout id or unique prefix")
        cmd.set_defaults(handler=run_rollout_action, action=action)


def start_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any]
    if args.bundle is not None:
        name, version = parse_bundle_spec(args.bundle)
        body = {"kind": "bundle", "name": name, "version": version}
    else:
        body = {"kind": "host", "name": HOST_NAME, "version": args.host}
    body.update({"select": args.select, "waves": args.waves, "max_failure_rate": args.max_failure_rate})
    if args.max_crash_rate is not None:
        body["max_crash_rate"] = args.max_crash_rate
    if args.stall_timeout is not None:
        body["stall_timeout"] = args.stall_timeout
    return body


def _refused(exc: ApiError) -> CliError:
    return UsageError(str(exc)) if exc.status == 400 else CliError(str(exc))


def run_rollout_start(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    try:
        rollout = client.post("/api/v1/rollouts", start_body(args))
    except ApiError as exc:
        if 400 <= exc.status < 500:
            raise _refused(exc) from None
        raise
    if args.json and not args.watch:
        print(json.dumps(rollout, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"rollout {rollout['id']} started: {rollout['kind']} {rollout['name']} {rollout['version']} to "
          f"{rollout['members']} agents in waves {','.join(rollout['waves'])}")
    if args.watch:
        return watch(client, str(rollout["id"]), args.timeout)
    return EXIT_OK


def _get(client: ApiClient, ref: str) -> dict[str, Any]:
    try:
        rollout: dict[str, Any] = client.get("/api/v1/rollouts/" + urllib.parse.quote(ref, safe=""))
    except ApiError as exc:
        if exc.status == 404:
            raise CliError(str(exc)) from None
        raise
    return rollout


def run_rollout_status(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    ref = args.id
    if ref is None and (args.watch or not args.json):
        rollouts = client.get("/api/v1/rollouts")["rollouts"]
        if not rollouts:
            print("no rollouts")
            return EXIT_OK
        if not args.watch:
            print(table(["ID", "TARGET", "STATE", "WAVE", "PROGRESS", "FAILED", "REASON"],
                        [[str(r["id"]), f"{r['kind']} {r['name']} {r['version']}", str(r["state"]),
                          f"{r['wave']}/{len(r['waves'])}", f"{_ended(r)}/{r['members']}", str(_failed(r)),
                          str(r.get("reason") or "")] for r in rollouts]))
            return EXIT_OK
        ref = str(rollouts[0]["id"])
    if ref is None:
        print(json.dumps(client.get("/api/v1/rollouts"), indent=2, ensure_ascii=False))
        return EXIT_OK
    if args.watch:
        return watch(client, ref, args.timeout)
    rollout = _get(client, ref)
    if args.json:
        print(json.dumps(rollout, indent=2, ensure_ascii=False))
    else:
        print(render_status(rollout, bars=False))
        rows = [[str(a["agent_id"]), str(a.get("name") or "-"), str(a["state"]), str(a.get("detail") or "")]
                for a in rollout.get("agents", [])]
        if rows:
            print(table(["AGENT", "NAME", "STATE", "DETAIL"], rows))
    return EXIT_OK


def run_rollout_action(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    try:
        rollout = client.post(f"/api/v1/rollouts/{urllib.parse.quote(args.id, safe='')}/{args.action}", {})
    except ApiError as exc:
        if exc.status in (404, 409):
            raise CliError(str(exc)) from None
        raise
    print(f"rollout {rollout['id']} is {rollout['state']}")
    return EXIT_OK


# -- rendering ------------------------------------------------------------------------------------------------------

def _ended(r: dict[str, Any]) -> int:
    return sum(int(w.get("ended", 0)) for w in r.get("wave_progress", []))


def _failed(r: dict[str, Any]) -> int:
    return sum(int(w.get("failed", 0)) for w in r.get("wave_progress", []))


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[#########.....]  9/15` — `done` of `total` as a bar of `width` cells (an empty wave is full)."""
    width = max(width, 1)
    filled = width if total <= 0 else min(width, max(0, done) * width // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {max(done, 0)}/{max(total, 0)}"


def render_status(r: dict[str, Any], *, bars: bool) -> str:
    """The rollout's headline, its rates and one line per wave (a bar each when `bars`)."""
    lines = [f"rollout {r['id']}: {r['kind']} {r['name']} {r['version']}, {r['state']}"
             + (f" ({r['reason']})" if r.get("reason") else "")
             + f", wave {r['wave']}/{len(r['waves'])}, {r['members']} agents",
             f"failure rate {r['failure_rate'] * 100:.3g}% (limit {r['max_failure_rate'] * 100:.3g}%), "
             f"crash rate {r['crash_rate'] * 100:.3g}% (limit {r['max_crash_rate'] * 100:.3g}%)"
             + (f", stall timeout {r['stall_timeout']:g} s" if r.get("stall_timeout") is not None else "")]
    for w in r.get("wave_progress", []):
        extra = ", ".join(f"{w[k]} {k.replace('_', ' ')}" for k in ("failed", "in_progress", "waiting")
                          if w.get(k))
        head = f"wave {w['wave']} ({w['percent']})"
        if bars:
            lines.append(f"{head:<16} {progress_bar(int(w['ended']), int(w['members']))}"
                         + (f"  {extra}" if extra else ""))
        else:
            lines.append(f"{head}: {w['ended']}/{w['members']} ended" + (f", {extra}" if extra else ""))
    return "\n".join(lines)


def watch(client: ApiClient, ref: str, timeout: float, out: TextIO | None = None,
          interval: float = WATCH_INTERVAL) -> int:
    """Show progress until the rollout is completed, halted or superseded, or `timeout` seconds passed: bars redrawn
    in place on a terminal, a plain line per change otherwise. Exit 0 completed, 1 otherwise."""
    out = out or sys.stdout
    tty = out.isatty()
    deadline = time.monotonic() + max(timeout, 0)
    drawn = 0
    last = ""
    while True:
        r = _get(client, ref)
        text = render_status(r, bars=tty)
        if tty:
            if drawn:
                out.write(f"\x1b[{drawn}F\x1b[J")
            out.write(text + "\n")
            drawn = text.count("\n") + 1
        elif text != last:
            out.write(text + "\n")
        out.flush()
        last = text
        if r["state"] in FINAL_STATES:
            return EXIT_OK if r["state"] == "completed" else EXIT_FAILED
        if time.monotonic() >= deadline:
            out.write(f"still {r['state']} after {timeout:g} s; stopped watching\n")
            return EXIT_FAILED
        time.sleep(interval)


__all__ = ["add_rollout_commands", "parse_bundle_spec", "progress_bar", "render_status", "start_body", "watch"]
