"""A test bundle that crashes the worker through the host's test hook, or blocks its event loop."""

import asyncio
import time

import _pyagent_host

from pyagent.runtime import Agent, method


def crash_here(kind: str, thread: str) -> None:
    """The Python frame the faulthandler traceback must show."""
    _pyagent_host.crash_test(kind, thread)


class Crasher(Agent):
    @method
    async def crash(self, kind: str, thread: str = "main") -> str:
        """Crash the worker: kind segv/abort/stack_overflow on the main or the libuv thread.

        The crash is scheduled after the reply so the caller sees the call accepted."""
        asyncio.get_running_loop().call_later(0.2, crash_here, kind, thread)
        return "crashing"

    @method
    def try_crash(self, kind: str, thread: str = "main") -> str:
        """Call the hook directly (returns the refusal when test crashes are not allowed)."""
        try:
            crash_here(kind, thread)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "returned"

    @method
    def block(self, seconds: float) -> float:
        """Block the event loop (a hang for the watchdog)."""
        time.sleep(seconds)
        return seconds
