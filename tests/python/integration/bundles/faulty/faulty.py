"""A test bundle for error reports: a method that raises, a periodic task that raises once when armed, and a crash
scheduled a few seconds ahead (so a test can stop the endpoint before it happens)."""

import asyncio

import _pyagent_host

from pyagent.runtime import Agent, method, periodic


def fail_deep(message: str) -> None:
    raise ValueError(message)


class Faulty(Agent):
    armed = False

    @method
    def fail(self, message: str) -> None:
        """Raise ValueError(message) (the caller gets -32603; the endpoint gets an error report)."""
        fail_deep(message)

    @method
    def arm(self) -> str:
        """Make the next run of the periodic task raise."""
        self.armed = True
        return "armed"

    @periodic(0.1)
    def tick(self) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("periodic tick failed")

    @method
    async def crash_later(self, kind: str, seconds: float, thread: str = "main") -> str:
        """Crash the worker `seconds` from now through the host's test hook."""
        asyncio.get_running_loop().call_later(seconds, _pyagent_host.crash_test, kind, thread)
        return "scheduled"
