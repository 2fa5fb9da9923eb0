"""Certificate renewal over the live session, at ~2/3 of the certificate's lifetime (DESIGN §6, issue 3).

The worker never loads `ssl` or `cryptography` (DESIGN §2): the short-lived `pyagent-host enroll` process does the
cryptography, this module only schedules and carries messages.

1. `agent.crt.json` (written next to the certificate by `pyagent-host enroll`) gives `received` and `not_after`
   (ms since the epoch); renewal is due at `received + 2/3 * (not_after - received)`. Without the file the worker
   runs `pyagent-host enroll --cert-info` once to write it.
2. When due and a session is up: `pyagent-host enroll --new-key` writes `agent.key.next` and prints a CSR; the
   worker sends it in `enroll.renew` on the live session (authenticated by the current certificate); the result
   goes to `pyagent-host enroll --install` on stdin, which checks it and replaces `agent.key` and `agent.crt`.
3. The host reads the key and the certificate at every connect: the live session is not touched, the next
   connection presents the new certificate.

A failed attempt (no session, the endpoint refused, a subprocess failed) is logged and retried: after 1/10 of the
time left, at least RETRY_MIN_S, at most RETRY_MAX_S.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pyagent.runtime._log import log_event

CERT_INFO_FILE = "agent.crt.json"
RENEW_FRACTION = 2 / 3
RETRY_MIN_S = 1.0
RETRY_MAX_S = 300.0
SUBPROCESS_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 30.0
SESSION_POLL_S = 0.5
MAX_OUTPUT_BYTES = 1 << 20

Request = Callable[[str, Mapping[str, Any], float], Awaitable[Any]]

_log = logging.getLogger("pyagent.runtime")


class RenewError(Exception):
    pass


def renewal_due(info: Mapping[str, Any]) -> float:
    """When (seconds since the epoch) the certificate described by `info` should be renewed."""
    received, not_after = info.get("received"), info.get("not_after")
    if not isinstance(received, int) or not isinstance(not_after, int) or isinstance(received, bool) \
            or isinstance(not_after, bool):
        raise RenewError(f"{CERT_INFO_FILE}: 'received' and 'not_after' must be integers (ms), got {dict(info)!r}")
    return (received + (not_after - received) * RENEW_FRACTION) / 1000


class Renewer:
    """Runs renewal for the certificate in `state_dir`; `command` starts `pyagent-host enroll` (the same binary)."""

    def __init__(self, state_dir: Path, command: Sequence[str], *, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = Path(state_dir)
        self.command = list(command)
        self.clock = clock
        self.renewals = 0
        self.failures = 0
        self.info: dict[str, Any] | None = None

    async def _run_enroll(self, args: Sequence[str], stdin: bytes | None = None, *, finish: bool = False) -> bytes:
        """Run `pyagent-host enroll ARGS --state-dir DIR`; its stdout, or RenewError with its stderr. With `finish`
        a cancelled run still lets the child finish (bounded): `--install` must not stop between key and cert."""
        proc = await asyncio.create_subprocess_exec(
            *self.command, *args, "--state-dir", str(self.state_dir),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), SUBPROCESS_TIMEOUT_S)
        except BaseException:  # timeout or cancelled: do not leave the child behind
            if proc.returncode is None and finish:
                try:
                    await asyncio.wait_for(proc.wait(), 3.0)
                except BaseException:
                    pass
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            raise
        if proc.returncode != 0:
            text = err.decode("utf-8", "replace").strip()[-2000:]
            raise RenewError(f"pyagent-host enroll {args[0]} failed (exit code {proc.returncode}): {text}")
        return out[:MAX_OUTPUT_BYTES]

    async def load_info(self) -> dict[str, Any]:
        """agent.crt.json, written first (from agent.crt) when missing or older than the certificate."""
        path = self.state_dir / CERT_INFO_FILE
        cert = self.state_dir / "agent.crt"
        try:
            stale = not path.exists() or path.stat().st_mtime < cert.stat().st_mtime
        except OSError:
            stale = True
        if stale:
            await self._run_enroll(["--cert-info"])
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RenewError(f"cannot read {path}: {exc}") from None
        if not isinstance(info, dict):
            raise RenewError(f"{path}: not a JSON object")
        renewal_due(info)  # validates
        self.info = info
        return info

    async def renew_once(self, request: Request) -> dict[str, Any]:
        """One renewal: new key, `enroll.renew`, install. Returns the new cert info."""
        csr = (await self._run_enroll(["--new-key"])).decode("ascii", "replace")
        if "BEGIN CERTIFICATE REQUEST" not in csr:
            raise RenewError("pyagent-host enroll --new-key printed no CSR")
        result = await request("enroll.renew", {"csr": csr}, REQUEST_TIMEOUT_S)
        out = await self._run_enroll(["--install"], json.dumps(result).encode(), finish=True)
        try:
            info = json.loads(out)
        except ValueError as exc:
            raise RenewError(f"pyagent-host enroll --install printed no cert info: {exc}") from None
        if not isinstance(info, dict):
            raise RenewError("pyagent-host enroll --install printed no cert info")
        self.info = info
        return info

    async def run(self, request: Request, connected: Callable[[], bool]) -> None:
        """Renew forever (cancel to stop)."""
        try:
            info = await self.load_info()
        except (RenewError, OSError) as exc:
            log_event(_log, logging.ERROR, "cert.renew.disabled",
                      f"certificate renewal is off: {exc}; the agent must re-enroll when its certificate expires")
            return
        due = renewal_due(info)
        log_event(_log, logging.INFO, "cert.renew.scheduled", "certificate renewal scheduled",
                  serial=info.get("serial"), in_s=round(max(due - self.clock(), 0.0), 1),
                  not_after_ms=info.get("not_after"))
        while True:
            await asyncio.sleep(max(due - self.clock(), 0.0))
            while not connected():
                await asyncio.sleep(SESSION_POLL_S)
            old_serial = info.get("serial")
            try:
                info = await self.renew_once(request)
                due = max(renewal_due(info), self.clock() + RETRY_MIN_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RemoteError, timeout, RenewError, OSError: keep the old certificate
                self.failures += 1
                left = max(int(info.get("not_after", 0)) / 1000 - self.clock(), 0.0)
                retry = min(max(left / 10, RETRY_MIN_S), RETRY_MAX_S)
                log_event(_log, logging.WARNING, "cert.renew.failed",
                          f"certificate renewal failed, retrying in {retry:.1f} s: {exc}",
                          serial=old_serial, expires_in_s=round(left, 1))
                due = self.clock() + retry
                continue
            self.renewals += 1
            log_event(_log, logging.INFO, "cert.renewed", "certificate renewed; the next connection uses it",
                      old_serial=old_serial, serial=info.get("serial"), not_after_ms=info.get("not_after"),
                      next_in_s=round(max(due - self.clock(), 0.0), 1))
