"""The agent's local allow-list (DESIGN §6, OpAMP's rule): which kinds of remote operations this agent accepts.

It comes only from the agent's own config file (`[allow]`); nothing the endpoint sends can change it
(`agent.config.set` changes agent objects' config, never this). A refused request gets -32007 `not_allowed` naming
the kind and the key to change, and is logged (`event=call.not_allowed`).

| kind | operations | default |
|---|---|---|
| `call` | `bundle.call` of an agent object's own methods | true |
| `read` | `agent.status`, `agent.config.get`, `agent.describe` | true |
| `control` | `agent.pause`, `agent.resume` | true |
| `lifecycle` | `agent.stop`, `agent.restart` | false |
| `config` | `agent.config.set` (live config of agent objects) | false |
| `packages` | remote package management (not in this version) | false, cannot be turned on |
| `tunnels` | remote tunnels (not in this version) | false, cannot be turned on |

`agent.update` is outside these kinds: the top-level key `upgrades` (default true) decides (`_update.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

CALL = "call"
DEFAULTS: Mapping[str, bool] = MappingProxyType({
    "call": True, "read": True, "control": True, "lifecycle": False, "config": False,
    "packages": False, "tunnels": False,
})
KINDS = tuple(DEFAULTS)
# Kinds reserved for operations that do not exist yet: they can only be false.
FUTURE_KINDS: Mapping[str, str] = MappingProxyType({
    "packages": "remote package management", "tunnels": "remote tunnels"})

_METHOD_KINDS: Mapping[str, str] = MappingProxyType({
    "bundle.call": "call",
    "agent.status": "read", "agent.config.get": "read", "agent.describe": "read",
    "agent.pause": "control", "agent.resume": "control",
    "agent.stop": "lifecycle", "agent.restart": "lifecycle",
    "agent.config.set": "config",
})
_PREFIX_KINDS = (("package.", "packages"), ("packages.", "packages"), ("tunnel.", "tunnels"), ("tunnels.", "tunnels"))


def kind_of(method: str) -> str | None:
    """The allow-list kind of a remote method, or None for methods outside it (answered method_not_found)."""
    kind = _METHOD_KINDS.get(method)
    if kind is not None:
        return kind
    for prefix, prefix_kind in _PREFIX_KINDS:
        if method.startswith(prefix):
            return prefix_kind
    return None


@dataclass(frozen=True)
class AllowList:
    """Kind -> allowed. `AllowList()` is the safe default the agent config starts from."""

    allowed: Mapping[str, bool] = field(default_factory=lambda: DEFAULTS)

    @classmethod
    def everything(cls) -> AllowList:
        """Every existing kind allowed: for a runtime embedded without an agent config (library use, unit tests).
        `pyagent-host` always uses the config's list."""
        return cls(MappingProxyType({k: k not in FUTURE_KINDS for k in KINDS}))

    @classmethod
    def from_table(cls, table: Mapping[str, object], where: str = "allow") -> AllowList:
        """The `[allow]` table of the agent config; raises ValueError naming `allow.<kind>`."""
        values = dict(DEFAULTS)
        for key, value in table.items():
            if key not in DEFAULTS:
                raise ValueError(f"unknown key '{where}.{key}' (kinds: {', '.join(KINDS)})")
            if not isinstance(value, bool):
                raise ValueError(f"key '{where}.{key}' must be true or false, got {type(value).__name__}")
            if value and key in FUTURE_KINDS:
                raise ValueError(f"key '{where}.{key}': {FUTURE_KINDS[key]} does not exist in this version of "
                                 "pyagent, so it cannot be allowed; remove the key or set it to false")
            values[key] = value
        return cls(MappingProxyType(values))

    def permits(self, kind: str) -> bool:
        return bool(self.allowed.get(kind, False))

    def refusal(self, method: str) -> tuple[str, str] | None:
        """(kind, message) when `method` is refused, else None."""
        kind = kind_of(method)
        if kind is None or self.permits(kind):
            return None
        if kind in FUTURE_KINDS:
            return kind, (f"not allowed: {method} is {FUTURE_KINDS[kind]}, which this agent does not offer "
                          f"(allow-list kind '{kind}')")
        return kind, (f"not allowed: this agent's allow-list refuses {method} (kind '{kind}'); the agent's operator "
                      f"can set `{kind} = true` in the [allow] table of its config file")

    def as_dict(self) -> dict[str, bool]:
        return dict(self.allowed)
