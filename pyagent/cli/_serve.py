"""`pyagent endpoint serve`: run the endpoint in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from pyagent.cli._client import default_state_dir
from pyagent.cli._errors import EXIT_OK, CliError, UsageError

if TYPE_CHECKING:
    from pyagent.endpoint import Endpoint, EndpointConfig

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def run_serve(args: argparse.Namespace) -> int:
    # Imported here: the other commands do not need starlette, uvicorn or cryptography.
    from pyagent.endpoint import ConfigError, EndpointConfig, configure_logging, parse_address

    try:
        listen_host, listen_port = parse_address(args.listen)
        api_host, api_port = parse_address(args.api_listen)
        config = EndpointConfig(
            state_dir=args.state_dir or default_state_dir(),
            listen_host=listen_host,
            listen_port=listen_port,
            api_host=api_host,
            api_port=api_port,
            heartbeat_interval=args.heartbeat_interval,
            allow_shared_token=args.allow_shared_token,
            agent_token_file=args.token_file,
            handshake_timeout=args.handshake_timeout,
            tls_handshake_timeout=args.tls_handshake_timeout,
            cert_days=args.cert_days,
            max_frame_bytes=args.max_frame_bytes,
            max_in_flight=args.max_in_flight,
            rate=args.rate,
            rate_burst=args.rate_burst,
            max_connections=args.max_connections,
            crash_max_report_bytes=args.crash_max_report_bytes,
            crash_loop_count=args.crash_loop_count,
            crash_loop_window=args.crash_loop_window,
            agent_call_policy=args.agent_call_policy,
            tuf_timestamp_expiry_s=args.tuf_timestamp_expiry,
            tuf_snapshot_expiry_s=args.tuf_snapshot_expiry,
            tuf_targets_expiry_s=args.tuf_targets_expiry,
        )
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    configure_logging(LOG_LEVELS[args.log_level])
    return asyncio.run(_serve(config))


async def _serve(config: EndpointConfig) -> int:
    from pyagent.endpoint import Endpoint, EndpointError

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    endpoint = Endpoint(config)
    try:
        await endpoint.start()
    except EndpointError as exc:
        raise CliError(f"cannot start the endpoint: {exc}") from None
    try:
        _announce(endpoint)
        await stop.wait()
    finally:
        await endpoint.aclose()
    return EXIT_OK


def _announce(endpoint: Endpoint) -> None:
    state = endpoint.state
    new = " (new)"
    lines = [
        f"pyagent endpoint (pid {os.getpid()}), state in {state.paths.root}",
        f"  CA certificate: {state.paths.ca_cert}{new if 'ca' in state.created else ''}"
        + ("  <- agents pin this file: `ca = ...` in agent.toml" if "ca" in state.created else ""),
        (f"  agent token:    {state.agent_token_file}{new if 'agent_token' in state.created else ''}"
         + "  <- shared token (development only): `token = ...` and `auth = \"shared-token\"` in agent.toml"
         if endpoint.config.allow_shared_token else
         "  agents enroll:  `pyagent token create` prints a token for `token = ...` in agent.toml"),
        f"  agents dial:    {endpoint.listen_address} (TLS)",
        f"  operator API:   {endpoint.api_url}",
    ]
    print("\n".join(lines), flush=True)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                        help="state directory (default: $PYAGENT_STATE_DIR or ~/.local/state/pyagent/endpoint)")
    parser.add_argument("--listen", default="127.0.0.1:7443", metavar="HOST:PORT",
                        help="where agents connect, TLS (default: %(default)s; port 0 picks a free port)")
    parser.add_argument("--api", dest="api_listen", default="127.0.0.1:7480", metavar="HOST:PORT",
                        help="operator HTTP API (default: %(default)s)")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0, metavar="SECONDS",
                        help="heartbeat interval given to agents (default: %(default)s)")
    parser.add_argument("--allow-shared-token", action="store_true",
                        help="DEVELOPMENT ONLY: also accept agents without a certificate that present the shared "
                             "agent token (STATE_DIR/agent-token) in their hello")
    parser.add_argument("--token-file", type=Path, default=None, metavar="PATH",
                        help="with --allow-shared-token: read the shared token from this existing file")
    limits = parser.add_argument_group("limits (docs/security.md)")
    limits.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="time from TLS to handshake.hello (default: %(default)s)")
    limits.add_argument("--tls-handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="time for the TLS handshake (default: %(default)s)")
    limits.add_argument("--cert-days", type=float, default=30.0, metavar="DAYS",
                        help="lifetime of the agent certificates issued (default: %(default)s)")
    limits.add_argument("--max-frame-bytes", type=int, default=1 << 20, metavar="BYTES",
                        help="longest accepted line (default: %(default)s)")
    limits.add_argument("--max-in-flight", type=int, default=1024, metavar="N",
                        help="calls in flight to one agent (default: %(default)s)")
    limits.add_argument("--rate", type=float, default=50.0, metavar="PER_SECOND",
                        help="requests per second from one agent (default: %(default)s)")
    limits.add_argument("--rate-burst", type=int, default=200, metavar="N", help="default: %(default)s")
    limits.add_argument("--max-connections", type=int, default=10000, metavar="N",
                        help="open agent connections, handshakes included (default: %(default)s)")
    crashes = parser.add_argument_group("crash reports (docs/architecture.md, \"Crash capture\")")
    crashes.add_argument("--crash-max-report-bytes", type=int, default=16 << 20, metavar="BYTES",
                         help="all files of one crash report; a bigger minidump is left out (default: %(default)s)")
    crashes.add_argument("--crash-loop-count", type=int, default=3, metavar="N",
                         help="this many crashes of one agent within --crash-loop-window flag a crash loop "
                              "(default: %(default)s)")
    crashes.add_argument("--crash-loop-window", type=float, default=300.0, metavar="SECONDS",
                         help="default: %(default)s")
    updates = parser.add_argument_group("update repository (docs/updates.md): metadata lifetimes")
    updates.add_argument("--tuf-timestamp-expiry", type=float, default=86400.0, metavar="SECONDS",
                         help="the timestamp's lifetime; re-signed when half has passed (default: %(default)s)")
    updates.add_argument("--tuf-snapshot-expiry", type=float, default=604800.0, metavar="SECONDS",
                         help="default: %(default)s")
    updates.add_argument("--tuf-targets-expiry", type=float, default=7776000.0, metavar="SECONDS",
                         help="set by each release (default: %(default)s)")
    parser.add_argument("--agent-call-policy", choices=("same-group", "any", "none"), default="same-group",
                        help="which agents a bundle's `self.call` may reach: its own group (the `group` label), any "
                        "agent, or none (default: %(default)s)")
    parser.add_argument("--log-level", choices=sorted(LOG_LEVELS), default="info", help="default: %(default)s")
