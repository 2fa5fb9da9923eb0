"""What an update target may be called: one rule for the release command, the endpoint, the agent's worker and
updater, and the supervisor (csrc/update_swap.c, pa_upd_valid_bundle_name / pa_upd_valid_version).

Versions become directory names under the agent's state dir (`bundles/<name>/<version>/`, `host/<version>/`) next
to the `current` link, so a version may not be `current`, start with a dot, or contain `..`.
"""

from __future__ import annotations

import re

HOST_NAME = "pyagent-host"  # the name of the host in update targets, states and pins
LINK_NAME = "current"
MAX_LENGTH = 64

_BUNDLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def platform_name(system: str, machine: str) -> str:
    """The platform of host targets (`hosts/<platform>/<version>/pyagent-host`): `<system>-<machine>` lower-case,
    e.g. linux-x86_64; the agent's hello says both parts, the updater reads them from `platform`."""
    return f"{system}-{machine}".lower()


def bundle_name_problem(name: object) -> str | None:
    """None for a valid bundle name (an identifier of at most 64 characters), else what is wrong."""
    if isinstance(name, str) and _BUNDLE_NAME.fullmatch(name):
        return None
    return f"bad bundle name {name!r} (an identifier: letters, digits, '_'; at most {MAX_LENGTH} characters)"


def version_problem(version: object) -> str | None:
    """None for a valid version, else what is wrong."""
    if isinstance(version, str) and _VERSION.fullmatch(version) and ".." not in version and version != LINK_NAME:
        return None
    return (f"bad version {version!r} (letters, digits, '.', '_', '+', '-'; at most {MAX_LENGTH} characters, "
            f"no '..', not {LINK_NAME!r})")
