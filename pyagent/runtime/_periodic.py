"""`@periodic` and interval distributions (MAGI's ReportingDispatchAgent and its interval distributions).

    @periodic(30)                                # every 30 s
    @periodic(minmax(5, 15))                     # uniform in [5, 15]
    @periodic(expo(10, cap=60))                  # exponential, mean 10 s, at most 60 s
    @periodic(lambda self: self.interval)        # read from a config field each time
    async def report(self) -> float | None: ...  # may return the next interval (seconds)

The first run happens one interval after the agent started (or resumed). A periodic method that raises is logged and
runs again after the next interval. Intervals are clamped to [MIN_INTERVAL, MAX_INTERVAL]. Draws use the runtime's
`random.Random`, so a seeded runtime is deterministic.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

MIN_INTERVAL = 0.01
MAX_INTERVAL = 7 * 86400.0

_MARK = "__pyagent_periodic__"


class Distribution:
    """An interval distribution: `sample(rng)` draws one interval in seconds, within `bounds()`."""

    def sample(self, rng: random.Random) -> float:
        raise NotImplementedError

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value `sample` can return (math.inf when unbounded)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _cap(cap: float | None) -> float:
    return math.inf if cap is None else _positive("cap", cap)


@dataclass(frozen=True)
class _MinMax(Distribution):
    lo: float
    hi: float

    def sample(self, rng: random.Random) -> float:
        return rng.uniform(self.lo, self.hi)

    def bounds(self) -> tuple[float, float]:
        return self.lo, self.hi

    def describe(self) -> dict[str, Any]:
        return {"distribution": "minmax", "min": self.lo, "max": self.hi}


@dataclass(frozen=True)
class _Capped(Distribution):
    kind: str
    a: float
    b: float
    cap: float

    def sample(self, rng: random.Random) -> float:
        if self.kind == "expo":
            value = rng.expovariate(1.0 / self.a)
        elif self.kind == "gamma":
            value = rng.gammavariate(self.a, self.b)
        else:  # pareto: scale * Pareto(alpha), so the minimum is `scale`
            value = self.b * rng.paretovariate(self.a)
        return min(value, self.cap)

    def bounds(self) -> tuple[float, float]:
        low = self.b if self.kind == "pareto" else 0.0
        return min(low, self.cap), self.cap

    def describe(self) -> dict[str, Any]:
        names = {"expo": ("mean", None), "gamma": ("k", "theta"), "pareto": ("alpha", "scale")}[self.kind]
        out: dict[str, Any] = {"distribution": self.kind, names[0]: self.a}
        if names[1] is not None:
            out[names[1]] = self.b
        if math.isfinite(self.cap):
            out["cap"] = self.cap
        return out


def minmax(lo: float, hi: float) -> Distribution:
    """Uniform in [lo, hi] seconds."""
    lo_f, hi_f = _positive("lo", lo), _positive("hi", hi)
    if hi_f < lo_f:
        raise ValueError(f"minmax: hi ({hi}) must not be less than lo ({lo})")
    return _MinMax(lo_f, hi_f)


def expo(mean: float, cap: float | None = None) -> Distribution:
    """Exponential with the given mean (seconds), optionally capped."""
    return _Capped("expo", _positive("mean", mean), 0.0, _cap(cap))


def gamma(k: float, theta: float, cap: float | None = None) -> Distribution:
    """Gamma with shape `k` and scale `theta` (mean k·theta seconds), optionally capped."""
    return _Capped("gamma", _positive("k", k), _positive("theta", theta), _cap(cap))


def pareto(alpha: float, scale: float, cap: float | None = None) -> Distribution:
    """Pareto with shape `alpha` and minimum `scale` seconds (heavy-tailed), optionally capped."""
    return _Capped("pareto", _positive("alpha", alpha), _positive("scale", scale), _cap(cap))


def distribution(spec: dict[str, Any]) -> Distribution:
    """A distribution from its `describe()` form, e.g. from config: {"distribution": "expo", "mean": 5}."""
    kind = spec.get("distribution")
    args = {k: v for k, v in spec.items() if k != "distribution"}
    makers: dict[str, Callable[..., Distribution]] = {"minmax": lambda min, max: minmax(min, max), "expo": expo,
                                                      "gamma": gamma, "pareto": pareto}
    if kind not in makers:
        raise ValueError(f"unknown distribution {kind!r} (one of: {', '.join(makers)})")
    try:
        return makers[kind](**args)
    except TypeError as exc:
        raise ValueError(f"distribution {kind}: {exc}") from None


Interval = float | int | Distribution | Callable[[Any], Any]


@dataclass(frozen=True)
class Schedule:
    """What @periodic recorded: the interval spec."""

    interval: Interval

    def next_interval(self, agent: Any, rng: random.Random) -> float:
        """The next interval in seconds for `agent`, clamped; raise ValueError when the spec gives no number."""
        spec: Any = self.interval
        if callable(spec) and not isinstance(spec, Distribution):
            spec = spec(agent)
        if isinstance(spec, Distribution):
            spec = spec.sample(rng)
        return clamp(spec)

    def describe(self) -> Any:
        spec = self.interval
        if isinstance(spec, Distribution):
            return spec.describe()
        if callable(spec):
            return "dynamic"
        return float(spec)


def clamp(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"an interval must be a number of seconds, got {value!r}")
    return min(max(float(value), MIN_INTERVAL), MAX_INTERVAL)


def periodic(interval: Interval) -> Callable[[F], F]:
    """Run the decorated method of an Agent every `interval`: seconds, a Distribution, or a callable taking the
    agent and returning either. The method may return a number: the next interval (it wins over `interval` once)."""
    if isinstance(interval, bool) or not (isinstance(interval, (int, float, Distribution)) or callable(interval)):
        raise TypeError(f"@periodic needs seconds, a distribution or a callable, got {interval!r}")
    if isinstance(interval, (int, float)):
        _positive("@periodic interval", interval)

    def mark(func: F) -> F:
        if not inspect.isfunction(func):
            raise TypeError(f"@periodic must decorate a function defined in an Agent class, got {func!r}")
        setattr(func, _MARK, Schedule(interval))
        return func

    return mark


def schedule_of(func: Any) -> Schedule | None:
    value = getattr(func, _MARK, None) if inspect.isfunction(func) else None
    return value if isinstance(value, Schedule) else None
