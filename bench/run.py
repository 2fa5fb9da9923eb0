"""pyagent benchmarks: one JSON object on stdout.

An endpoint runs in this process (the same `Endpoint` class `pyagent endpoint serve` runs) and a real `pyagent-host`
with bundles/hello runs as a child, over TLS on 127.0.0.1. Figures:

- start_to_handshake_ms: process spawn -> the endpoint has the agent's session (median of several starts)
- worker_rss_mb / worker_pss_mb / worker_uss_mb: the host process after 10 s idle with bundles/hello (USS = private
  pages, what one more agent process costs; RSS also counts shared library pages such as libpython and libcrypto)
- rpc_p50_us / rpc_p99_us / rpc_seq_per_s: endpoint -> agent method -> back, one call at a time
- rpc_pipelined_per_s: the same with 1,000 calls in flight
- fanout_5_agents_ms: one operator call fanned out to 5 agents (`*`), until all replied (median)
- schema_validation_us_greet / _rich: the runtime's parameter check per call (msgspec), in process, minus no check
- rollout_10_agents_s: release a bundle version -> all of 10 supervised agents committed it (bench/rollout.py)

Budgets live in shared/DESIGN.md section 9; nothing here asserts them. Usage: python bench/run.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from typing import Annotated, Literal  # noqa: E402

import msgspec  # noqa: E402

from pyagent.endpoint import Endpoint, EndpointConfig  # noqa: E402
from pyagent.runtime import Agent, method  # noqa: E402

from _host import host_binary  # noqa: E402  (bench/ is on sys.path when run as bench/run.py)


def write_agent_config(workdir: Path, ep: Endpoint, name: str) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "agent.toml"
    config.write_text(
        f'name = "{name}"\n'
        f'state_dir = "{workdir / "state"}"\n'
        f'endpoints = ["{ep.listen_address}"]\n'
        f'ca = "{ep.paths.ca_cert}"\n'
        f'token = "{ep.tokens.create_enroll_token(uses=1)[0]}"\n'  # enrolls on first start, then mutual TLS
        f'bundles = ["{REPO / "bundles" / "hello"}"]\n'
        'log_level = "warning"\n')
    return config


def memory_mb(pid: int) -> dict[str, float]:
    """RSS, PSS and USS (private pages: what one more agent process really costs) in MB."""
    fields = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                fields[key] = int(rest.split()[0])
    return {"rss": fields["Rss"] / 1024, "pss": fields["Pss"] / 1024,
            "uss": (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024}


async def start_agent(ep: Endpoint, config: Path, name: str, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([host_binary(), "--foreground", "--config", str(config)], stdout=out, stderr=out,
                                stdin=subprocess.DEVNULL)
    deadline = t0 + 20
    while not ep.is_connected(name):
        if proc.poll() is not None or time.perf_counter() > deadline:
            proc.kill()
            proc.wait()
            sys.exit(f"bench: the agent did not connect; see {log}:\n{log.read_text()[-2000:]}")
        await asyncio.sleep(0.0005)
    return proc, (time.perf_counter() - t0) * 1000


def stop_agent(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(sorted_values: list[float], p: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[idx]


async def bench(quick: bool) -> dict[str, Any]:
    starts = 3 if quick else 7
    idle_s = 2.0 if quick else 10.0
    seq_calls = 500 if quick else 5000
    pipelined_calls = 5000 if quick else 50000
    in_flight = 1000
    fan_runs = 20 if quick else 200
    with tempfile.TemporaryDirectory(prefix="pyagent-bench-") as tmp:
        root = Path(tmp)
        config = EndpointConfig(state_dir=root / "endpoint", listen_port=0, api_enabled=False,
                                heartbeat_interval=30.0)
        async with Endpoint(config) as ep:
            agent_config = write_agent_config(root / "agent", ep, "bench-agent")
            log = root / "agent" / "host.log"

            handshake_ms = []
            for _ in range(starts):
                proc, ms = await start_agent(ep, agent_config, "bench-agent", log)
                handshake_ms.append(ms)
                stop_agent(proc)
                while ep.is_connected("bench-agent"):
                    await asyncio.sleep(0.005)

            proc, _ = await start_agent(ep, agent_config, "bench-agent", log)
            try:
                await ep.call("bench-agent", "hello.greet", {"name": "warm-up"})
                await asyncio.sleep(idle_s)
                idle_mem = memory_mb(proc.pid)

                latencies = []
                t_start = time.perf_counter()
                for i in range(seq_calls):
                    t0 = time.perf_counter_ns()
                    await ep.call("bench-agent", "hello.greet", {"name": "bench"})
                    latencies.append((time.perf_counter_ns() - t0) / 1000)
                seq_elapsed = time.perf_counter() - t_start
                latencies.sort()

                # 1,000 workers, each with one call in flight at a time: exactly `in_flight` outstanding calls
                # (a Semaphore with 1,000 waiters costs O(waiters) per release on 3.11 and would measure itself).
                per_worker = pipelined_calls // in_flight

                async def worker() -> None:
                    for _ in range(per_worker):
                        await ep.call("bench-agent", "hello.greet", {"name": "bench"}, timeout=60)

                t_start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(in_flight)))
                pipe_elapsed = time.perf_counter() - t_start
                pipelined_calls = per_worker * in_flight
                loaded_mem = memory_mb(proc.pid)

                # Fan-out: one operator call to 5 agents (this one and 4 more), all replies, median of `fan_runs`.
                fan_procs = []
                try:
                    for i in range(4):
                        name = f"bench-fan-{i}"
                        fan_config = write_agent_config(root / name, ep, name)
                        fan_procs.append((await start_agent(ep, fan_config, name, root / name / "host.log"))[0])
                    fan_ms = []
                    for _ in range(fan_runs):
                        t0 = time.perf_counter()
                        reply = await ep.call_target("*", "hello.greet", {"name": "fan"}, timeout=30)
                        fan_ms.append((time.perf_counter() - t0) * 1000)
                        assert len(reply["results"]) == 5 and all("result" in r for r in reply["results"].values())
                finally:
                    for fan_proc in fan_procs:
                        stop_agent(fan_proc)
            finally:
                stop_agent(proc)

    return {
        "worker_rss_mb": round(idle_mem["rss"], 2),
        "worker_pss_mb": round(idle_mem["pss"], 2),
        "worker_uss_mb": round(idle_mem["uss"], 2),
        "worker_rss_after_load_mb": round(loaded_mem["rss"], 2),
        "idle_seconds": idle_s,
        "start_to_handshake_ms": round(statistics.median(handshake_ms), 2),
        "start_to_handshake_ms_all": [round(x, 2) for x in handshake_ms],
        "rpc_p50_us": round(percentile(latencies, 50), 1),
        "rpc_p99_us": round(percentile(latencies, 99), 1),
        "rpc_seq_per_s": round(seq_calls / seq_elapsed, 1),
        "rpc_seq_calls": seq_calls,
        "rpc_pipelined_per_s": round(pipelined_calls / pipe_elapsed, 1),
        "rpc_pipelined_calls": pipelined_calls,
        "rpc_in_flight": in_flight,
        "fanout_5_agents_ms": round(statistics.median(fan_ms), 2),
        "fanout_5_agents_p99_ms": round(percentile(sorted(fan_ms), 99), 2),
        **schema_validation_us(quick),
        "host": subprocess.run([host_binary(), "--version"], capture_output=True, text=True).stdout.strip(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


class _SchemaBench(Agent):
    @method
    async def greet(self, name: str) -> str:
        return name

    @method
    async def rich(self, n: Annotated[int, msgspec.Meta(ge=0)], xs: list[float], mode: Literal["a", "b"],
                   tags: dict[str, str] | None = None) -> int:
        return n


def schema_validation_us(quick: bool) -> dict[str, float]:
    """In-process cost of the runtime's parameter check per call (`_signature.bind`: names, then msgspec), minus the
    cost of handing the params over unchecked, for a one-string method and a four-parameter one."""
    from pyagent.runtime._signature import bind, describe

    specs = describe(_SchemaBench)
    cases = {"greet": {"name": "bench"},
             "rich": {"n": 5, "xs": [1.0, 2.5, 3], "mode": "b", "tags": {"k": "v"}}}
    rounds = 20_000 if quick else 200_000
    out: dict[str, float] = {}
    for name, params in cases.items():
        spec = specs[name]
        t0 = time.perf_counter_ns()
        for _ in range(rounds):
            bind(spec, name, params)
        checked = (time.perf_counter_ns() - t0) / rounds
        t0 = time.perf_counter_ns()
        for _ in range(rounds):
            dict(params)  # unchecked: the params dict becomes the kwargs
        unchecked = (time.perf_counter_ns() - t0) / rounds
        out[f"schema_validation_us_{name}"] = round(max(checked - unchecked, 0.0) / 1000, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls and a short idle (a smoke run)")
    parser.add_argument("--no-rollout", action="store_true", help="skip rollout_10_agents_s (10 agents, ~1 min)")
    args = parser.parse_args()
    figures = asyncio.run(bench(args.quick))
    if not args.no_rollout:
        from rollout import rollout_10_agents
        figures.update(rollout_10_agents())
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
