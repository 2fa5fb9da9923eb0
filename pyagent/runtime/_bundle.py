"""Loading bundle directories: `bundle.toml`, the bundle's code as its own package, and its agent objects.

    name = "hello"              # identifier
    version = "1.0.0"
    description = "..."         # optional
    host = ">=0.1"              # optional, compatible host versions (informational for now)
    entry = "hello:Hello"       # one agent object, named like the bundle
    # or
    [agents]
    greeter = "hello:Hello"     # object name = "module:Class"

Each bundle is imported as the synthetic package `pyagent_bundle_<name>` whose `__path__` is the bundle directory
(its `__init__.py` runs if there is one). Two bundles may therefore both have a `util.py`, and relative imports work
inside a bundle.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
import tomllib
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

from pyagent.runtime._agent import Agent
from pyagent.runtime._errors import BundleError
from pyagent.runtime._log import log_event
from pyagent.runtime._signature import describe

BUNDLE_FILE = "bundle.toml"
PACKAGE_PREFIX = "pyagent_bundle_"
_BUNDLE_KEYS = ("name", "version", "description", "host", "entry", "agents")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENTRY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):([A-Za-z_][A-Za-z0-9_]*)")

_log = logging.getLogger("pyagent.runtime")


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle: its manifest and its agent objects (object name -> instance)."""

    name: str
    version: str
    path: Path
    package: str
    description: str
    host: str
    agents: Mapping[str, Agent]

    def hello_entry(self) -> dict[str, Any]:
        """This bundle as listed in `handshake.hello`."""
        return {"name": self.name, "version": self.version, "agents": list(self.agents)}


INSTALLED_DIR = "bundles"  # STATE/bundles/<name>/<version>/ and the `current` link, written by updates
CURRENT_LINK = "current"


