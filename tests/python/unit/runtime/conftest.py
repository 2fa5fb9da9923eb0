"""Fixtures for the runtime's unit tests; plain helpers live in runtime_helpers.py."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from runtime_helpers import BundleFactory, write_bundle

from pyagent.runtime import FakeHost


@pytest.fixture
def fake_host() -> Iterator[FakeHost]:
    with FakeHost() as host:
        yield host


@pytest.fixture
def make_bundle(tmp_path: Path) -> BundleFactory:
    """make_bundle(name, source, entry="mod:Cls", module="mod", dirname=name) -> bundle dir with one module."""

    def make(name: str, source: str, *, entry: str | None = None, module: str = "mod",
             dirname: str | None = None, extra_files: Mapping[str, str] | None = None) -> Path:
        manifest = f'name = "{name}"\nversion = "0.1.0"\nentry = "{entry or module + ":Thing"}"\n'
        files = {f"{module}.py": source, **(extra_files or {})}
        return write_bundle(tmp_path / "bundles", dirname or name, manifest, files)

    return make


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Path]:
    """write_config(toml_text) -> path of tmp_path/etc/agent.toml, next to a dummy ca.pem."""

    def write(text: str) -> Path:
        etc = tmp_path / "etc"
        etc.mkdir(exist_ok=True)
        (etc / "ca.pem").write_text("dummy CA\n")
        path = etc / "agent.toml"
        path.write_text(textwrap.dedent(text))
        return path

    return write

