"""`pyagent events [-f] [--select TARGET] [--event GLOB] [--object NAME]`: events agents emit."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pyagent.cli._client import ApiClient, _api_error, find_api
from pyagent.cli._errors import EXIT_OK, UnreachableError, UsageError


def add_events_command(commands: Any, client: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "events", parents=[client], help="show or follow the events agents emit",
        description="Print the newest events (default 10 with -f, else 100), and with -f follow new ones live.",
        epilog="--select takes a call target: an agent id or name, group:NAME, env=prod,role=web or capability:X")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events as they arrive")
    p.add_argument("--select", metavar="TARGET", help="only events of these agents")
    p.add_argument("--event", metavar="GLOB", help="only events whose name matches, e.g. 'report' or 'tick*'")
    p.add_argument("--object", metavar="NAME", help="only events of this agent object")
    p.add_argument("--last", type=int, metavar="N", help="how many stored events to print first")
    p.add_argument("--count", type=int, metavar="N", help="stop after N events")
    p.add_argument("--timeout", type=int, metavar="SECONDS", help="with -f: stop following after SECONDS")
    p.add_argument("--json", action="store_true", help="one JSON object per line (NDJSON)")
    p.set_defaults(handler=run_events)


def event_line(record: dict[str, Any]) -> str:
    if "dropped" in record and "event" not in record:
        return f"-- {record['dropped']} events dropped: this client did not keep up --"
    stamp = record.get("time")
    when = time.strftime("%H:%M:%S", time.localtime(stamp / 1000)) if isinstance(stamp, (int, float)) else "-"
    if isinstance(stamp, (int, float)):
        when += f".{int(stamp) % 1000:03d}"
    data = json.dumps(record.get("data"), ensure_ascii=False, separators=(",", ":"))
    return f"{when}  {record.get('name') or record.get('agent_id')}  {record.get('object')}.{record.get('event')}  " \
           f"{data}"


def run_events(args: argparse.Namespace) -> int:
    for key in ("last", "count", "timeout"):
        value = getattr(args, key)
        if value is not None and value < (0 if key == "last" else 1):
            raise UsageError(f"--{key} must be {'>= 0' if key == 'last' else 'positive'}")
    if args.timeout is not None and not args.follow:
        raise UsageError("--timeout applies to --follow only")
    target = find_api(args.state_dir, args.api)
    query: dict[str, str] = {}
    for key in ("select", "event", "object", "last", "count", "timeout"):
        value = getattr(args, key)
        if value is not None:
            query[key] = str(value)
    if not args.follow:
        records = ApiClient(target).get("/api/v1/events?" + urllib.parse.urlencode(query))["events"]
        if args.count is not None:
            records = records[-args.count:] if records else records
        for record in records:
            print(json.dumps(record, ensure_ascii=False) if args.json else event_line(record), flush=True)
        return EXIT_OK
    query["follow"] = "1"
    url = f"{target.url}/api/v1/events?{urllib.parse.urlencode(query)}"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {target.token}",
                                               "Accept": "application/x-ndjson"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    # The endpoint sends a keep-alive line every 15 s, so a silent minute means it is gone.
    read_timeout = 60.0
    try:
        with opener.open(req, timeout=read_timeout) as resp:
            for raw in resp:
                line = raw.strip()
                if not line:
                    continue
                record = json.loads(line)
                print(json.dumps(record, ensure_ascii=False) if args.json else event_line(record), flush=True)
    except urllib.error.HTTPError as exc:
        with exc:
            raise _api_error(exc.code, exc.read()) from None
    except urllib.error.URLError as exc:
        raise UnreachableError(f"cannot reach the endpoint API at {target.url}: {exc.reason}{target.hint}") from None
    except (TimeoutError, socket.timeout):
        raise UnreachableError(f"the endpoint API at {target.url} sent nothing for {read_timeout:g} s") from None
    except (ConnectionError, OSError) as exc:
        raise UnreachableError(f"the event stream from {target.url} broke: {exc}") from None
    except ValueError as exc:
        print(f"pyagent: the event stream sent something that is not JSON: {exc}", file=sys.stderr)
        return 1
    return EXIT_OK
