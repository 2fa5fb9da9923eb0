"""Endpoint tests: `async def` tests run in a fresh event loop each (see fakeagent.run_async_test)."""

from __future__ import annotations

import pytest
from fakeagent import run_async_test


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    return run_async_test(pyfuncitem)