def bundle_name(path: Path) -> str | None:
    """The `name` in a bundle directory's `bundle.toml`, or None when it cannot be read (loading it reports why)."""
    try:
        doc = tomllib.loads((Path(path) / BUNDLE_FILE).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    name = doc.get("name")
    return name if isinstance(name, str) and _IDENT_RE.fullmatch(name) else None


def resolve_bundle_paths(configured: Iterable[Path], state_dir: Path | None) -> list[Path]:
    """The directories to load (docs/updates.md §2): a configured bundle named N loads from
    `state_dir/bundles/N/current/` when that link exists (an update installed it), else from its configured path;
    bundles installed by updates that the config does not list load too, after the configured ones, by name."""
    installed: dict[str, Path] = {}
    root = Path(state_dir) / INSTALLED_DIR if state_dir is not None else None
    if root is not None and root.is_dir():
        for entry in sorted(root.iterdir()):
            link = entry / CURRENT_LINK
            if _IDENT_RE.fullmatch(entry.name) and link.is_dir():
                installed[entry.name] = Path(os.path.realpath(link))
    paths: list[Path] = []
    for path in configured:
        name = bundle_name(path)
        if name is not None and name in installed:
            paths.append(installed.pop(name))
        else:
            paths.append(Path(path))
    paths.extend(installed.values())
    return paths


def load_bundles(paths: Iterable[Path]) -> tuple[Bundle, ...]:
    """Load every bundle in order; bundle names and agent object names must be unique across all of them."""
    bundles: list[Bundle] = []
    owners: dict[str, Bundle] = {}
    for path in paths:
        for other in bundles:
            if other.path == Path(path):
                raise BundleError(f"bundle {path}: listed twice")
        bundle = load_bundle(path, _taken={b.name: b for b in bundles})
        for obj in bundle.agents:
            if obj in owners:
                raise BundleError(f"bundle {bundle.path}: agent object '{obj}' is already defined by bundle "
                                  f"'{owners[obj].name}' ({owners[obj].path})")
            owners[obj] = bundle
        bundles.append(bundle)
    return tuple(bundles)


def load_bundle(path: Path, *, _taken: Mapping[str, Bundle] | None = None) -> Bundle:
    """Load one bundle directory; every failure is a BundleError naming the directory."""
    path = Path(path)
    manifest = _read_manifest(path)
    name = manifest["name"]
    if _taken and name in _taken:
        raise BundleError(f"bundle {path}: bundle name '{name}' is already used by {_taken[name].path}")
    package = PACKAGE_PREFIX + name
    _purge(package)
    importlib.invalidate_caches()  # bundles may have been written a moment ago (tests, deployments)
    try:
        _import_package(package, path)
        agents: dict[str, Agent] = {}
        for obj, entry in manifest["agents"].items():
            agents[obj] = _make_agent(path, package, obj, entry)
    except BaseException:
        _purge(package)
        raise
    bundle = Bundle(
        name=name, version=manifest["version"], path=path, package=package,
        description=manifest.get("description", ""), host=manifest.get("host", ""),
        agents=MappingProxyType(agents),
    )
    log_event(_log, logging.INFO, "bundle.loaded", "bundle loaded", bundle=name, version=bundle.version,
              agents=",".join(agents), path=str(path))
    return bundle


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise BundleError(f"bundle {path}: not a directory")
    file = path / BUNDLE_FILE
    try:
        text = file.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BundleError(f"bundle {path}: missing {BUNDLE_FILE}") from None
    except OSError as exc:
        raise BundleError(f"bundle {path}: cannot read {BUNDLE_FILE}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BundleError(f"bundle {path}: {BUNDLE_FILE} is not valid UTF-8 (byte {exc.start})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"bundle {path}: {BUNDLE_FILE}: invalid TOML: {exc}") from None

    def fail(problem: str) -> BundleError:
        return BundleError(f"bundle {path}: {BUNDLE_FILE}: {problem}")

    for key in doc:
        if key not in _BUNDLE_KEYS:
            import difflib

            close = difflib.get_close_matches(key, _BUNDLE_KEYS, n=1, cutoff=0.6)
            raise fail(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    for key in ("name", "version"):
        if key not in doc:
            raise fail(f"missing key '{key}'")
    for key in ("name", "version", "description", "host", "entry"):
        if key in doc and not isinstance(doc[key], str):
            raise fail(f"key '{key}' must be a string")
    if not _IDENT_RE.fullmatch(doc["name"]):
        raise fail(f"key 'name' must be an identifier (letters, digits, '_'), got {doc['name']!r}")
    if not doc["version"]:
        raise fail("key 'version' must not be empty")

    if ("entry" in doc) == ("agents" in doc):
        raise fail("exactly one of 'entry' or '[agents]' is required")
    if "entry" in doc:
        agents = {doc["name"]: doc["entry"]}
        where = {doc["name"]: "key 'entry'"}
    else:
        if not isinstance(doc["agents"], dict) or not doc["agents"]:
            raise fail("'[agents]' must be a table of object = \"module:Class\"")
        agents = doc["agents"]
        where = {obj: f"key 'agents.{obj}'" for obj in agents}
    for obj, entry in agents.items():
        if not _IDENT_RE.fullmatch(obj):
            raise fail(f"agent object name {obj!r} must be an identifier")
        if not isinstance(entry, str) or not _ENTRY_RE.fullmatch(entry):
            raise fail(f"{where[obj]} must be \"module:Class\", got {entry!r}")
    doc["agents"] = agents
    return doc


def _purge(package: str) -> None:
    """Forget a previous import of this bundle package (a reload, or another bundle of the same name in tests)."""
    for mod in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[mod]


def _import_package(package: str, path: Path) -> ModuleType:
    init = path / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(package, init, submodule_search_locations=[str(path)])
    else:
        spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
        spec.submodule_search_locations = [str(path)]
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    if spec.loader is not None:
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise BundleError(f"bundle {path}: __init__.py failed:\n{_format(exc, path)}") from None
    return module


def _make_agent(path: Path, package: str, obj: str, entry: str) -> Agent:
    module_name, _, class_name = entry.partition(":")
    try:
        module = importlib.import_module(f"{package}.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{package}.{module_name}":
            raise BundleError(f"bundle {path}: agent '{obj}': no module '{module_name}' in the bundle") from None
        raise BundleError(f"bundle {path}: agent '{obj}': importing '{module_name}' failed:\n"
                          f"{_format(exc, path)}") from None
    except Exception as exc:
        raise BundleError(f"bundle {path}: agent '{obj}': importing '{module_name}' failed:\n"
                          f"{_format(exc, path)}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise BundleError(f"bundle {path}: agent '{obj}': module '{module_name}' has no '{class_name}'")
    if not (isinstance(cls, type) and issubclass(cls, Agent)) or cls is Agent:
        kind = f"class {cls.__qualname__}" if isinstance(cls, type) else type(cls).__name__
        raise BundleError(f"bundle {path}: agent '{obj}': '{entry}' is not a subclass of pyagent.runtime.Agent "
                          f"(got {kind})")
    try:
        describe(cls)
    except TypeError as exc:
        raise BundleError(f"bundle {path}: agent '{obj}': {exc}") from None
    try:
        agent = cls()
    except Exception as exc:
        raise BundleError(f"bundle {path}: agent '{obj}': {class_name}() failed:\n{_format(exc, path)}") from None
    agent._pyagent_bind(obj)
    return agent


def _format(exc: BaseException, path: Path) -> str:
    """The traceback, starting at the first frame inside the bundle (the runtime's and importlib's frames are
    noise to a bundle author); all of it when no frame is inside the bundle."""
    if isinstance(exc, SyntaxError):  # the file, line and caret say it all
        return "".join(traceback.format_exception_only(exc)).rstrip()
    info = traceback.TracebackException.from_exception(exc)
    prefix = str(path) + os.sep
    for i, frame in enumerate(info.stack):
        if frame.filename.startswith(prefix):
            info.stack = traceback.StackSummary.from_list(info.stack[i:])
            break
    return "".join(info.format()).rstrip()
