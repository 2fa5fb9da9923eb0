"""The runtime's exceptions: one base, one class per kind of failure the caller may want to tell apart."""

from __future__ import annotations


class PyagentRuntimeError(Exception):
    """Base of every error the runtime raises on purpose."""


class ConfigError(PyagentRuntimeError):
    """The agent config is unreadable or invalid; the message names the file and the key (exit code 2)."""


class BundleError(PyagentRuntimeError):
    """A bundle could not be loaded; the message names the bundle directory (exit code 2)."""


class IdentityError(PyagentRuntimeError):
    """The agent id could not be read or created in the state directory (exit code 1)."""


class HostError(PyagentRuntimeError):
    """`_pyagent_host` refused an operation (its `error` exception, translated at the bridge)."""


class RequestTimeoutError(PyagentRuntimeError, TimeoutError):
    """A request the runtime sent got no response in time."""


class RuntimeStoppedError(PyagentRuntimeError):
    """The runtime is not running (not started yet, or stopping), so the request cannot complete."""


class MessageTooLargeError(PyagentRuntimeError):
    """An outgoing message is larger than `limits.max_frame_bytes`."""
