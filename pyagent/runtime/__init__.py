"""The Python side of `pyagent-host`: agent config, bundles, the `Agent` API and dispatch.

Bundle authors need `Agent`, `method`, `setting`, `periodic` (with `minmax`, `expo`, `gamma`, `pareto`) and
`SharedService` (docs/bundles.md). The host calls `pyagent.runtime.worker.main(argv)`. Everything here
uses the standard library only (it runs in the lean worker process, where `ssl` is blocked).
"""

from pyagent.runtime._agent import Agent, method
from pyagent.runtime._agentconfig import ConfigValueError, setting
from pyagent.runtime._bridge import Bridge, HostModule, import_host
from pyagent.runtime._bundle import Bundle, load_bundle, load_bundles
from pyagent.runtime._config import (
    DEFAULT_CONFIG_PATH,
    AgentConfig,
    Endpoint,
    Limits,
    Reconnect,
    load_config,
    parse_endpoint,
)
from pyagent.protocol import AGENT_PAUSED
from pyagent.runtime._control import CONTROL_METHODS, EXIT_RESTART, Controller, describe
from pyagent.runtime._dispatch import Dispatcher, Session
from pyagent.runtime._errors import (
    BundleError,
    ConfigError,
    HostError,
    IdentityError,
    MessageTooLargeError,
    PyagentRuntimeError,
    RequestTimeoutError,
    RuntimeStoppedError,
)
from pyagent.runtime._fakehost import FakeHost, FakeHostError
from pyagent.runtime._identity import load_or_create_agent_id
from pyagent.runtime._log import HostLogHandler, log_event
from pyagent.runtime._outbox import Outbox
from pyagent.runtime._periodic import Distribution, distribution, expo, gamma, minmax, pareto, periodic
from pyagent.runtime._runtime import Runtime
from pyagent.runtime._shared import SharedService, SharedServiceError

__all__ = [
    "AGENT_PAUSED",
    "CONTROL_METHODS",
    "DEFAULT_CONFIG_PATH",
    "EXIT_RESTART",
    "Agent",
    "AgentConfig",
    "Bridge",
    "Bundle",
    "BundleError",
    "ConfigError",
    "ConfigValueError",
    "Controller",
    "Distribution",
    "Dispatcher",
    "Endpoint",
    "FakeHost",
    "FakeHostError",
    "HostError",
    "HostLogHandler",
    "HostModule",
    "IdentityError",
    "Limits",
    "MessageTooLargeError",
    "Outbox",
    "PyagentRuntimeError",
    "Reconnect",
    "RequestTimeoutError",
    "Runtime",
    "RuntimeStoppedError",
    "Session",
    "SharedService",
    "SharedServiceError",
    "describe",
    "distribution",
    "expo",
    "gamma",
    "import_host",
    "load_bundle",
    "load_bundles",
    "load_config",
    "load_or_create_agent_id",
    "log_event",
    "method",
    "minmax",
    "pareto",
    "parse_endpoint",
    "periodic",
    "setting",
]
