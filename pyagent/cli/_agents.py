"""`pyagent agents ls` and `pyagent agents show ID`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._errors import EXIT_OK, ApiError, CliError
from pyagent.cli._format import agent_details, agents_table, timestamp


def run_ls(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    records = client.agents()
    if args.json:
        print(json.dumps({"agents": records}, indent=2, ensure_ascii=False))
    elif not records:
        print("no agents have connected to this endpoint yet")
    else:
        print(agents_table(records))
        for r in records:
            if r.get("crash_loop"):
                print(f"crash loop: agent {r.get('agent_id')} ({r.get('name')}) {_crash_loop(r)}")
    return EXIT_OK


def _crash_loop(r: dict[str, Any]) -> str:
    return (f"{r.get('crash_loop_crashes')} crashes, flagged since {timestamp(r.get('crash_loop_since'))}; "
            "see `pyagent crashes ls`, clear with `pyagent crashes clear-loop`")


def run_show(args: argparse.Namespace) -> int:
    client = ApiClient(find_api(args.state_dir, args.api))
    try:
        record = client.agent(args.agent)
    except ApiError as exc:
        if exc.status != 404:
            raise
        # `agents ls` shows short ids: accept a unique prefix of an id too.
        matches = [r for r in client.agents() if str(r.get("agent_id", "")).startswith(args.agent)]
        if len(matches) != 1:
            found = "no agent" if not matches else f"{len(matches)} agents"
            raise CliError(f"{found} with id, id prefix or name {args.agent!r}") from None
        record = matches[0]
    if args.json:
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        print(agent_details(record))
        print(f"crash loop: {_crash_loop(record) if record.get('crash_loop') else 'no'}")
    return EXIT_OK
