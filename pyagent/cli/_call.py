"""`pyagent call TARGET OBJECT.METHOD key=value...`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._errors import EXIT_FAILED, EXIT_OK, UsageError
from pyagent.cli._format import result_text
from pyagent.protocol import ERROR_NAMES


def parse_params(items: Sequence[str]) -> dict[str, Any]:
    """`key=value` pairs; a value is JSON where it parses as JSON (`n=5`, `on=true`, `xs=[1,2]`), else a string."""
    params: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise UsageError(f"bad parameter {item!r}: expected key=value")
        if key in params:
            raise UsageError(f"parameter {key!r} given twice")
        try:
            params[key] = json.loads(text)
        except ValueError:
            params[key] = text
    return params


def describe_error(error: Any) -> str:
    if not isinstance(error, dict):
        return f"malformed error: {error!r}"
    code = error.get("code")
    name = ERROR_NAMES.get(code, "error") if isinstance(code, int) else "error"
    text = f"{error.get('message', 'no message')} ({name} {code})"
    data = error.get("data")
    if isinstance(data, dict) and isinstance(data.get("traceback"), str):
        text += "\n" + data["traceback"].rstrip()
    elif data is not None:
        text += "\ndata: " + json.dumps(data, ensure_ascii=False)
    return text


def print_results(results: dict[str, Any], as_json: bool, what: str) -> int:
    """Per-target results of a fan-out (`{agent_id: {"result"}|{"error"}}`): one line each unless `as_json` (the
    caller printed the JSON); exit 1 when any target failed or none matched."""
    failed = sum(1 for r in results.values() if "error" in r)
    if not as_json:
        for agent_id, reply in results.items():
            if "error" in reply:
                print(f"{agent_id}  ERROR  {describe_error(reply['error'])}")
            else:
                print(f"{agent_id}  ok     {result_text(reply.get('result'))}")
    if not results:
        print(f"pyagent: {what}: no agent matches the target", file=sys.stderr)
        return EXIT_FAILED
    if failed:
        print(f"pyagent: {what} failed on {failed} of {len(results)} agents", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def run_call(args: argparse.Namespace) -> int:
    obj, dot, name = args.method.rpartition(".")
    if not (obj and dot and name):
        raise UsageError(f"bad method {args.method!r}: expected OBJECT.METHOD, e.g. hello.greet")
    if not 0 < args.timeout <= 3600:
        raise UsageError("--timeout must be in (0, 3600] seconds")
    params = parse_params(args.params)
    client = ApiClient(find_api(args.state_dir, args.api))
    reply = client.call(args.target, args.method, params, args.timeout, getattr(args, "concurrency", None))
    if args.json:
        print(json.dumps(reply, indent=2, ensure_ascii=False))
    if "results" in reply:
        return print_results(reply["results"], args.json, args.method)
    if "error" in reply:
        print(f"pyagent: {args.method} on {args.target} failed: {describe_error(reply['error'])}", file=sys.stderr)
        return EXIT_FAILED
    if not args.json:
        print(result_text(reply.get("result")))
    return EXIT_OK
