"""A test bundle that reports on the worker it runs in."""

import asyncio
import os
import sys

from pyagent.runtime import Agent, method


class Probe(Agent):
    @method
    def modules(self) -> list:
        """Names of every module loaded in the worker (a None entry is a blocked import, not a module)."""
        return sorted(name for name, module in sys.modules.items() if module is not None)

    @method
    def pid(self) -> int:
        """The worker's process id."""
        return os.getpid()

    @method
    async def sleep(self, seconds: float) -> float:
        """Sleep without blocking the loop, then return the time slept."""
        await asyncio.sleep(seconds)
        return seconds

    @method
    def fail(self, message: str) -> None:
        """Raise ValueError(message)."""
        raise ValueError(message)

    @method
    def echo(self, value: object = None) -> object:
        """Return what it was given."""
        return value
