"""One naming rule for update targets on every side (pyagent/_updatenames.py; the C side is
csrc/update_swap.c, tested in tests/c/test-update.c)."""

from __future__ import annotations

import pytest

from pyagent._updatenames import bundle_name_problem, version_problem


@pytest.mark.parametrize("version", ["1", "1.2.3", "2.0.0-rc.1", "1.0+build_7", "0.1.1-test", "v" + "9" * 63])
def test_good_versions(version: str) -> None:
    assert version_problem(version) is None


@pytest.mark.parametrize("version", ["", "current", "1..2", ".1", "-1", "1/2", "1 2", "ü", "v" + "9" * 64, None, 12])
def test_bad_versions_say_why(version: object) -> None:
    problem = version_problem(version)
    assert problem is not None and repr(version) in problem and "'current'" in problem


@pytest.mark.parametrize("name", ["hello", "_x", "a1", "x" * 64])
def test_good_bundle_names(name: str) -> None:
    assert bundle_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "1a", "no-dash", "a.b", "../x", "x" * 65, None])
def test_bad_bundle_names_say_why(name: object) -> None:
    problem = bundle_name_problem(name)
    assert problem is not None and repr(name) in problem
