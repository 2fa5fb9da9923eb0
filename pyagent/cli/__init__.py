"""The `pyagent` operator command line (`pyagent endpoint serve`, `agents ls|show`, `call`, `demo`)."""

from pyagent.cli._errors import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from pyagent.cli._main import build_parser, main

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "build_parser", "main"]
