"""pyagent.runtime._agent and ._signature: @method, exposed methods, parameter binding."""

from __future__ import annotations

from typing import Any, Optional, Union

import pytest

from pyagent.runtime import Agent, method
from pyagent.runtime._signature import InvalidParamsError, bind, describe


class Base(Agent):
    @method
    async def plain(self, a: str, b: int = 1) -> str:
        """Plain doc."""
        return a * b

    @method()
    def sync(self) -> int:
        return 1

    @method(name="renamed")
    async def internal_name(self) -> None:
        pass

    async def helper(self) -> None:
        """Not exposed."""


class Child(Base):
    async def plain(self, a: str, b: int = 1) -> str:  # overridden without @method: no longer exposed
        return a

    @method
    async def extra(self, **kwargs: Any) -> dict[str, Any]:
        return kwargs


def test_exposed_methods_per_class() -> None:
    assert dict(Base.__pyagent_methods__) == {"plain": "plain", "sync": "sync", "renamed": "internal_name"}
    assert dict(Child.__pyagent_methods__) == {"sync": "sync", "renamed": "internal_name", "extra": "extra"}
    assert dict(Agent.__pyagent_methods__) == {}


def test_decorator_returns_the_function() -> None:
    async def f(self: Any) -> None:
        pass

    assert method(f) is f
    assert method()(f) is f


def test_describe() -> None:
    specs = describe(Base)
    assert specs["plain"].is_async and not specs["sync"].is_async
    assert specs["plain"].doc == "Plain doc."
    assert [(p.name, p.required, p.type_name) for p in specs["plain"].params] == [("a", True, "str"),
                                                                                   ("b", False, "int")]
    assert describe(Child)["extra"].var_keyword


def test_default_name_and_logger() -> None:
    agent = Base()
    assert agent.name == "base" and agent.log.name == "pyagent.agent.base"


@pytest.mark.parametrize("bad", [staticmethod(lambda: None), 3, "x"])
def test_method_refuses_non_functions(bad: Any) -> None:
    with pytest.raises(TypeError, match="@method must decorate a function"):
        method(bad)


def test_method_refuses_generators_and_bad_names() -> None:
    async def agen(self: Any) -> Any:
        yield 1

    with pytest.raises(TypeError, match="generator"):
        method(agen)
    with pytest.raises(TypeError, match="not an identifier"):
        method(name="a.b")(lambda self: None)


def test_two_methods_exposed_under_one_name() -> None:
    with pytest.raises(TypeError, match="both exposed as 'x'"):
        class Clash(Agent):
            @method(name="x")
            def a(self) -> None: ...

            @method(name="x")
            def b(self) -> None: ...


class Typed(Agent):
    @method
    def f(  # type: ignore[no-untyped-def]  # `untyped` on purpose
            self, s: str, i: int, fl: float, b: bool, li: list[int], d: dict[str, Any],
            opt: Optional[int] = None, u: Union[int, str] = 0, n: int | None = 5, anything: Any = None,
            untyped=None, other: bytes = b"") -> None:
        pass

    @method
    def posonly(self, a: int, b: int = 2, /, c: int = 3) -> None:
        pass


GOOD = {"s": "x", "i": 1, "fl": 1.5, "b": True, "li": [1], "d": {}}


def test_bind_accepts_matching_types() -> None:
    spec = describe(Typed)["f"]
    args, kwargs = bind(spec, "t.f", GOOD)
    assert args == [] and kwargs == GOOD
    bind(spec, "t.f", {**GOOD, "fl": 2, "opt": None, "u": "s", "n": None, "anything": [1], "untyped": 3,
                       "other": "whatever"})


@pytest.mark.parametrize(("changes", "message", "expected"), [
    ({"s": 1}, "t.f: parameter 's' must be str, got int", "str"),
    ({"i": True}, "parameter 'i' must be int, got bool", "int"),
    ({"i": 1.0}, "parameter 'i' must be int, got float", "int"),
    ({"fl": "1"}, "parameter 'fl' must be float, got str", "float"),
    ({"fl": False}, "parameter 'fl' must be float, got bool", "float"),
    ({"b": 1}, "parameter 'b' must be bool, got int", "bool"),
    ({"li": {}}, "parameter 'li' must be list[int], got dict", "list[int]"),
    ({"d": []}, "parameter 'd' must be dict[str, Any], got list", "dict[str, Any]"),
    ({"s": None}, "parameter 's' must be str, got null", "str"),
    ({"opt": "x"}, "parameter 'opt' must be int | null, got str", "int | null"),
    ({"u": 1.5}, "parameter 'u' must be int | str, got float", "int | str"),
])
def test_bind_reports_wrong_types(changes: dict[str, Any], message: str, expected: str) -> None:
    with pytest.raises(InvalidParamsError) as info:
        bind(describe(Typed)["f"], "t.f", {**GOOD, **changes})
    assert message in str(info.value)
    assert info.value.data() == {"parameter": next(iter(changes)), "expected": expected}


def test_bind_missing_and_unknown() -> None:
    spec = describe(Typed)["f"]
    with pytest.raises(InvalidParamsError, match="t.f: missing parameter 'i'"):
        bind(spec, "t.f", {k: v for k, v in GOOD.items() if k != "i"})
    with pytest.raises(InvalidParamsError, match=r"t.f: unknown parameter 'opts' \(did you mean 'opt'\?\)"):
        bind(spec, "t.f", {**GOOD, "opts": 1})
    with pytest.raises(InvalidParamsError, match="unknown parameter 'zzz'$"):
        bind(spec, "t.f", {**GOOD, "zzz": 1})


def test_bind_positional_only() -> None:
    spec = describe(Typed)["posonly"]
    assert bind(spec, "t.p", {"a": 1, "c": 4}) == ([1], {"c": 4})
    assert bind(spec, "t.p", {"a": 1, "b": 5}) == ([1, 5], {})
    with pytest.raises(InvalidParamsError, match="missing parameter 'a'"):
        bind(spec, "t.p", {"b": 1})


def test_bind_var_keyword() -> None:
    assert bind(describe(Child)["extra"], "c.extra", {"x": 1}) == ([], {"x": 1})


def test_unresolvable_annotation_is_reported() -> None:
    class Broken(Agent):
        @method
        def f(self, x: "NoSuchType") -> None:  # type: ignore[name-defined]  # noqa: F821
            pass

    with pytest.raises(TypeError, match=r"Broken.f: cannot read its signature: NameError"):
        describe(Broken)
