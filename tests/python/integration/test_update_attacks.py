"""TUF's guarantees, end to end: the endpoint's repository is tampered with on disk the way an attacker who owns the
server (or a mirror) could, an update is rolled out, and the real agent refuses it, reports why, and keeps serving
its version. Metadata is re-signed with the repository's real online keys where the attack needs it, so each case
fails for exactly the reason under test."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile
from tuf.api.serialization.json import JSONSerializer

from harness import EndpointProc, SupervisorProc
from update_lab import cli, make_bundle, start_connected, start_rollout, supervised_agent, version_of, \
    wait_update_ended

pytestmark = pytest.mark.integration


class Repo:
    """The endpoint's repository files (docs/updates.md, section 1)."""

    def __init__(self, endpoint: EndpointProc) -> None:
        self.root = endpoint.state_dir / "tuf"
        self.meta = self.root / "metadata"

    def signer(self, role: str) -> CryptoSigner:
        key = self.root / "online" / f"{role}.key"
        return CryptoSigner(load_pem_private_key(key.read_bytes(), None))  # type: ignore[arg-type]

    def newest(self, role: str) -> tuple[int, Path]:
        found = [(int(p.name.split(".")[0]), p) for p in self.meta.glob(f"*.{role}.json")]
        return max(found)

    def timestamp(self) -> Metadata[Any]:
        return Metadata.from_file(str(self.meta / "timestamp.json"))

    def write(self, md: Metadata[Any], path: Path) -> None:
        path.write_bytes(md.to_bytes(JSONSerializer(compact=False)))

    def publish_snapshot_and_timestamp(self, targets_version: int, *, expires: datetime | None = None) -> None:
        """A new snapshot naming targets_version, and a new timestamp naming it — both signed with the real online
        keys (only what the attack changes is wrong)."""
        _, snap_path = self.newest("snapshot")
        snap = Metadata.from_file(str(snap_path))
        snap.signed.version += 1
        snap.signed.meta["targets.json"] = MetaFile(version=targets_version)
        snap.signatures.clear()
        snap.sign(self.signer("snapshot"))
        self.write(snap, self.meta / f"{snap.signed.version}.snapshot.json")
        ts = self.timestamp()
        ts.signed.version += 1
        ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
        if expires is not None:
            ts.signed.expires = expires
        ts.signatures.clear()
        ts.sign(self.signer("timestamp"))
        self.write(ts, self.meta / "timestamp.json")


def tamper_target(repo: Repo) -> None:
    [target] = list((repo.root / "targets" / "bundles" / "greeter").glob("*.2.0.0.tar.gz"))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def sign_targets_with_wrong_key(repo: Repo) -> None:
    version, path = repo.newest("targets")
    md = Metadata.from_file(str(path))
    md.signed.version = version + 1
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    repo.write(md, repo.meta / f"{version + 1}.targets.json")
    repo.publish_snapshot_and_timestamp(version + 1)


def freeze(repo: Repo) -> None:
    """An attacker replays a timestamp that has expired (a mirror frozen in the past): signed, newer, but expired."""
    version, _ = repo.newest("targets")
    repo.publish_snapshot_and_timestamp(version, expires=datetime.now(timezone.utc).replace(microsecond=0)
                                        - timedelta(hours=1))


def mix_and_match(repo: Repo) -> None:
    """The snapshot names targets version N; the server hands out version N-1's (validly signed) document as N."""
    version, path = repo.newest("targets")
    shutil.copyfile(repo.meta / f"{version - 1}.targets.json", path)


ATTACKS: dict[str, tuple[Callable[[Repo], None], set[str]]] = {
    "tampered-target": (tamper_target, {"hash_mismatch"}),
    "wrong-key": (sign_targets_with_wrong_key, {"bad_signature"}),
    "freeze": (freeze, {"metadata_expired"}),
    "mix-and-match": (mix_and_match, {"rollback", "bad_target", "bad_signature"}),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_refused_and_agent_keeps_serving(attack: str, tmp_path: Path, endpoint: EndpointProc,
                                                supervisors: list[SupervisorProc]) -> None:
    tamper, reasons = ATTACKS[attack]
    sup = supervised_agent(tmp_path / "agent", endpoint, make_bundle(tmp_path / "src", "1.0.0"))
    supervisors.append(sup)
    start_connected(sup, endpoint)
    # The agent learns the repository's current metadata first (a legitimate update to 1.5.0), so that attacks on
    # versions it has seen are attacks, not first contact.
    cli(endpoint, "release", "bundle", str(make_bundle(tmp_path / "src", "1.5.0")))
    start_rollout(endpoint, "--bundle", "greeter==1.5.0", "--waves", "100%")
    assert wait_update_ended(endpoint, sup.agent_id, "greeter", "1.5.0")["state"] == "committed"
    endpoint.wait_connected(sup.agent_id)

    cli(endpoint, "release", "bundle", str(make_bundle(tmp_path / "src", "2.0.0")))
    tamper(Repo(endpoint))
    start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
    rec = wait_update_ended(endpoint, sup.agent_id, "greeter", "2.0.0")
    assert rec["state"] == "failed", rec
    assert any(r in (rec.get("detail") or "") for r in reasons), rec
    assert version_of(endpoint, sup.agent_id) == "1.5.0"
    assert not (sup.state / "bundles" / "greeter" / "2.0.0").exists()
    assert not (sup.state / "updates" / "staged.json").exists()


def test_rollback_attack_refused(tmp_path: Path, endpoint: EndpointProc,
                                 supervisors: list[SupervisorProc]) -> None:
    """The server replays an older, validly signed, unexpired timestamp after the agent has seen a newer one."""
    sup = supervised_agent(tmp_path / "agent", endpoint, make_bundle(tmp_path / "src", "1.0.0"))
    supervisors.append(sup)
    start_connected(sup, endpoint)
    repo = Repo(endpoint)
    old_timestamp = (repo.meta / "timestamp.json").read_bytes()
    cli(endpoint, "release", "bundle", str(make_bundle(tmp_path / "src", "1.5.0")))
    start_rollout(endpoint, "--bundle", "greeter==1.5.0", "--waves", "100%")
    assert wait_update_ended(endpoint, sup.agent_id, "greeter", "1.5.0")["state"] == "committed"
    endpoint.wait_connected(sup.agent_id)
    cli(endpoint, "release", "bundle", str(make_bundle(tmp_path / "src", "2.0.0")))
    assert json.loads(old_timestamp)["signed"]["version"] < repo.timestamp().signed.version
    (repo.meta / "timestamp.json").write_bytes(old_timestamp)
    start_rollout(endpoint, "--bundle", "greeter==2.0.0", "--waves", "100%")
    rec = wait_update_ended(endpoint, sup.agent_id, "greeter", "2.0.0")
    assert rec["state"] == "failed" and "rollback" in (rec.get("detail") or ""), rec
    assert version_of(endpoint, sup.agent_id) == "1.5.0"
