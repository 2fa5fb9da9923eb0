"""The `traffic` bundle: run `command` (with `{target}` replaced) for each target, at random intervals.

    [agents.traffic]
    command = ["curl", "-s", "-o", "/dev/null", "http://{target}/"]
    targets = ["10.0.0.1", "10.0.0.2"]
    distribution = "expo"          # minmax, expo, gamma, pareto
    params = [5.0, 30.0]           # minmax: lo, hi; expo: mean, cap; gamma: k, theta, cap; pareto: alpha, scale, cap
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Literal

from pyagent.runtime import Agent, Distribution, expo, gamma, method, minmax, pareto, periodic, setting

_MAKERS = {"minmax": minmax, "expo": expo, "gamma": gamma, "pareto": pareto}


class Traffic(Agent):
    """Generates traffic: runs `command` against every target, one round per interval."""

    capabilities = ("traffic",)

    command: list[str] = setting(["true"], min_length=1, help="argv; '{target}' is replaced by the target")
    targets: list[str] = setting([], help="targets, one run each per round")
    distribution: Literal["minmax", "expo", "gamma", "pareto"] = setting("minmax", help="interval distribution")
    params: list[float] = setting([5.0, 15.0], min_length=1, max_length=3, help="the distribution's parameters")
    timeout: float = setting(30.0, gt=0, help="seconds before a run is killed")

    def confirm_config(self, values: Mapping[str, Any]) -> None:
        _make(values["distribution"], values["params"])  # ValueError names the problem

    def interval(self) -> Distribution:
        return _make(self.distribution, self.params)

    @method
    async def run_once(self) -> list[dict[str, Any]]:
        """Run one round now and return the results (also emitted as `result` events)."""
        return await self.round()

    @periodic(lambda self: self.interval())
    async def round(self) -> list[dict[str, Any]]:
        """One round: the command against every target, concurrently."""
        results = list(await asyncio.gather(*(self._run(t) for t in self.targets)))
        for result in results:
            self.emit("result", result)
        return results

    async def _run(self, target: str) -> dict[str, Any]:
        argv = [arg.replace("{target}", target) for arg in self.command]
        start = time.monotonic()
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.STDOUT)
        except OSError as exc:
            return {"target": target, "ok": False, "error": str(exc), "duration_ms": 0.0}
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {"target": target, "ok": False, "error": "timeout", "duration_ms": self.timeout * 1000}
        return {"target": target, "ok": proc.returncode == 0, "code": proc.returncode,
                "duration_ms": round((time.monotonic() - start) * 1000, 1),
                "output": out[-200:].decode("utf-8", "replace")}


def _make(kind: str, params: list[float]) -> Distribution:
    try:
        return _MAKERS[kind](*params)  # type: ignore[operator]
    except TypeError:
        raise ValueError(f"distribution {kind} does not take {len(params)} parameters") from None
