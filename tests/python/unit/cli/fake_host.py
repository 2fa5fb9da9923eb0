"""A stand-in for `pyagent-host --foreground --config agent.toml`, for testing `pyagent demo` without the C host.

It reads the agent config, enrolls (pyagent.runtime.enroll, in-process), dials the first endpoint over mutual TLS
(pinned CA, its client certificate), says hello with the configured bundles,
answers hello.greet, sends heartbeats every heartbeat_interval with the measured round trip, and exits 0 on SIGTERM.
FAKE_HOST_MODE=crash makes it fail at once with a message on stderr; FAKE_HOST_MODE=hang ignores SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "endpoint"))

from fakeagent import FakeAgent, greet  # noqa: E402


async def run(config_path: Path) -> int:
    config = tomllib.loads(config_path.read_text())
    state_dir = Path(config["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    id_file = state_dir / "agent-id"
    host, _, port = config["endpoints"][0].rpartition(":")

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if os.environ.get("FAKE_HOST_MODE") == "hang":
        loop.add_signal_handler(signal.SIGTERM, lambda: None)
    else:
        loop.add_signal_handler(signal.SIGTERM, stop.set)

    # Enroll as the real host does (key made here, CSR + token over TLS), then connect with mutual TLS.
    from pyagent.runtime import enroll

    cert, key = state_dir / enroll.CERT_FILE, state_dir / enroll.KEY_FILE
    if not cert.exists():
        code = await asyncio.to_thread(enroll.main, ["--config", str(config_path)],
                                       {**os.environ, enroll.TOKEN_ENV: config["token"]})
        if code != 0:
            return code
    agent_id = id_file.read_text().strip()
    agent = await FakeAgent.connect(host, int(port), config["ca"], on_call=greet, cert=cert, key=key)
    try:
        bundles = [{"name": Path(b).name, "version": "1.0.0", "agents": [Path(b).name]} for b in config["bundles"]]
        reply = await agent.hello(None, agent_id=agent_id, name=config["name"], bundles=bundles,
                                  host={"version": "0.0.0-fake", "python": sys.version.split()[0]})
        if "error" in reply:
            print(f"fake host: hello refused: {reply['error']}", file=sys.stderr)
            return 1
        interval = float(reply["result"]["heartbeat_interval"])
        print(f"fake host: session.up agent_id={agent_id}", file=sys.stderr, flush=True)
        rtt_ms: float | None = None
        seq = 0
        while not stop.is_set():
            seq += 1
            sent = time.perf_counter()
            await agent.heartbeat(seq=seq, rtt_ms=rtt_ms, skew_ms=0.0 if rtt_ms is not None else None)
            rtt_ms = (time.perf_counter() - sent) * 1000
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
    finally:
        await agent.close()
    return 0


def main() -> int:
    args = sys.argv[1:]
    if len(args) != 3 or args[0] != "--foreground" or args[1] != "--config":
        print(f"fake host: usage: --foreground --config FILE (got {args})", file=sys.stderr)
        return 2
    if os.environ.get("FAKE_HOST_MODE") == "crash":
        print("fake host: boom, cannot start", file=sys.stderr)
        return 7
    return asyncio.run(run(Path(args[2])))


if __name__ == "__main__":
    sys.exit(main())
