"""Exit codes and the CLI's exceptions (each carries the exit code it ends the command with)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the endpoint or an agent answered with an error
EXIT_USAGE = 2  # bad command line or local configuration
EXIT_UNREACHABLE = 3  # no endpoint to talk to
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A failure to report on stderr, without a traceback."""

    exit_code = EXIT_FAILED


class UsageError(CliError):
    exit_code = EXIT_USAGE


class UnreachableError(CliError):
    exit_code = EXIT_UNREACHABLE


class ApiError(CliError):
    """The endpoint API refused the request (HTTP 4xx/5xx)."""

    def __init__(self, status: int, code: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
