"""The `hello` bundle: a greeting and a few platform facts."""

from __future__ import annotations

import os
import platform
import socket
from typing import Any

from pyagent.runtime import Agent, method, setting


class Hello(Agent):
    """Says hello and describes the machine it runs on."""

    capabilities = ("greeting",)

    greeting: str = setting("Hello", min_length=1, max_length=40, help="the word greet() starts with")

    @method
    async def greet(self, name: str) -> str:
        """Return a greeting for `name`."""
        return f"{self.greeting}, {name}!"

    @method
    def sysinfo(self) -> dict[str, Any]:
        """Facts about this machine: OS, host name, Python version, process id, CPUs, load average, uptime in
        seconds and memory in bytes. Values that cannot be read here are null."""
        uname = platform.uname()
        return {
            "system": uname.system,
            "release": uname.release,
            "machine": uname.machine,
            "hostname": socket.gethostname(),
            "python": platform.python_version(),
            "pid": os.getpid(),
            "cpu_count": os.cpu_count(),
            "load_average": _load_average(),
            "uptime_s": _uptime(),
            "memory": _memory(),
        }


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _uptime() -> float | None:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _memory() -> dict[str, int | None]:
    """Total and available memory in bytes from /proc/meminfo (null where absent)."""
    wanted = {"MemTotal": "total_bytes", "MemAvailable": "available_bytes"}
    out: dict[str, int | None] = dict.fromkeys(wanted.values(), None)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    fields = rest.split()
                    value = int(fields[0])
                    out[wanted[key]] = value * 1024 if len(fields) > 1 and fields[1] == "kB" else value
    except (OSError, ValueError, IndexError):
        pass
    return out
