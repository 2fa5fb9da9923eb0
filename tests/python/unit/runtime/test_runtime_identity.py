"""pyagent.runtime._identity: the agent id in state_dir/agent-id."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from pyagent.runtime import IdentityError, load_or_create_agent_id
from pyagent.runtime._identity import new_agent_id


def test_created_once_then_reused(tmp_path: Path) -> None:
    state = tmp_path / "var" / "lib" / "pyagent"
    first = load_or_create_agent_id(state)
    assert len(first) == 32 and int(first, 16) >= 0 and first == first.lower()
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert (state / "agent-id").read_text() == first + "\n"
    assert stat.S_IMODE((state / "agent-id").stat().st_mode) == 0o600
    assert load_or_create_agent_id(state) == first
    assert sorted(os.listdir(state)) == ["agent-id"]  # no temporary file left behind


def test_existing_directory_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    agent_id = load_or_create_agent_id(tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert load_or_create_agent_id(tmp_path) == agent_id


def test_ids_differ_between_state_dirs(tmp_path: Path) -> None:
    assert load_or_create_agent_id(tmp_path / "a") != load_or_create_agent_id(tmp_path / "b")


def test_reads_an_id_written_by_hand(tmp_path: Path) -> None:
    (tmp_path / "agent-id").write_text("0123456789abcdef0123456789abcdef")
    assert load_or_create_agent_id(tmp_path) == "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("content", ["", "not-an-id\n", "0123456789ABCDEF0123456789ABCDEF\n"])
def test_corrupt_id_is_an_error_not_a_new_identity(tmp_path: Path, content: str) -> None:
    (tmp_path / "agent-id").write_text(content)
    with pytest.raises(IdentityError, match="agent-id: not a valid agent id"):
        load_or_create_agent_id(tmp_path)
    assert (tmp_path / "agent-id").read_text() == content


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_state_dir(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(IdentityError, match="cannot"):
            load_or_create_agent_id(tmp_path / "state")
    finally:
        tmp_path.chmod(0o700)


def test_state_dir_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    with pytest.raises(IdentityError, match="state"):
        load_or_create_agent_id(tmp_path / "state")


def test_new_ids_are_uuid4() -> None:
    ids = {new_agent_id() for _ in range(200)}
    assert len(ids) == 200
    for agent_id in ids:
        parsed = uuid.UUID(hex=agent_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and parsed.hex == agent_id
