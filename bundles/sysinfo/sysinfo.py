"""The `sysinfo` bundle: a periodic `report` event with CPU, memory, disk and network figures from /proc."""

from __future__ import annotations

import os
import time
from typing import Any

from pyagent.runtime import Agent, method, periodic, setting


class SysInfo(Agent):
    """CPU, memory, disk and network use of this machine, as `report` events and on demand."""

    capabilities = ("metrics",)

    interval: float = setting(30.0, ge=1.0, le=86400.0, help="seconds between two reports")
    paths: list[str] = setting(["/"], min_length=1, help="file systems whose use is reported")

    async def init(self) -> None:
        self._last_cpu = _cpu_times()
        self._last_net = (_net_bytes(), time.monotonic())

    @method
    def snapshot(self) -> dict[str, Any]:
        """The current figures: cpu (percent busy since the last report or snapshot, load average), memory (bytes),
        disks (per path: total/used/free bytes) and network (bytes per second since the last report or snapshot)."""
        cpu = _cpu_times()
        now = time.monotonic()
        net = _net_bytes()
        last_cpu, (last_net, last_t) = self._last_cpu, self._last_net
        self._last_cpu, self._last_net = cpu, (net, now)
        busy = total = 0
        if cpu and last_cpu:
            total = sum(cpu) - sum(last_cpu)
            busy = total - ((cpu[3] + cpu[4]) - (last_cpu[3] + last_cpu[4]))  # idle + iowait
        elapsed = max(now - last_t, 1e-6)
        return {
            "cpu": {"percent": round(100.0 * busy / total, 1) if total > 0 else None,
                    "count": os.cpu_count(), "load_average": list(os.getloadavg())},
            "memory": _meminfo(),
            "disks": {path: _disk(path) for path in self.paths},
            "network": {dev: {"rx_bytes_per_s": round((rx - last_net.get(dev, (rx, tx))[0]) / elapsed, 1),
                              "tx_bytes_per_s": round((tx - last_net.get(dev, (rx, tx))[1]) / elapsed, 1),
                              "rx_bytes": rx, "tx_bytes": tx}
                        for dev, (rx, tx) in net.items()},
        }

    @periodic(lambda self: self.interval)
    def report(self) -> None:
        """Emit a `report` event with `snapshot()`."""
        self.emit("report", self.snapshot())


def _cpu_times() -> list[int]:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def _meminfo() -> dict[str, int]:
    wanted = {"MemTotal": "total", "MemAvailable": "available", "SwapTotal": "swap_total", "SwapFree": "swap_free"}
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in wanted:
                    out[wanted[key]] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _disk(path: str) -> dict[str, int] | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return {"total": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize,
            "used": (st.f_blocks - st.f_bfree) * st.f_frsize}


def _net_bytes() -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    try:
        with open("/proc/net/dev", encoding="ascii") as f:
            for line in f.readlines()[2:]:
                dev, _, rest = line.partition(":")
                fields = rest.split()
                out[dev.strip()] = (int(fields[0]), int(fields[8]))
    except (OSError, ValueError, IndexError):
        pass
    return out
