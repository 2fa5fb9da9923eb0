"""Endpoint settings and the `host:port` notation used on the command line and in `endpoint.json`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pyagent.endpoint._errors import ConfigError
from pyagent.protocol import DEFAULT_MAX_FRAME_BYTES

DEFAULT_LISTEN = ("127.0.0.1", 7443)
DEFAULT_API = ("127.0.0.1", 7480)
DEFAULT_HEARTBEAT_INTERVAL = 30.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_TLS_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CERT_DAYS = 30.0
DEFAULT_MAX_IN_FLIGHT = 1024
DEFAULT_RATE = 50.0
DEFAULT_RATE_BURST = 200
DEFAULT_MAX_CONNECTIONS = 10000


def parse_address(text: str) -> tuple[str, int]:
    """Parse `host:port` or `[v6]:port` into (host, port); raise ConfigError naming what is wrong."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigError(f"bad address {text!r}: expected [IPv6]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ConfigError(f"bad address {text!r}: expected HOST:PORT")
        if ":" in host:
            raise ConfigError(f"bad address {text!r}: write an IPv6 address in brackets, e.g. [::1]:7443")
    if not host:
        raise ConfigError(f"bad address {text!r}: the host is empty")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"bad address {text!r}: the port must be a number from 0 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    """The inverse of parse_address: brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class EndpointConfig:
    """Everything an `Endpoint` needs; ports may be 0 (the bound port is reported after start)."""

    state_dir: Path
    listen_host: str = DEFAULT_LISTEN[0]
    listen_port: int = DEFAULT_LISTEN[1]
    api_host: str = DEFAULT_API[0]
    api_port: int = DEFAULT_API[1]
    api_enabled: bool = True
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    # The shared agent token (development only, off by default): agents without a certificate may say hello with
    # it. The file defaults to STATE_DIR/agent-token (created on first run with allow_shared_token).
    allow_shared_token: bool = False
    agent_token_file: Path | None = None
    tls_handshake_timeout: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT
    cert_days: float = DEFAULT_CERT_DAYS  # lifetime of the client certificates the endpoint issues
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT  # calls in flight to one agent
    rate: float = DEFAULT_RATE  # requests per second one agent may make (beyond heartbeats)
    rate_burst: int = DEFAULT_RATE_BURST
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open agent connections, handshakes included
    crash_max_report_bytes: int = 16 << 20  # one crash report, all its files (a bigger minidump is left out)
    crash_loop_count: int = 3  # this many crashes of one agent within crash_loop_window seconds: a crash loop
    crash_loop_window: float = 300.0
    # Which agents an agent may call through the endpoint (`agent.call`): same-group, any, none (`_discovery.py`).
    agent_call_policy: str = "same-group"
    # Lifetimes of the TUF metadata (docs/updates.md §1): the endpoint re-signs timestamp and snapshot when less than
    # half is left; targets is the lifetime `pyagent release` gives a new targets version.
    tuf_timestamp_expiry_s: float = 86400.0
    tuf_snapshot_expiry_s: float = 604800.0
    tuf_targets_expiry_s: float = 7776000.0

    def __post_init__(self) -> None:
        for name in ("listen_port", "api_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number from 0 to 65535, got {port!r}")
        for name in ("listen_host", "api_host"):
            if not getattr(self, name):
                raise ConfigError(f"{name} must not be empty")
        for name in ("heartbeat_interval", "handshake_timeout", "tls_handshake_timeout", "cert_days", "rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86400:
                raise ConfigError(f"{name} must be a number of seconds in (0, 86400], got {value!r}")
        for name, low, high in (("max_in_flight", 1, 1 << 20), ("rate_burst", 1, 1 << 20),
                                ("max_connections", 1, 1 << 24)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if not isinstance(self.crash_max_report_bytes, int) or not 4096 <= self.crash_max_report_bytes <= 1 << 34:
            raise ConfigError(f"crash_max_report_bytes must be an integer from 4096 to 2**34, got "
                              f"{self.crash_max_report_bytes!r}")
        if not isinstance(self.crash_loop_count, int) or not 2 <= self.crash_loop_count <= 1000:
            raise ConfigError(f"crash_loop_count must be an integer from 2 to 1000, got {self.crash_loop_count!r}")
        if not isinstance(self.crash_loop_window, (int, float)) or not 0 < self.crash_loop_window <= 86400 * 7:
            raise ConfigError(f"crash_loop_window must be seconds in (0, 604800], got {self.crash_loop_window!r}")
        for name in ("tuf_timestamp_expiry_s", "tuf_snapshot_expiry_s", "tuf_targets_expiry_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1 <= value <= 10 * 365 * 86400:
                raise ConfigError(f"{name} must be a number of seconds from 1 to 10 years, got {value!r}")
        if self.agent_call_policy not in ("same-group", "any", "none"):
            raise ConfigError(f"agent_call_policy must be same-group, any or none, got {self.agent_call_policy!r}")
        if not isinstance(self.max_frame_bytes, int) or not 64 <= self.max_frame_bytes <= 1 << 30:
            raise ConfigError(f"max_frame_bytes must be an integer from 64 to 2**30, got {self.max_frame_bytes!r}")

    @property
    def idle_timeout(self) -> float:
        """A session that received nothing for this long is closed (protocol: 1.5 x heartbeat_interval)."""
        return 1.5 * self.heartbeat_interval
