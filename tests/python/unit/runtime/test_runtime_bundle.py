"""pyagent.runtime._bundle: loading bundle directories."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from runtime_helpers import HELLO_BUNDLE, BundleFactory, write_bundle

from pyagent.runtime import Agent, BundleError, load_bundle, load_bundles

THING = """\
from pyagent.runtime import Agent, method

class Thing(Agent):
    @method
    def who(self) -> str:
        return "thing"
"""


def test_hello_bundle() -> None:
    bundle = load_bundle(HELLO_BUNDLE)
    assert (bundle.name, bundle.version, bundle.path, bundle.package) == ("hello", "1.0.0", HELLO_BUNDLE,
                                                                         "pyagent_bundle_hello")
    assert bundle.description and bundle.host
    hello = bundle.agents["hello"]
    assert isinstance(hello, Agent)
    assert hello.name == "hello" and hello.log.name == "pyagent.agent.hello"
    assert dict(type(hello).__pyagent_methods__) == {"greet": "greet", "sysinfo": "sysinfo"}
    assert type(hello).__module__ == "pyagent_bundle_hello.hello"
    assert bundle.hello_entry() == {"name": "hello", "version": "1.0.0", "agents": ["hello"]}


def test_agents_table_and_optional_keys(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, "multi", """\
        name = "multi"
        version = "2.0"
        description = "two objects"
        host = ">=0.1,<1"

        [agents]
        first = "pkg.mod:Thing"
        second = "pkg.mod:Thing"
    """, {"pkg/__init__.py": "", "pkg/mod.py": THING})
    bundle = load_bundle(path)
    assert list(bundle.agents) == ["first", "second"]
    assert bundle.agents["first"] is not bundle.agents["second"]
    assert bundle.agents["second"].name == "second"
    assert bundle.host == ">=0.1,<1"


def test_same_module_names_in_two_bundles(make_bundle: BundleFactory) -> None:
    util_a = "VALUE = 'a'\n"
    util_b = "VALUE = 'b'\n"
    source = """\
        from pyagent.runtime import Agent, method
        from . import util
        from .util import VALUE

        class Thing(Agent):
            @method
            def value(self) -> str:
                return util.VALUE + VALUE
    """
    a = make_bundle("bundle_a", source, extra_files={"util.py": util_a})
    b = make_bundle("bundle_b", source, extra_files={"util.py": util_b})
    # Same object name (the bundle's name) would clash: entry objects are named after their bundles.
    bundles = load_bundles([a, b])
    assert [bundle.agents[bundle.name].value() for bundle in bundles] == ["aa", "bb"]  # type: ignore[attr-defined]
    assert sys.modules["pyagent_bundle_bundle_a.util"].VALUE == "a"
    assert sys.modules["pyagent_bundle_bundle_b.util"].VALUE == "b"


def test_bundle_init_py_runs(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, "withinit", 'name = "withinit"\nversion = "1"\nentry = "mod:Thing"\n',
                        {"__init__.py": "MARK = 42\n", "mod.py": "from . import MARK\n" + THING})
    bundle = load_bundle(path)
    assert sys.modules["pyagent_bundle_withinit"].MARK == 42
    assert bundle.agents["withinit"].who() == "thing"  # type: ignore[attr-defined]


def test_reloading_a_bundle_imports_it_afresh(make_bundle: BundleFactory) -> None:
    path = make_bundle("again", THING)
    first = load_bundle(path)
    (path / "mod.py").write_text(THING.replace('"thing"', '"changed"'))
    second = load_bundle(path)
    assert type(first.agents["again"]) is not type(second.agents["again"])
    assert second.agents["again"].who() == "changed"  # type: ignore[attr-defined]


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"bundle {tmp_path}/nope: not a directory"):
        load_bundle(tmp_path / "nope")


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(BundleError, match=f"bundle {tmp_path}/b: missing bundle.toml"):
        load_bundle(tmp_path / "b")


@pytest.mark.parametrize(("manifest", "message"), [
    ('name = "x"\nversion = "1"\nentry = "mod:Thing"\nentrypoint = "y"\n',
     "unknown key 'entrypoint' (did you mean 'entry'?)"),
    ('version = "1"\nentry = "mod:Thing"\n', "missing key 'name'"),
    ('name = "x"\nentry = "mod:Thing"\n', "missing key 'version'"),
    ('name = "x-y"\nversion = "1"\nentry = "mod:Thing"\n', "key 'name' must be an identifier"),
    ('name = "x"\nversion = 1\nentry = "mod:Thing"\n', "key 'version' must be a string"),
    ('name = "x"\nversion = "1"\n', "exactly one of 'entry' or '[agents]' is required"),
    ('name = "x"\nversion = "1"\nentry = "mod:Thing"\n[agents]\na = "mod:Thing"\n', "exactly one of"),
    ('name = "x"\nversion = "1"\nentry = "mod.Thing"\n', "key 'entry' must be \"module:Class\""),
    ('name = "x"\nversion = "1"\n[agents]\na = "mod:"\n', "key 'agents.a' must be \"module:Class\""),
    ('name = "x"\nversion = "1"\n[agents]\n"a-b" = "mod:Thing"\n', "agent object name 'a-b' must be an identifier"),
    ('name = "x"\nversion = "1"\nagents = {}\n', "'[agents]' must be a table"),
    ('name = "x"\nversion = "1"\nentry = "mod:Thing"\n[[bad\n', "invalid TOML"),
])
def test_manifest_errors_name_the_key(tmp_path: Path, manifest: str, message: str) -> None:
    path = write_bundle(tmp_path, "b", manifest, {"mod.py": THING})
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    assert str(info.value).startswith(f"bundle {path}: ")
    assert message in str(info.value)


def test_syntax_error_in_module(make_bundle: BundleFactory) -> None:
    path = make_bundle("broken", "def oops(:\n    pass\n")
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    text = str(info.value)
    assert text.startswith(f"bundle {path}: agent 'broken': importing 'mod' failed:")
    assert "SyntaxError" in text and "mod.py" in text and "line 1" in text
    assert "pyagent_bundle_broken" not in sys.modules  # cleaned up


def test_exception_at_import_has_traceback(make_bundle: BundleFactory) -> None:
    path = make_bundle("raising", "def f():\n    raise RuntimeError('boom at import')\nf()\n")
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    assert "Traceback (most recent call last)" in str(info.value)
    assert "RuntimeError: boom at import" in str(info.value)


def test_missing_dependency_is_not_reported_as_missing_module(make_bundle: BundleFactory) -> None:
    path = make_bundle("dep", "import no_such_dependency_xyz\n")
    with pytest.raises(BundleError, match="(?s)importing 'mod' failed:.*No module named 'no_such_dependency_xyz'"):
        load_bundle(path)


def test_missing_module(make_bundle: BundleFactory) -> None:
    path = make_bundle("nomod", THING, entry="other:Thing")
    with pytest.raises(BundleError, match="agent 'nomod': no module 'other' in the bundle"):
        load_bundle(path)


def test_missing_class(make_bundle: BundleFactory) -> None:
    path = make_bundle("nocls", THING, entry="mod:Other")
    with pytest.raises(BundleError, match="module 'mod' has no 'Other'"):
        load_bundle(path)


@pytest.mark.parametrize(("source", "got"), [
    ("class Thing:\n    pass\n", "class Thing"),
    ("def Thing():\n    pass\n", "function"),
    ("from pyagent.runtime import Agent as Thing\n", "class Agent"),
])
def test_entry_not_an_agent(make_bundle: BundleFactory, source: str, got: str) -> None:
    path = make_bundle("notagent", source)
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    assert str(info.value) == (f"bundle {path}: agent 'notagent': 'mod:Thing' is not a subclass of "
                               f"pyagent.runtime.Agent (got {got})")


def test_constructor_failure(make_bundle: BundleFactory) -> None:
    path = make_bundle("ctor", THING + "    def __init__(self):\n        raise ValueError('no')\n")
    with pytest.raises(BundleError, match=r"(?s)agent 'ctor': Thing\(\) failed:.*ValueError: no"):
        load_bundle(path)


def test_bad_annotation_is_a_bundle_error(make_bundle: BundleFactory) -> None:
    path = make_bundle("ann", "from __future__ import annotations\n" + THING.replace(
        "def who(self) -> str:", "def who(self, x: Missing) -> str:"))
    with pytest.raises(BundleError, match="agent 'ann': Thing.who: cannot read its signature: NameError"):
        load_bundle(path)


def test_duplicate_bundle_names_and_objects(tmp_path: Path, make_bundle: BundleFactory) -> None:
    a = make_bundle("same", THING, dirname="one")
    b = make_bundle("same", THING, dirname="two")
    with pytest.raises(BundleError, match=f"bundle {b}: bundle name 'same' is already used by {a}"):
        load_bundles([a, b])
    with pytest.raises(BundleError, match="listed twice"):
        load_bundles([a, a])
    c = write_bundle(tmp_path, "c", 'name = "c"\nversion = "1"\n[agents]\nsame = "mod:Thing"\n', {"mod.py": THING})
    with pytest.raises(BundleError, match=f"bundle {c}: agent object 'same' is already defined by bundle 'same'"):
        load_bundles([a, c])
