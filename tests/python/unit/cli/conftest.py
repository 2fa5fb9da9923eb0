"""CLI tests: the fake agent helper lives with the endpoint tests; `async def` tests run in a fresh loop each."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "endpoint"))

from clihelp import ServeProc  # noqa: E402
from fakeagent import run_async_test  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    return run_async_test(pyfuncitem)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProc]:
    """A running `pyagent endpoint serve` subprocess, stopped by PID afterwards. The shared token is on: these tests
    drive the CLI with a fake agent that says hello with it (enrollment has its own tests)."""
    proc = ServeProc(tmp_path / "state", "--allow-shared-token").start()
    try:
        yield proc
    finally:
        proc.stop()
