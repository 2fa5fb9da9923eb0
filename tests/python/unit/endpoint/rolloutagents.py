"""Scripted fake agents for the rollout tests: they answer `agent.update` and report `update.state` events through
`event.batch`, like the real updater (docs/updates.md §2), with a behaviour chosen per agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from fakeagent import FakeAgent

from pyagent.endpoint import Endpoint
from pyagent.protocol import AGENT_BUSY, error_response, response

_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(url: str, method: str, body: bytes | None, token: str) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with _opener.open(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


async def api(ep: Endpoint, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    assert ep.api_url is not None
    data = None if body is None else json.dumps(body).encode()
    return await asyncio.to_thread(_http, ep.api_url + path, method, data, ep.state.operator_token)


async def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> Any:
    """Poll `check()` (sync or async) every 50 ms until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


class FakeRepo:
    """The stand-in for the TUF repository's `find_target` (pyagent/endpoint/_tufrepo.py)."""

    def __init__(self, *released: tuple[str, str, str, str | None]) -> None:
        self.released = set(released)

    def find_target(self, kind: str, name: str, version: str, platform: str | None = None) -> str | None:
        if (kind, name, version, platform) not in self.released:
            return None
        if kind == "bundle":
            return f"bundles/{name}/{version}.tar.gz"
        return f"hosts/{platform}/{version}/pyagent-host"


# What an agent does with an offer: the states it reports after "offered" ("refuse": answer -32007).
COMMIT = ("downloading", "verifying", "staged", "restarting", "probation", "committed")
FAIL = ("downloading", "failed")
ROLL_BACK = ("downloading", "verifying", "staged", "restarting", "probation", "rolled_back")
HANG = ("downloading", "probation")  # never ends
REFUSE = "refuse"
SILENT = "silent"  # accepts the offer, then never reports anything

OFFERS: list[tuple[float, str]] = []  # (time, agent_id) of every offer any scripted agent received


class ScriptedAgent:
    def __init__(self, agent: FakeAgent, agent_id: str, script: Any, step: float) -> None:
        self.agent = agent
        self.agent_id = agent_id
        self.script = script
        self.step = step
        self.offers: list[dict[str, Any]] = []
        self.busy = 0  # answer this many more offers -32011 agent_busy (another update runs on the agent)
        self.seq = 0
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._reports: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, ep: Endpoint, agent_id: str, script: Any = COMMIT, *, step: float = 0.02,
                    bundle_version: str = "1.0.0", host_version: str = "0.1.0", labels: dict[str, str] | None = None,
                    machine: str = "x86_64") -> ScriptedAgent:
        agent = await FakeAgent.connect("127.0.0.1", ep.listen_port, ep.paths.ca_cert)
        reply = await agent.hello(ep.state.agent_token, agent_id=agent_id, name=agent_id,
                                  host={"version": host_version, "python": "3.11.2"},
                                  bundles=[{"name": "hello", "version": bundle_version, "agents": ["hello"]}],
                                  labels=labels or {"env": "test"},
                                  platform={"system": "Linux", "machine": machine, "hostname": agent_id})
        assert "result" in reply, reply
        return cls(agent, agent_id, script, step)

    async def _serve(self) -> None:
        with contextlib.suppress(EOFError):
            while True:
                try:
                    msg = await self.agent.recv(timeout=60)
                except TimeoutError:
                    continue
                if msg.get("method") != "agent.update":
                    continue
                params = msg["params"]
                self.offers.append(params)
                OFFERS.append((time.monotonic(), self.agent_id))
                if self.busy > 0:
                    self.busy -= 1
                    await self.agent.send(error_response(msg["id"], AGENT_BUSY, "an update is already running "
                                                         "(bundle hello 9.9.9: downloading)"))
                    continue
                if self.script == REFUSE:
                    await self.agent.send(error_response(msg["id"], -32007, "updates are disabled on this agent "
                                                         "(upgrades = false in agent.toml)"))
                    await self.report(params, "refused", "upgrades = false")
                    continue
                await self.agent.send(response(msg["id"], {"state": "offered"}))
                if self.script == SILENT:
                    continue
                task = asyncio.get_running_loop().create_task(self._progress(params))
                self._reports.add(task)
                task.add_done_callback(self._reports.discard)

    async def _progress(self, params: dict[str, Any]) -> None:
        with contextlib.suppress(EOFError, ConnectionError):
            await self.report(params, "offered")
            step = 0
            while step < len(self.script):  # read at each step: a test may change the script meanwhile
                await asyncio.sleep(self.step)
                state = self.script[step]
                step += 1
                await self.report(params, state, "exit code 2" if state == "rolled_back" else "")

    async def report(self, params: dict[str, Any], state: str, detail: str = "", **extra: Any) -> dict[str, Any]:
        self.seq += 1
        data = {"kind": params["kind"], "name": params["name"], "version": params["version"], "state": state,
                "detail": detail, "rollout": params.get("rollout"), **extra}
        return await self.agent.request("event.batch", {"events": [{
            "seq": self.seq, "agent": "pyagent", "event": "update.state", "data": data,
            "time": int(time.time() * 1000)}]})

    async def close(self) -> None:
        self._task.cancel()
        for task in list(self._reports):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._reports:
            await asyncio.wait(set(self._reports), timeout=3)
        await self.agent.close()


async def close_all(agents: list[ScriptedAgent]) -> None:
    await asyncio.gather(*(a.close() for a in agents))
