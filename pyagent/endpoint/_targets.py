"""Target selection and fan-out for operator calls (docs/protocol.md, "Operator API", "Targets").

A target is one of:

| form | matches |
|---|---|
| `AGENT_ID` | that agent |
| `NAME` | the agents with that name; if none, the agents whose host name (`platform.hostname`) is NAME |
| `group:NAME` | the agents labelled `group=NAME` |
| `env=prod,role=web` | the agents carrying every one of these labels |
| `capability:NAME` | the agents with an object that declares capability NAME (case-insensitive) |
| `*` | every agent |

Agents an operator rejected or revoked, or not yet approved, never match a selector.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pyagent.protocol import INTERNAL_ERROR, RemoteError

DEFAULT_CONCURRENCY = 64
MAX_CONCURRENCY = 10_000
MAX_TARGET_CHARS = 1024
_LABEL_RE = re.compile(r"[A-Za-z0-9_.\-/]+")


@dataclass(frozen=True)
class AgentView:
    """What selection looks at for one agent."""

    agent_id: str
    name: str
    hostname: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    connected: bool = True
    status: str = "active"


class TargetError(ValueError):
    """A target expression that cannot be parsed; the message names the problem."""


@dataclass(frozen=True)
class Selector:
    kind: str  # "plain", "group", "labels", "capability", "all"
    text: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Selector:
        text = text.strip()
        if not text:
            raise TargetError("the target is empty")
        if len(text) > MAX_TARGET_CHARS:
            raise TargetError(f"the target is longer than {MAX_TARGET_CHARS} characters")
        if text == "*":
            return cls("all", text)
        prefix, colon, rest = text.partition(":")
        if colon and prefix in ("group", "capability"):
            if not rest:
                raise TargetError(f"'{prefix}:' needs a name, e.g. '{prefix}:web'")
            return cls(prefix, rest)
        if "=" in text:
            pairs: list[tuple[str, str]] = []
            for item in text.split(","):
                key, eq, value = item.partition("=")
                key, value = key.strip(), value.strip()
                if not eq or not _LABEL_RE.fullmatch(key) or not value:
                    raise TargetError(f"bad label selector {item!r}: expected key=value[,key=value...]")
                pairs.append((key, value))
            return cls("labels", text, tuple(pairs))
        return cls("plain", text)

    @property
    def fanout(self) -> bool:
        """Whether results are per target (every kind but a plain id or name)."""
        return self.kind != "plain"

    def matches(self, view: AgentView) -> bool:
        if self.kind == "plain":
            return view.agent_id == self.text or view.name == self.text
        if view.status != "active":
            return False
        if self.kind == "all":
            return True
        if self.kind == "group":
            return view.labels.get("group") == self.text
        if self.kind == "capability":
            wanted = self.text.casefold()
            return any(c.casefold() == wanted for c in view.capabilities)
        return all(view.labels.get(k) == v for k, v in self.labels)

    def select(self, views: Iterable[AgentView]) -> list[AgentView]:
        """The matching agents, by name then id. A plain target matches an id exactly, else names, else host
        names."""
        views = list(views)
        if self.kind == "plain":
            by_id = [v for v in views if v.agent_id == self.text]
            if by_id:
                return by_id
            found = [v for v in views if v.name == self.text] or [v for v in views if v.hostname == self.text]
        else:
            found = [v for v in views if self.matches(v)]
        return sorted(found, key=lambda v: (v.name, v.agent_id))


def _json(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if isinstance(text, str) else default
    except ValueError:
        return default


def views_from_db(db: sqlite3.Connection) -> list[AgentView]:
    """Every agent of the registry (connected or not), as selection sees it."""
    rows = db.execute("SELECT agent_id, name, platform, labels, capabilities, connected, status FROM agents")
    out = []
    for agent_id, name, platform, labels, caps, connected, status in rows:
        labels = _json(labels, {})
        caps = _json(caps, [])
        out.append(AgentView(agent_id, name, str(_json(platform, {}).get("hostname", "")),
                             {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                             tuple(str(c) for c in caps) if isinstance(caps, list) else (),
                             bool(connected), str(status or "active")))
    return out


async def fan_out(targets: list[AgentView], call: Callable[[AgentView], Awaitable[Any]],
                  concurrency: int = DEFAULT_CONCURRENCY) -> dict[str, dict[str, Any]]:
    """Run `call` for every target, at most `concurrency` at a time; per agent id `{"result": ...}` or
    `{"error": {...}}` (a RemoteError's, or internal_error for anything else)."""
    results: dict[str, dict[str, Any]] = {}
    queue = list(reversed(targets))

    async def worker() -> None:
        while queue:
            view = queue.pop()
            try:
                results[view.agent_id] = {"result": await call(view)}
            except RemoteError as exc:
                results[view.agent_id] = {"error": exc.to_error()}
            except Exception as exc:  # a bug: report it for this target, keep the others
                results[view.agent_id] = {"error": {"code": INTERNAL_ERROR,
                                                    "message": f"{type(exc).__name__}: {exc}"}}

    workers = min(max(concurrency, 1), len(targets))
    await asyncio.gather(*(worker() for _ in range(workers)))
    return {view.agent_id: results[view.agent_id] for view in targets}
