"""Helpers for the runtime's unit tests (a unique module name: `conftest` is ambiguous across test folders)."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

from pyagent.runtime import Agent, FakeHost, Runtime

REPO = Path(__file__).resolve().parents[4]
HELLO_BUNDLE = REPO / "bundles" / "hello"

BundleFactory = Callable[..., Path]


def host_config(**overrides: Any) -> dict[str, Any]:
    """A valid document for FakeHost.start (the shape worker.build_host_config produces)."""
    config: dict[str, Any] = {
        "endpoints": [{"host": "127.0.0.1", "port": 7443, "server_name": "127.0.0.1"}],
        "ca_file": "/nonexistent/ca.pem",
        "token": "t",
        "max_frame_bytes": 1 << 20,
        "reconnect_min_ms": 500,
        "reconnect_max_ms": 60000,
        "reconnect_stable_ms": 30000,
        "hello": {"agent_id": "0" * 32, "name": "test"},
        "log_level": "info",
    }
    config.update(overrides)
    return config


@contextlib.asynccontextmanager
async def running(host: FakeHost, agents: Mapping[str, Agent], **kwargs: Any) -> AsyncIterator[Runtime]:
    """Run a Runtime over `host` for the duration of the block; stop it and check it exited cleanly."""
    runtime = Runtime(host, agents, host_config(), **kwargs)
    task = asyncio.create_task(runtime.run(install_signals=False))
    started = asyncio.create_task(runtime.wait_started())
    done, _ = await asyncio.wait({task, started}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    if started not in done:
        started.cancel()
        await asyncio.wait({started})
        code = await task if task in done else None
        raise AssertionError(f"runtime did not start (exit code {code})")
    try:
        yield runtime
    finally:
        runtime.stop()
        assert await asyncio.wait_for(task, 5) == 0


def write_bundle(root: Path, dirname: str, manifest: str, files: Mapping[str, str]) -> Path:
    """Create a bundle directory `root/dirname` with `bundle.toml` and the given source files."""
    path = root / dirname
    path.mkdir(parents=True)
    (path / "bundle.toml").write_text(textwrap.dedent(manifest))
    for name, text in files.items():
        file = path / name
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(textwrap.dedent(text))
    return path


def run(coro: Any) -> Any:
    return asyncio.run(coro)

