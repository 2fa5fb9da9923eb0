"""The worker's side of updates (docs/updates.md §2): `agent.update`, the updater process, state reports, and the
`healthy` mark of a probation.

`agent.update {kind, name, version, target, rollout}` is answered at once (`{"state": "offered"}`) and the work goes
on in the background: the worker runs `pyagent-host update …` (a short-lived task of the same executable: `tuf`,
`urllib3`, `ssl` and `cryptography` load there and never here), turns each JSON line it prints into an
`update.state` event of object `pyagent` (download progress at most once a second), and once the update is staged
reports `restarting`, waits up to 2 s for the outbox to be acknowledged and stops with EXIT_UPDATE: the supervisor
swaps the staged version in and starts the next worker on probation. That worker, once its first handshake with the
bundles loaded is done, writes `updates/healthy` with its pid (`mark_healthy`).

Refusals: `upgrades = false` in the agent config (-32007, state `refused` reported); no supervisor, or an update
already running (-32600).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyagent._files import write_atomic
from pyagent._updatenames import HOST_NAME, bundle_name_problem, version_problem
from pyagent.protocol import AGENT_BUSY, INVALID_PARAMS, INVALID_REQUEST, NOT_ALLOWED, ProtocolError
from pyagent.runtime._control import EXIT_UPDATE
from pyagent.runtime._ledger import OBJECT, UPDATE_EVENT, UPDATES_DIR
from pyagent.runtime._log import log_event
from pyagent.runtime._outbox import Outbox

PROBATION_FILE = "probation.json"
HEALTHY_FILE = "healthy"
KINDS = ("bundle", "host")
PARAMS = ("kind", "name", "version", "target", "rollout")
PROGRESS_INTERVAL = 1.0  # seconds between two `downloading` reports
ACK_WAIT = 2.0  # seconds to wait for the outbox before exiting to be swapped
UPDATER_TIMEOUT = 3600.0  # a download that takes longer is stopped and reported failed
STDERR_TAIL = 2000

_TARGET_RE = re.compile(r"[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*")

_log = logging.getLogger("pyagent.runtime.update")


@dataclass(frozen=True)
class Offer:
    kind: str
    name: str
    version: str
    target: str
    rollout: str | None

    def describe(self) -> str:
        return f"{self.kind} {self.name} {self.version}"

    def event(self, state: str, detail: str = "", **extra: Any) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "version": self.version, "state": state, "detail": detail,
                "rollout": self.rollout, **extra}


def parse_offer(params: Mapping[str, Any]) -> Offer:
    """Check `agent.update` params; raise ProtocolError(INVALID_PARAMS) naming the parameter."""
    def bad(key: str, problem: str) -> ProtocolError:
        return ProtocolError(INVALID_PARAMS, f"agent.update: parameter '{key}' {problem}", {"parameter": key})

    for key in params:
        if key not in PARAMS:
            raise bad(key, "is unknown")
    for key in ("kind", "name", "version", "target"):
        if key not in params:
            raise ProtocolError(INVALID_PARAMS, f"agent.update: missing parameter '{key}'", {"parameter": key})
        if not isinstance(params[key], str):
            raise bad(key, "must be a string")
    kind, name, version, target = (str(params[k]) for k in ("kind", "name", "version", "target"))
    if kind not in KINDS:
        raise bad("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "bundle" and (problem := bundle_name_problem(name)):
        raise bad("name", problem)
    if kind == "host":
        name = HOST_NAME
    if problem := version_problem(version):
        raise bad("version", problem)
    if not _TARGET_RE.fullmatch(target) or any(part in (".", "..") for part in target.split("/")):
        raise bad("target", f"must be a relative target path, got {target!r}")
    rollout = params.get("rollout")
    if rollout is not None and not isinstance(rollout, str):
        raise bad("rollout", "must be a string or null")
    return Offer(kind, name, version, target, rollout)


class Updates:
    """`agent.update` and the updater process of one worker."""

    def __init__(self, *, config_path: Path, state_dir: Path, upgrades: bool, supervised: bool, host_exe: str,
                 outbox: Outbox, request_exit: Callable[[int], None], env: Mapping[str, str] | None = None,
                 installed: Mapping[tuple[str, str], str] | None = None) -> None:
        self.config_path = Path(config_path)
        self.state_dir = Path(state_dir)
        self.upgrades = upgrades
        self.supervised = supervised
        self.host_exe = host_exe
        self.outbox = outbox
        self.request_exit = request_exit
        self.env = dict(os.environ if env is None else env)
        self.installed = dict(installed or {})  # (kind, name) -> the version this worker runs
        self.running: Offer | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_state = ""

    # --- the offer ---

    async def offer(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Answer `agent.update`; raise ProtocolError."""
        offer = parse_offer(params)
        if not self.upgrades:
            message = f"updates are disabled on this agent (upgrades = false in {self.config_path})"
            self._report(offer, "refused", message)
            log_event(_log, logging.WARNING, "update.refused", message, target=offer.target)
            raise ProtocolError(NOT_ALLOWED, message, {"kind": "upgrades", "method": "agent.update"})
        if not self.supervised:
            raise ProtocolError(INVALID_REQUEST, "updates need the supervisor (this worker runs with --foreground)")
        if self.running is not None:
            raise ProtocolError(AGENT_BUSY, f"an update is already running ({self.running.describe()})")
        pending = [f for f in ("staged.json", PROBATION_FILE) if (self.state_dir / UPDATES_DIR / f).exists()]
        if pending:  # a second swap now would end the first one's probation as a failure
            raise ProtocolError(AGENT_BUSY, f"an update is {'staged' if pending[0] == 'staged.json' else 'in probation'}"
                                            " on this agent; offer again when it has ended")
        if self.installed.get((offer.kind, offer.name)) == offer.version:
            self._report(offer, "committed", "already running this version")
            return {"state": "committed"}
        self.running = offer
        self._report(offer, "offered")
        log_event(_log, logging.INFO, "update.offered", f"update offered: {offer.describe()}", target=offer.target,
                  rollout=offer.rollout or "")
        self.task = asyncio.get_running_loop().create_task(self._run(offer), name="update")
        return {"state": "offered"}

    def _report(self, offer: Offer, state: str, detail: str = "", **extra: Any) -> int:
        self.last_state = state
        return self.outbox.put(OBJECT, UPDATE_EVENT, offer.event(state, detail, **extra))

    def command(self, offer: Offer) -> list[str]:
        cmd = [self.host_exe, "update", "--config", str(self.config_path), "--kind", offer.kind, "--name",
               offer.name, "--version", offer.version, "--target", offer.target]
        if offer.rollout is not None:
            cmd += ["--rollout", offer.rollout]
        return cmd

    # --- the updater process ---

    async def _run(self, offer: Offer) -> None:
        staged = False
        try:
            staged = await self._run_updater(offer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log_event(_log, logging.ERROR, "update.failed", f"update {offer.describe()} failed: {exc!r}",
                      exc_info=True)
            self._report(offer, "failed", f"io_error: {exc}", reason="io_error")
        finally:
            if not staged:
                self.running = None
        if staged:
            seq = self._report(offer, "restarting", "the worker exits to be swapped by the supervisor")
            log_event(_log, logging.INFO, "update.restarting", f"{offer.describe()} staged: restarting")
            await self._wait_acked(seq, ACK_WAIT)
            self.request_exit(EXIT_UPDATE)

    async def _run_updater(self, offer: Offer) -> bool:
        proc = await asyncio.create_subprocess_exec(
            *self.command(offer), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=self.env)
        assert proc.stdout is not None and proc.stderr is not None
        errors = asyncio.get_running_loop().create_task(_tail(proc.stderr, STDERR_TAIL))
        outcome: dict[str, Any] = {}
        try:
            await asyncio.wait_for(self._read_lines(offer, proc.stdout, outcome), UPDATER_TIMEOUT)
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            _kill(proc)
            await proc.wait()
            self._report(offer, "failed", f"the updater took longer than {UPDATER_TIMEOUT:.0f} s",
                         reason="repository_unreachable")
            return False
        except BaseException:
            _kill(proc)
            await asyncio.shield(proc.wait())
            raise
        finally:
            stderr = await errors
        if code == 0 and outcome.get("staged"):
            return True
        if not outcome.get("failed"):
            tail = stderr.strip().splitlines()[-1:] if stderr.strip() else []
            detail = f"the updater exited with code {code}" + (f": {tail[0]}" if tail else "")
            self._report(offer, "failed", detail, reason="io_error")
            log_event(_log, logging.ERROR, "update.failed", detail, stderr=stderr[-500:])
        return False

    async def _read_lines(self, offer: Offer, stdout: asyncio.StreamReader, outcome: dict[str, Any]) -> None:
        last_progress = 0.0
        while True:
            raw = await stdout.readline()
            if not raw:
                return
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            state = line.get("state") if isinstance(line, dict) else None
            if not isinstance(line, dict) or not isinstance(state, str):
                log_event(_log, logging.WARNING, "update.line.skipped", "updater printed a line that is not a state",
                          line=raw[:120].decode("utf-8", "replace"))
                continue
            if state == "downloading":
                done, total = line.get("bytes"), line.get("total")
                now = time.monotonic()
                final = isinstance(done, int) and done == total
                if self.last_state != "downloading" or final or now - last_progress >= PROGRESS_INTERVAL:
                    last_progress = now
                    self._report(offer, "downloading", "", progress={"bytes": done, "total": total})
            elif state == "verifying":
                self._report(offer, "verifying")
            elif state == "staged":
                outcome["staged"] = True
                self._report(offer, "staged", str(line.get("dir", "")))
                log_event(_log, logging.INFO, "update.staged", f"{offer.describe()} staged",
                          dir=str(line.get("dir", "")))
            elif state == "failed":
                outcome["failed"] = True
                reason = str(line.get("reason", "io_error"))
                detail = f"{reason}: {line.get('detail', '')}"
                self._report(offer, "failed", detail, reason=reason)
                log_event(_log, logging.WARNING, "update.failed", f"update {offer.describe()} failed: {detail}",
                          reason=reason)

    async def _wait_acked(self, seq: int, timeout: float) -> bool:
        """Wait until the endpoint acknowledged every event up to `seq` (bounded)."""
        deadline = time.monotonic() + timeout
        while any(rec["seq"] <= seq for rec in self.outbox.pending()):
            if time.monotonic() >= deadline:
                log_event(_log, logging.INFO, "update.ack.timeout",
                          "the outbox was not acknowledged in time; its events stay queued on disk")
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        """Stop a running updater (the runtime is shutting down); bounded."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=2.0)

    # --- probation ---

    def mark_healthy(self) -> bool:
        """After the first handshake with the bundles loaded: during a probation, tell the supervisor this worker
        is healthy (`updates/healthy` holds its pid). True when the mark was written."""
        updates = self.state_dir / UPDATES_DIR
        if not (updates / PROBATION_FILE).exists():
            return False
        try:
            write_atomic(updates / HEALTHY_FILE, f"{os.getpid()}\n".encode(), 0o644)
        except OSError as exc:
            log_event(_log, logging.ERROR, "update.healthy.failed", f"cannot write {updates / HEALTHY_FILE}: {exc}")
            return False
        log_event(_log, logging.INFO, "update.healthy", "probation: handshake done with the bundles loaded",
                  pid=os.getpid())
        return True


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


async def _tail(stream: asyncio.StreamReader, limit: int) -> str:
    data = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            return data.decode("utf-8", "replace")
        data = (data + chunk)[-limit:]
