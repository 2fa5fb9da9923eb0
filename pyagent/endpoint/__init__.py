"""The endpoint: accepts agent connections over TLS, keeps the registry, makes calls, serves the operator API."""

from pyagent.endpoint._config import (
    DEFAULT_API,
    DEFAULT_LISTEN,
    EndpointConfig,
    format_address,
    parse_address,
)
from pyagent.endpoint._endpoint import Endpoint
from pyagent.endpoint._errors import ConfigError, EndpointError, StateError
from pyagent.endpoint._log import KeyValueFormatter, configure_logging, log_event
from pyagent.endpoint._registry import AgentRecord
from pyagent.endpoint._state import State, StatePaths

__all__ = [
    "DEFAULT_API",
    "DEFAULT_LISTEN",
    "AgentRecord",
    "ConfigError",
    "Endpoint",
    "EndpointConfig",
    "EndpointError",
    "KeyValueFormatter",
    "State",
    "StatePaths",
    "StateError",
    "configure_logging",
    "format_address",
    "log_event",
    "parse_address",
]
