"""The endpoint's TUF repository (`_tufrepo.py`): real files, real ed25519 keys, python-tuf metadata."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from fakeagent import endpoint_config
from tuf.api.metadata import Metadata, Root, TargetFile, Targets

from pyagent.endpoint import Endpoint
from pyagent.endpoint._tufrepo import UPLOAD_MAX_AGE_S, Expiry, RepoError, TufRepo, ensure_signer, load_signer


def next_targets(repo: TufRepo, keys: Path, files: dict[str, bytes], key_file: str = "targets.key",
                 version: int | None = None) -> Metadata[Targets]:
    """What `pyagent release` signs: the current targets plus `files`, next version, signed with `keys/key_file`."""
    md: Metadata[Targets] = Metadata.from_bytes(repo.targets.to_bytes())
    for path, data in files.items():
        md.signed.targets[path] = TargetFile.from_data(path, data, ["sha256"])
    md.signed.version = repo.targets.signed.version + 1 if version is None else version
    md.signed.expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)
    md.signatures.clear()
    md.sign(load_signer(keys / key_file))
    return md


def upload(repo: TufRepo, path: str, data: bytes) -> None:
    dest = repo.upload_path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)


@pytest.fixture
def made(tmp_path: Path) -> tuple[TufRepo, Path]:
    repo, _ = TufRepo.create(tmp_path / "tuf", tmp_path / "keys")
    return repo, tmp_path / "keys"


def test_create_writes_keys_private_and_a_consistent_snapshot_root(tmp_path: Path) -> None:
    repo, new_keys = TufRepo.create(tmp_path / "tuf", tmp_path / "keys")
    assert sorted(p.name for p in new_keys) == ["root.key", "snapshot.key", "targets.key", "timestamp.key"]
    for key in new_keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    assert {p.parent for p in new_keys} == {tmp_path / "keys", tmp_path / "tuf" / "online"}
    meta = tmp_path / "tuf" / "metadata"
    assert sorted(p.name for p in meta.iterdir()) == ["1.root.json", "1.snapshot.json", "1.targets.json",
                                                      "root.json", "timestamp.json"]
    root: Metadata[Root] = Metadata.from_file(str(meta / "root.json"))
    assert root.signed.consistent_snapshot is True
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)  # self-signed with root.key
    assert root.signed.roles["targets"].keyids == [load_signer(tmp_path / "keys" / "targets.key").public_key.keyid]
    with pytest.raises(RepoError, match="exists already"):
        TufRepo.create(tmp_path / "tuf", tmp_path / "keys")
    # A second repository reuses keys kept in a directory (`pyagent release init --keys DIR`).
    _, again = TufRepo.create(tmp_path / "tuf2", tmp_path / "keys")
    assert sorted(p.name for p in again) == ["snapshot.key", "timestamp.key"]


def test_publish_lists_and_orders_files(made: tuple[TufRepo, Path]) -> None:
    repo, keys = made
    data = b"bundle bytes " * 100
    path = "bundles/hello/1.2.0.tar.gz"
    md = next_targets(repo, keys, {path: data})
    md.signed.targets[path].unrecognized_fields["custom"] = {"pyagent": {"kind": "bundle", "name": "hello",
                                                                        "version": "1.2.0"}}
    md.sign(load_signer(keys / "targets.key"), append=False)
    upload(repo, path, data)
    assert repo.publish_targets(md.to_bytes()) == 2
    sha = md.signed.targets[path].hashes["sha256"]
    assert (repo.targets_dir / f"bundles/hello/{sha}.1.2.0.tar.gz").read_bytes() == data
    assert not repo.upload_path(path).exists()  # moved into place
    assert repo.find_target("bundle", "hello", "1.2.0") == path
    assert repo.find_target("bundle", "hello", "9.9.9") is None
    assert repo.list_targets()[0]["name"] == "hello" and repo.list_targets()[0]["length"] == len(data)
    snapshot = json.loads((repo.metadata_dir / "2.snapshot.json").read_text())
    assert snapshot["signed"]["meta"] == {"targets.json": {"version": 2}}
    timestamp = json.loads((repo.metadata_dir / "timestamp.json").read_text())
    assert timestamp["signed"]["meta"]["snapshot.json"]["version"] == 2
    # A reopened repository sees the same state (the newest versions on disk).
    again = TufRepo(repo.dir)
    assert again.targets.signed.version == 2 and again.snapshot.signed.version == 2
    # Host targets by platform.
    host = "hosts/linux-x86_64/0.2.0/pyagent-host"
    upload(repo, host, b"\x7fELF host")
    repo.publish_targets(next_targets(repo, keys, {host: b"\x7fELF host"}).to_bytes())
    assert repo.find_target("host", "pyagent-host", "0.2.0", "linux-x86_64") == host
    assert repo.find_target("host", "pyagent-host", "0.2.0") == host
    assert repo.find_target("host", "pyagent-host", "0.2.0", "linux-aarch64") is None


def test_refused_releases(made: tuple[TufRepo, Path], tmp_path: Path) -> None:
    repo, keys = made
    path = "bundles/hello/2.0.0.tar.gz"
    data = b"the real bundle"
    # Signed by another key than the root's targets key.
    ensure_signer(tmp_path / "other" / "targets.key")
    with pytest.raises(RepoError, match="bad signature") as err:
        repo.publish_targets(next_targets(repo, tmp_path / "other", {path: data}).to_bytes())
    assert err.value.status == 403
    # Signed with the snapshot key: also not the targets key.
    with pytest.raises(RepoError, match="bad signature"):
        repo.publish_targets(next_targets(repo, repo.online_dir, {path: data}, "snapshot.key").to_bytes())
    # Tampered bytes: the upload is not what was signed.
    upload(repo, path, data + b" tampered")
    with pytest.raises(RepoError, match="does not match the signed length and hashes") as err:
        repo.publish_targets(next_targets(repo, keys, {path: data}).to_bytes())
    assert err.value.status == 400
    upload(repo, path, b"the real bundlX")  # same length, other bytes
    with pytest.raises(RepoError, match="does not match"):
        repo.publish_targets(next_targets(repo, keys, {path: data}).to_bytes())
    # Nothing uploaded at all.
    with pytest.raises(RepoError, match="no uploaded file"):
        repo.publish_targets(next_targets(repo, keys, {"bundles/x/1.0.tar.gz": b"x"}).to_bytes())
    # Not metadata, or another role's.
    with pytest.raises(RepoError, match="not TUF metadata"):
        repo.publish_targets(b"{\"not\": \"tuf\"}")
    with pytest.raises(RepoError, match="not targets"):
        repo.publish_targets(repo.snapshot.to_bytes())
    # An unsafe target path.
    with pytest.raises(RepoError, match="bad target path"):
        repo.publish_targets(next_targets(repo, keys, {"../x": b"x"}).to_bytes())
    assert repo.targets.signed.version == 1  # nothing was published
    # The good one, then a replay of it and an older version: refused.
    upload(repo, path, data)
    good = next_targets(repo, keys, {path: data}).to_bytes()
    assert repo.publish_targets(good) == 2
    with pytest.raises(RepoError, match="the next version is 3") as err:
        repo.publish_targets(good)
    assert err.value.status == 409
    with pytest.raises(RepoError, match="never accepted"):
        repo.publish_targets(next_targets(repo, keys, {}, version=1).to_bytes())
    with pytest.raises(RepoError, match="the next version is 3"):
        repo.publish_targets(next_targets(repo, keys, {}, version=5).to_bytes())
    # Expired targets metadata.
    md = next_targets(repo, keys, {})
    md.signed.expires = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    md.sign(load_signer(keys / "targets.key"), append=False)
    with pytest.raises(RepoError, match="expired"):
        repo.publish_targets(md.to_bytes())


def test_refresh_renews_timestamp_and_snapshot_past_half_their_lifetime(tmp_path: Path) -> None:
    repo, _ = TufRepo.create(tmp_path / "tuf", tmp_path / "keys", Expiry(timestamp_s=3, snapshot_s=3600))
    assert repo.refresh() == []  # fresh
    first = repo.timestamp.signed.expires
    time.sleep(2.05)  # more than half of the timestamp's 3 s (expiry times have whole seconds)
    assert repo.refresh() == ["timestamp"]
    on_disk = json.loads((repo.metadata_dir / "timestamp.json").read_text())["signed"]
    assert on_disk["version"] == 2 and repo.timestamp.signed.expires > first
    assert repo.refresh(force=True) == ["snapshot", "timestamp"]
    for _ in range(5):
        repo.refresh(force=True)
    # Old snapshots are pruned, the ones a timestamp may still name are kept.
    names = sorted(p.name for p in repo.metadata_dir.glob("*.snapshot.json"))
    assert names == ["5.snapshot.json", "6.snapshot.json", "7.snapshot.json"]


async def test_endpoint_creates_the_repository_and_refreshes_the_timestamp(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "pyagent.endpoint")
    config = endpoint_config(tmp_path / "state", tuf_timestamp_expiry_s=2)
    async with Endpoint(config) as ep:
        keys = tmp_path / "state" / "tuf-keys"
        assert stat.S_IMODE((keys / "targets.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "state" / "tuf" / "online" / "timestamp.key").stat().st_mode) == 0o600
        assert any("event=tuf.created" in r.getMessage() and "offline" in r.getMessage() for r in caplog.records)
        version = ep.repo.timestamp.signed.version
        for _ in range(100):  # bounded: 10 s; the refresh task runs every 0.5 s here
            if ep.repo.timestamp.signed.version > version:
                break
            await asyncio.sleep(0.1)
        assert ep.repo.timestamp.signed.version > version
        assert any("event=tuf.refreshed" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with Endpoint(config) as ep:  # the second start loads it, makes no keys
        assert ep.repo.root.signed.version == 1
        assert not any("event=tuf.created" in r.getMessage() for r in caplog.records)


def test_bad_expiry_config_is_named(tmp_path: Path) -> None:
    from pyagent.endpoint._errors import ConfigError

    with pytest.raises(ConfigError, match="tuf_timestamp_expiry_s"):
        endpoint_config(tmp_path, tuf_timestamp_expiry_s=0)


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def test_housekeeping_removes_abandoned_uploads_after_a_day(made: tuple[TufRepo, Path]) -> None:
    repo, _ = made
    upload(repo, "bundles/old/1.0.tar.gz", b"never published")
    upload(repo, "bundles/new/1.0.tar.gz", b"about to be published")
    stale_part = repo.uploads_dir / ".x.1.2.part"  # a write that died half-way
    stale_part.write_bytes(b"half")
    _age(repo.upload_path("bundles/old/1.0.tar.gz"), UPLOAD_MAX_AGE_S + 60)
    _age(stale_part, UPLOAD_MAX_AGE_S + 60)
    _age(repo.upload_path("bundles/new/1.0.tar.gz"), UPLOAD_MAX_AGE_S - 60)
    removed = repo.housekeep()
    assert sorted(removed["uploads"]) == sorted([".x.1.2.part", repo.upload_path("bundles/old/1.0.tar.gz").name])
    assert [p.name for p in repo.uploads_dir.iterdir()] == [repo.upload_path("bundles/new/1.0.tar.gz").name]
    assert repo.housekeep() == {"uploads": [], "targets": []}


def test_housekeeping_keeps_targets_an_old_snapshot_may_name(tmp_path: Path) -> None:
    repo, _ = TufRepo.create(tmp_path / "tuf", tmp_path / "keys", Expiry(snapshot_s=3600))
    keys = tmp_path / "keys"
    old, new = "bundles/hello/1.0.tar.gz", "bundles/hello/2.0.tar.gz"
    upload(repo, old, b"one")
    repo.publish_targets(next_targets(repo, keys, {old: b"one"}).to_bytes())
    old_file = repo.target_file(f"bundles/hello/{repo.targets.signed.targets[old].hashes['sha256']}.1.0.tar.gz")
    assert old_file is not None
    _age(old_file, 7200)  # uploaded long ago
    # Version 3 lists only 2.0: 1.0 is no longer listed, but agents may hold the snapshot of version 2.
    md = next_targets(repo, keys, {new: b"two"})
    del md.signed.targets[old]
    md.sign(load_signer(keys / "targets.key"), append=False)
    upload(repo, new, b"two")
    repo.publish_targets(md.to_bytes())
    current = repo.metadata_dir / "3.targets.json"
    assert repo.housekeep()["targets"] == [] and old_file.exists()  # delisted just now
    _age(current, 1800)  # half the snapshot lifetime since it was delisted: still kept
    assert repo.refresh() == [] and old_file.exists()
    _age(current, 3700)  # past the snapshot lifetime: every snapshot naming version 2 has expired
    stray = repo.targets_dir / "bundles" / "gone" / "abc.9.tar.gz"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"x")  # unlisted but new: kept
    removed = repo.housekeep()
    assert removed["targets"] == [old_file.relative_to(repo.targets_dir).as_posix()]
    assert not old_file.exists() and stray.exists()
    listed = repo.targets.signed.targets[new].hashes["sha256"]
    new_file = repo.targets_dir / "bundles" / "hello" / f"{listed}.2.0.tar.gz"
    _age(new_file, 7200)  # listed: kept however old
    _age(stray, 7200)
    assert repo.housekeep()["targets"] == ["bundles/gone/abc.9.tar.gz"]
    assert new_file.exists() and not (repo.targets_dir / "bundles" / "gone").exists()
