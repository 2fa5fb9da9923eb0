"""The endpoint's exceptions: one base class, one subclass per kind of failure an operator can act on."""

from __future__ import annotations


class EndpointError(Exception):
    """Base class of every error the endpoint raises (protocol errors travel as `RemoteError` instead)."""


class ConfigError(EndpointError):
    """The endpoint configuration is invalid; the message names the setting."""


class StateError(EndpointError):
    """The state directory cannot be used (unreadable file, partial CA, bad permissions...); the message names the file."""
