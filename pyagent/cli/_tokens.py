"""`pyagent token ...` (enrollment tokens), `pyagent operator-token ...` and `pyagent agents approve|reject|revoke`.

All of them go through the operator API and need a token with the `admin` scope (the one in
STATE_DIR/operator-token has it).
"""

from __future__ import annotations

import argparse
import json
import urllib.parse
from typing import Any

from pyagent.cli._client import ApiClient, find_api
from pyagent.cli._errors import EXIT_OK, ApiError, CliError, UsageError
from pyagent.cli._format import table, timestamp


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(find_api(args.state_dir, args.api))


def run_token_create(args: argparse.Namespace) -> int:
    # Imported here: the endpoint package pulls in starlette and cryptography, which the CLI does not need.
    from pyagent.endpoint._tokens import TokenFormatError, parse_duration, parse_labels

    try:
        expires = parse_duration(args.expires) if args.expires is not None else None
        labels = parse_labels(args.label or [])
    except TokenFormatError as exc:
        raise UsageError(str(exc)) from None
    if args.uses is not None and args.uses < 1:
        raise UsageError(f"--uses must be at least 1, got {args.uses}")
    body: dict[str, Any] = {"labels": labels, "approve": args.approve}
    if args.uses is not None:
        body["uses"] = args.uses
    if expires is not None:
        body["expires"] = f"{expires}s"
    reply = _client(args).post("/api/v1/tokens", body)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(reply["token"])
    return EXIT_OK


def _uses(record: dict[str, Any]) -> str:
    return f"{record['uses']}/{record['max_uses']}" if record.get("max_uses") else f"{record['uses']}/unlimited"


def run_token_ls(args: argparse.Namespace) -> int:
    records = _client(args).get("/api/v1/tokens")["tokens"]
    if args.json:
        print(json.dumps({"tokens": records}, indent=2))
        return EXIT_OK
    if not records:
        print("no enrollment tokens; create one with `pyagent token create`")
        return EXIT_OK
    rows = [[r["token_id"], "revoked" if r["revoked"] else "active", _uses(r),
             timestamp(r["expires_at"]) if r.get("expires_at") else "never", "yes" if r["approve"] else "no",
             ",".join(f"{k}={v}" for k, v in sorted(r["labels"].items())) or "-", timestamp(r["created_at"])]
            for r in records]
    print(table(["ID", "STATE", "USES", "EXPIRES", "APPROVAL", "LABELS", "CREATED"], rows))
    return EXIT_OK


def run_token_revoke(args: argparse.Namespace) -> int:
    _client(args).delete("/api/v1/tokens/" + urllib.parse.quote(args.token_id, safe=""))
    print(f"revoked enrollment token {args.token_id}")
    return EXIT_OK


def run_operator_token_create(args: argparse.Namespace) -> int:
    from pyagent.endpoint._tokens import TokenFormatError, parse_scopes

    try:
        scopes = parse_scopes(args.scope)
    except TokenFormatError as exc:
        raise UsageError(str(exc)) from None
    reply = _client(args).post("/api/v1/operator-tokens", {"scopes": list(scopes), "label": args.label or ""})
    print(json.dumps(reply, indent=2) if args.json else reply["token"])
    return EXIT_OK


def run_operator_token_ls(args: argparse.Namespace) -> int:
    records = _client(args).get("/api/v1/operator-tokens")["tokens"]
    if args.json:
        print(json.dumps({"tokens": records}, indent=2))
        return EXIT_OK
    rows = [[r["token_id"], "revoked" if r["revoked"] else "active", ",".join(r["scopes"]), r["label"] or "-",
             timestamp(r["created_at"])] for r in records]
    print(table(["ID", "STATE", "SCOPES", "LABEL", "CREATED"], rows))
    return EXIT_OK


def run_operator_token_revoke(args: argparse.Namespace) -> int:
    _client(args).delete("/api/v1/operator-tokens/" + urllib.parse.quote(args.token_id, safe=""))
    print(f"revoked operator token {args.token_id}")
    return EXIT_OK


_VERBS = {"approve": "approved", "reject": "rejected", "revoke": "revoked"}


def run_agent_status(args: argparse.Namespace) -> int:
    verb = args.agents_command
    client = _client(args)
    try:
        reply = client.post(f"/api/v1/agents/{urllib.parse.quote(args.agent, safe='')}/{verb}", {})
    except ApiError as exc:
        if exc.status == 409:
            raise CliError(str(exc)) from None
        raise
    print(f"agent {reply['agent_id']} {_VERBS[verb]} (was {reply['old']})")
    return EXIT_OK


def add_token_commands(commands: Any, client: argparse.ArgumentParser) -> None:
    token = commands.add_parser("token", help="enrollment tokens agents use to get their certificate")
    sub = token.add_subparsers(dest="token_command", metavar="COMMAND", required=True)
    create = sub.add_parser("create", parents=[client], help="create an enrollment token and print it (once)")
    create.add_argument("--uses", type=int, default=None, metavar="N", help="how many agents may use it (default: "
                        "unlimited)")
    create.add_argument("--expires", default=None, metavar="DURATION", help="e.g. 30m, 24h, 7d (default: never)")
    create.add_argument("--label", action="append", metavar="KEY=VALUE", help="label for agents enrolled with it")
    create.add_argument("--approve", action="store_true",
                        help="agents wait as pending until `pyagent agents approve ID`")
    create.add_argument("--json", action="store_true")
    create.set_defaults(handler=run_token_create)
    ls = sub.add_parser("ls", parents=[client], help="list enrollment tokens (never the tokens themselves)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=run_token_ls)
    revoke = sub.add_parser("revoke", parents=[client], help="revoke an enrollment token")
    revoke.add_argument("token_id", metavar="ID")
    revoke.set_defaults(handler=run_token_revoke)

    op = commands.add_parser("operator-token", help="operator API tokens with scopes (read, call, admin)")
    opsub = op.add_subparsers(dest="operator_token_command", metavar="COMMAND", required=True)
    ocreate = opsub.add_parser("create", parents=[client], help="create an operator token and print it (once)")
    ocreate.add_argument("--scope", required=True, metavar="SCOPES", help="read, call, admin, or a comma list")
    ocreate.add_argument("--label", default="", help="what the token is for")
    ocreate.add_argument("--json", action="store_true")
    ocreate.set_defaults(handler=run_operator_token_create)
    ols = opsub.add_parser("ls", parents=[client], help="list operator tokens")
    ols.add_argument("--json", action="store_true")
    ols.set_defaults(handler=run_operator_token_ls)
    orevoke = opsub.add_parser("revoke", parents=[client], help="revoke an operator token")
    orevoke.add_argument("token_id", metavar="ID")
    orevoke.set_defaults(handler=run_operator_token_revoke)


def add_agent_status_commands(agents_commands: Any, client: argparse.ArgumentParser) -> None:
    helps = {"approve": "let a pending agent get its certificate",
             "reject": "refuse a pending agent for good",
             "revoke": "refuse the agent from its next handshake on and drop its live session now"}
    for verb, text in helps.items():
        p = agents_commands.add_parser(verb, parents=[client], help=text)
        p.add_argument("agent", metavar="ID", help="agent id or name")
        p.set_defaults(handler=run_agent_status)
