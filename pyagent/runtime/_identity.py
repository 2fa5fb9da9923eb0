"""The agent id: a uuid4 hex string created on first start in `state_dir/agent-id` and reused afterwards."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pyagent.runtime._errors import IdentityError

AGENT_ID_FILE = "agent-id"
_AGENT_ID_RE = re.compile(r"[0-9a-f]{32}")


def load_or_create_agent_id(state_dir: Path) -> str:
    """Return the agent id kept in `state_dir`, creating the directory (0700) and the id on first start.

    The file is created atomically and never overwritten: a temporary file is written and fsynced, then hard-linked
    to its final name (which fails if another process got there first, in which case its id wins).
    """
    path = state_dir / AGENT_ID_FILE
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise IdentityError(f"{state_dir}: cannot create the state directory: {exc.strerror or exc}") from None
    agent_id = new_agent_id()
    tmp = state_dir / f".{AGENT_ID_FILE}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (agent_id + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _read(path)
        _fsync_dir(state_dir)
    except OSError as exc:
        raise IdentityError(f"{path}: cannot write the agent id: {exc.strerror or exc}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return agent_id


def new_agent_id() -> str:
    """A random (version 4) UUID as 32 hex digits, like `uuid.uuid4().hex` without importing `uuid` (232 kB of
    resident memory in the worker for 16 random bytes)."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return raw.hex()


def _read(path: Path) -> str:
    """Read and check the id; FileNotFoundError passes through, anything else is an IdentityError."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise IdentityError(f"{path}: cannot read the agent id: {reason}") from None
    if not _AGENT_ID_RE.fullmatch(text):
        raise IdentityError(f"{path}: not a valid agent id (expected 32 lowercase hex digits); "
                            "remove the file to create a new identity")
    return text


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
