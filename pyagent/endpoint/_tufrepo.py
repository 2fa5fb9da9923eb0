"""The endpoint's TUF repository on disk (docs/updates.md §1), built with python-tuf's metadata API.

    STATE/tuf/metadata/N.root.json, root.json, N.targets.json, N.snapshot.json, timestamp.json
    STATE/tuf/targets/<dir>/<sha256>.<basename>       consistent-snapshot target files
    STATE/tuf/uploads/<quoted target path>            uploaded, not yet published
    STATE/tuf/online/snapshot.key, timestamp.key      online keys (PEM, 0600)
    KEYS/root.key, targets.key                        offline keys (STATE/tuf-keys when the endpoint made them)

Every write is atomic and in the order target files -> N.targets.json -> N.snapshot.json -> timestamp.json, so an
agent never sees metadata that names a file not there yet. Nothing here signs or hashes by hand: python-tuf and
securesystemslib do all of it.

Housekeeping (`housekeep`, run by every `refresh`, i.e. on the endpoint's refresh tick): uploads never published are
removed after UPLOAD_MAX_AGE_S; target files the current targets metadata no longer lists are removed once the
snapshot lifetime has passed since they stopped being listed.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import re
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from pyagent._updatenames import HOST_NAME
from pyagent._files import write_atomic
from pyagent.endpoint._errors import EndpointError
from pyagent.endpoint._log import log_event

_log = logging.getLogger("pyagent.endpoint.tuf")

ROOT_EXPIRY_S = 365 * 86400
DEFAULT_TIMESTAMP_EXPIRY_S = 86400
DEFAULT_SNAPSHOT_EXPIRY_S = 7 * 86400
DEFAULT_TARGETS_EXPIRY_S = 90 * 86400
MAX_TARGET_PATH = 200
# Old snapshot versions kept for agents that read a timestamp just before a refresh.
KEEP_SNAPSHOTS = 3
# An upload that no targets version listed within this time is abandoned (the release command publishes at once).
UPLOAD_MAX_AGE_S = 86400
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
_METADATA_NAME = re.compile(r"(?:[0-9]+\.)?(?:root|targets|snapshot|timestamp)\.json\Z")


class RepoError(EndpointError):
    """A release was refused or the repository cannot be used; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Expiry:
    """Lifetimes in seconds of the metadata the endpoint signs (targets: the default the release command uses)."""

    timestamp_s: float = DEFAULT_TIMESTAMP_EXPIRY_S
    snapshot_s: float = DEFAULT_SNAPSHOT_EXPIRY_S
    targets_s: float = DEFAULT_TARGETS_EXPIRY_S


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def expires_in(seconds: float) -> dt.datetime:
    return _now() + dt.timedelta(seconds=seconds)


def check_target_path(path: str) -> str:
    """`path` if it is a safe relative target path (`a/b/c.tar.gz`: no `..`, no empty or dot-led parts), else raise
    RepoError naming the problem."""
    if not isinstance(path, str) or not path or len(path) > MAX_TARGET_PATH:
        raise RepoError(f"bad target path {path!r}: 1 to {MAX_TARGET_PATH} characters")
    for part in path.split("/"):
        if not _COMPONENT.match(part):
            raise RepoError(f"bad target path {path!r}: each part must be letters, digits, '.', '_', '+' or '-' "
                            "and not start with '.'")
    return path


def load_signer(path: Path) -> CryptoSigner:
    """The ed25519 signer in a PEM (PKCS#8) key file; RepoError naming the file when it is missing or not a key."""
    try:
        return CryptoSigner(load_pem_private_key(path.read_bytes(), password=None))
    except FileNotFoundError:
        raise RepoError(f"no key file {path}", 500) from None
    except (OSError, ValueError, TypeError) as exc:
        raise RepoError(f"cannot load the key in {path}: {exc}", 500) from None


def ensure_signer(path: Path) -> tuple[CryptoSigner, bool]:
    """The key in `path`, made (ed25519, 0600) when the file does not exist; (signer, whether it is new)."""
    if path.exists():
        return load_signer(path), False
    signer = CryptoSigner.generate_ed25519()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, signer.private_bytes, 0o600)
    return signer, True


def _read(path: Path) -> Metadata[Any]:
    try:
        return Metadata.from_file(str(path))
    except (OSError, DeserializationError) as exc:
        raise RepoError(f"cannot read TUF metadata {path}: {exc}", 500) from None


class TufRepo:
    """The repository under `STATE/tuf`. Writes take a lock: a release may be published from a worker thread while
    the endpoint's loop refreshes the timestamp."""

    def __init__(self, root_dir: Path, expiry: Expiry | None = None) -> None:
        self.dir = root_dir
        self.metadata_dir = root_dir / "metadata"
        self.targets_dir = root_dir / "targets"
        self.uploads_dir = root_dir / "uploads"
        self.online_dir = root_dir / "online"
        self.expiry = expiry or Expiry()
        self._lock = threading.Lock()
        self.root: Metadata[Root] = _read(self.metadata_dir / "root.json")
        self.targets: Metadata[Targets] = _read(self._newest("targets"))
        self.snapshot: Metadata[Snapshot] = _read(self._newest("snapshot"))
        self.timestamp: Metadata[Timestamp] = _read(self.metadata_dir / "timestamp.json")
        self._snapshot_signer = load_signer(self.online_dir / "snapshot.key")
        self._timestamp_signer = load_signer(self.online_dir / "timestamp.key")

    # -- creating and opening ---------------------------------------------------------------------------------

    @staticmethod
    def exists(root_dir: Path) -> bool:
        return (root_dir / "metadata" / "root.json").exists()

    @classmethod
    def create(cls, root_dir: Path, keys_dir: Path, expiry: Expiry | None = None) -> tuple[TufRepo, list[Path]]:
        """A new repository: root and targets keys from `keys_dir` (made there when missing), online keys made in
        `root_dir/online`. Returns the repository and the key files it made. RepoError if one exists already."""
        if cls.exists(root_dir):
            raise RepoError(f"a TUF repository exists already in {root_dir}", 409)
        expiry = expiry or Expiry()
        made: list[Path] = []
        signers: dict[str, CryptoSigner] = {}
        for role, path in (("root", keys_dir / "root.key"), ("targets", keys_dir / "targets.key"),
                           ("snapshot", root_dir / "online" / "snapshot.key"),
                           ("timestamp", root_dir / "online" / "timestamp.key")):
            signers[role], new = ensure_signer(path)
            if new:
                made.append(path)
        metadata_dir = root_dir / "metadata"
        for sub in (metadata_dir, root_dir / "targets", root_dir / "uploads"):
            sub.mkdir(mode=0o755 if sub != root_dir / "uploads" else 0o700, parents=True, exist_ok=True)
        root = Metadata(Root(expires=expires_in(ROOT_EXPIRY_S), consistent_snapshot=True))
        for role, signer in signers.items():
            root.signed.add_key(signer.public_key, role)
        root.sign(signers["root"])
        targets = Metadata(Targets(expires=expires_in(expiry.targets_s)))
        targets.sign(signers["targets"])
        snapshot = Metadata(Snapshot(expires=expires_in(expiry.snapshot_s)))
        snapshot.sign(signers["snapshot"])
        timestamp = Metadata(Timestamp(expires=expires_in(expiry.timestamp_s)))
        timestamp.sign(signers["timestamp"])
        write_atomic(metadata_dir / "1.targets.json", targets.to_bytes(), 0o644)
        write_atomic(metadata_dir / "1.snapshot.json", snapshot.to_bytes(), 0o644)
        write_atomic(metadata_dir / "timestamp.json", timestamp.to_bytes(), 0o644)
        write_atomic(metadata_dir / "1.root.json", root.to_bytes(), 0o644)
        write_atomic(metadata_dir / "root.json", root.to_bytes(), 0o644)  # last: it marks the repository as made
        return cls(root_dir, expiry), made

    def _newest(self, role: str) -> Path:
        versions = [int(p.name.split(".", 1)[0]) for p in self.metadata_dir.glob(f"*.{role}.json")
                    if p.name.split(".", 1)[0].isdigit()]
        if not versions:
            raise RepoError(f"no {role} metadata in {self.metadata_dir}", 500)
        return self.metadata_dir / f"{max(versions)}.{role}.json"

    # -- reading ----------------------------------------------------------------------------------------------

    def metadata_file(self, name: str) -> Path | None:
        """The file an agent or operator asks for by name: `N.root.json`, `root.json`, `N.targets.json`,
        `N.snapshot.json`, `timestamp.json`; `targets.json` and `snapshot.json` name the current versions."""
        if not _METADATA_NAME.match(name):
            return None
        if name in ("targets.json", "snapshot.json"):
            role = name.split(".")[0]
            version = self.targets.signed.version if role == "targets" else self.snapshot.signed.version
            name = f"{version}.{name}"
        path = self.metadata_dir / name
        return path if path.is_file() else None

    def target_file(self, path: str) -> Path | None:
        """The file served for a consistent-snapshot target path (`dir/<sha256>.<basename>`), or None."""
        try:
            check_target_path(path)
        except RepoError:
            return None
        file = self.targets_dir / path
        return file if file.is_file() else None

    def list_targets(self) -> list[dict[str, Any]]:
        """Every target of the current targets version: path, length, hashes and the `pyagent` custom fields."""
        out = []
        for path, target in sorted(self.targets.signed.targets.items()):
            custom = target.custom.get("pyagent", {}) if isinstance(target.custom, dict) else {}
            out.append({"path": path, "length": target.length, "hashes": dict(target.hashes),
                        "kind": custom.get("kind"), "name": custom.get("name"), "version": custom.get("version"),
                        "platform": custom.get("platform")})
        return out

    def find_target(self, kind: str, name: str, version: str, platform: str | None = None) -> str | None:
        """The target path of a bundle (`name`, `version`) or a host (`name` "pyagent-host", `version`, `platform`;
        without a platform: the first platform that has it), or None when the current targets do not list it."""
        known = self.targets.signed.targets
        if kind == "bundle":
            path = f"bundles/{name}/{version}.tar.gz"
            return path if path in known else None
        if kind == "host" and name == HOST_NAME:
            if platform is not None:
                path = f"hosts/{platform}/{version}/pyagent-host"
                return path if path in known else None
            for path in sorted(known):
                parts = path.split("/")
                if len(parts) == 4 and parts[0] == "hosts" and parts[2] == version and parts[3] == HOST_NAME:
                    return path
        return None

    def summary(self) -> dict[str, Any]:
        return {"version": self.targets.signed.version, "expires": self.targets.signed.expires.isoformat(),
                "snapshot_version": self.snapshot.signed.version,
                "timestamp_expires": self.timestamp.signed.expires.isoformat(),
                "targets_expiry_s": self.expiry.targets_s, "targets": self.list_targets()}

    # -- uploading and publishing -----------------------------------------------------------------------------

    def upload_path(self, target_path: str) -> Path:
        """Where an upload of `target_path` waits until a targets version lists it."""
        return self.uploads_dir / urllib.parse.quote(check_target_path(target_path), safe="")

    def publish_targets(self, data: bytes) -> int:
        """Verify a signed targets metadata and publish it with a new snapshot and timestamp; returns its version.

        Refused (RepoError with the HTTP status) when it is not targets metadata, not signed by the targets key(s)
        of the trusted root, not the next version, expired, delegating, or when a target it lists is neither
        published already nor uploaded with exactly the signed length and hashes."""
        try:
            new = Metadata[Targets].from_bytes(data)
        except DeserializationError as exc:
            raise RepoError(f"the body is not TUF metadata: {exc}") from None
        if not isinstance(new.signed, Targets):
            raise RepoError(f"the body is {new.signed.type} metadata, not targets")
        try:
            self.root.signed.verify_delegate(Targets.type, new.signed_bytes, new.signatures)
        except UnsignedMetadataError:
            keyids = ", ".join(self.root.signed.roles[Targets.type].keyids)
            raise RepoError("bad signature: the targets metadata is not signed by the targets key of the trusted "
                            f"root (keyid {keyids}); sign it with that targets.key", 403) from None
        with self._lock:
            current = self.targets.signed.version
            if new.signed.version != current + 1:
                raise RepoError(f"targets version {new.signed.version} refused: the next version is {current + 1} "
                                "(an older or replayed targets metadata is never accepted)", 409)
            if new.signed.is_expired(_now()):
                raise RepoError(f"the targets metadata expired at {new.signed.expires.isoformat()}")
            if new.signed.delegations is not None:
                raise RepoError("delegations are not supported in this repository")
            placed = [self._place(path, target) for path, target in sorted(new.signed.targets.items())]
            write_atomic(self.metadata_dir / f"{new.signed.version}.targets.json", data, 0o644)
            self.targets = new
            for upload in placed:
                if upload is not None:
                    upload.unlink(missing_ok=True)
            self._write_snapshot()
        return new.signed.version

    def _place(self, path: str, target: TargetFile) -> Path | None:
        """Check one listed target and move its upload to its consistent-snapshot name; returns the upload to remove
        once the metadata is written (None when the file was published before)."""
        check_target_path(path)
        sha256 = target.hashes.get("sha256")
        if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise RepoError(f"target {path}: it must list a sha256 hash")
        dirname, sep, basename = path.rpartition("/")
        dest = self.targets_dir / f"{dirname}{sep}{sha256}.{basename}"
        source = dest if dest.is_file() else self.upload_path(path)
        try:
            with open(source, "rb") as f:
                target.verify_length_and_hashes(f)
        except FileNotFoundError:
            raise RepoError(f"target {path}: no uploaded file (PUT /api/v1/releases/targets/{path} first)") from None
        except Exception as exc:  # LengthOrHashMismatchError: the bytes are not those that were signed
            raise RepoError(f"target {path}: the uploaded file does not match the signed length and hashes "
                            f"({exc})") from None
        if source == dest:
            return None
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        os.link(source, tmp)  # the upload stays until the metadata is written: a failure leaves it to retry
        os.replace(tmp, dest)
        return source

    # -- online signing ---------------------------------------------------------------------------------------

    def _write_snapshot(self) -> None:
        snapshot = Metadata(Snapshot(version=self.snapshot.signed.version + 1,
                                     expires=expires_in(self.expiry.snapshot_s),
                                     meta={"targets.json": MetaFile(version=self.targets.signed.version)}))
        snapshot.sign(self._snapshot_signer)
        write_atomic(self.metadata_dir / f"{snapshot.signed.version}.snapshot.json", snapshot.to_bytes(), 0o644)
        self.snapshot = snapshot
        self._write_timestamp()
        for old in self.metadata_dir.glob("*.snapshot.json"):
            number = old.name.split(".", 1)[0]
            if number.isdigit() and int(number) <= snapshot.signed.version - KEEP_SNAPSHOTS:
                old.unlink(missing_ok=True)

    def _write_timestamp(self) -> None:
        timestamp = Metadata(Timestamp(version=self.timestamp.signed.version + 1,
                                       expires=expires_in(self.expiry.timestamp_s),
                                       snapshot_meta=MetaFile(version=self.snapshot.signed.version)))
        timestamp.sign(self._timestamp_signer)
        write_atomic(self.metadata_dir / "timestamp.json", timestamp.to_bytes(), 0o644)
        self.timestamp = timestamp

    def refresh(self, force: bool = False) -> list[str]:
        """Re-sign the snapshot and/or the timestamp when less than half of its lifetime is left (or `force`);
        returns the roles re-signed."""
        done = []
        with self._lock:
            now = _now()
            half_snapshot = dt.timedelta(seconds=self.expiry.snapshot_s / 2)
            half_timestamp = dt.timedelta(seconds=self.expiry.timestamp_s / 2)
            if force or self.snapshot.signed.expires - now < half_snapshot:
                self._write_snapshot()
                done = ["snapshot", "timestamp"]
            elif self.timestamp.signed.expires - now < half_timestamp:
                self._write_timestamp()
                done = ["timestamp"]
        self.housekeep()
        return done

    def housekeep(self, now: float | None = None) -> dict[str, list[str]]:
        """Remove abandoned uploads and target files no longer needed; returns what was removed, by kind
        ("uploads": names in uploads/, "targets": paths under targets/). A file that cannot be removed is logged and
        tried again next time."""
        now = time.time() if now is None else now
        removed: dict[str, list[str]] = {"uploads": [], "targets": []}
        with self._lock:  # not while a publish moves uploads into targets/
            if self.uploads_dir.is_dir():
                for entry in sorted(self.uploads_dir.iterdir()):
                    if _older(entry, now - UPLOAD_MAX_AGE_S) and _remove(entry):
                        removed["uploads"].append(entry.name)
            # A target file stays while an agent may still hold a snapshot naming a targets version that lists it:
            # such a snapshot was signed before the current targets version was published (every snapshot since
            # names the current one), so it expires at most snapshot_s after that. Until then an agent that read
            # the previous snapshot, or resumes a download it began under it, still needs the file.
            current = self.metadata_dir / f"{self.targets.signed.version}.targets.json"
            cutoff = now - self.expiry.snapshot_s
            if self.targets_dir.is_dir() and _older(current, cutoff):
                listed = set()
                for path, target in self.targets.signed.targets.items():
                    dirname, sep, basename = path.rpartition("/")
                    listed.add(f"{dirname}{sep}{target.hashes.get('sha256')}.{basename}")
                for entry in sorted(self.targets_dir.rglob("*")):
                    rel = entry.relative_to(self.targets_dir).as_posix()
                    if entry.is_file() and not entry.is_symlink() and rel not in listed \
                            and _older(entry, cutoff) and _remove(entry):
                        removed["targets"].append(rel)
                for folder in sorted((p for p in self.targets_dir.rglob("*") if p.is_dir()), reverse=True):
                    try:
                        folder.rmdir()  # only when empty
                    except OSError:
                        pass
        for kind, names in removed.items():
            for name in names:
                log_event(_log, logging.INFO, "tuf.removed", kind=kind, path=name)
        return removed


def _older(path: Path, cutoff: float) -> bool:
    """Whether `path` was last modified before `cutoff` (False when it is gone)."""
    try:
        return path.lstat().st_mtime < cutoff
    except OSError:
        return False


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            return False  # uploads/ is flat; a directory there is not ours
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        log_event(_log, logging.WARNING, "tuf.remove_failed", path=str(path), reason=str(exc))
        return False


def open_or_create(root_dir: Path, keys_dir: Path, expiry: Expiry | None = None) -> tuple[TufRepo, list[Path]]:
    """The repository in `root_dir`, created with keys in `keys_dir` when there is none (see `TufRepo.create`)."""
    if TufRepo.exists(root_dir):
        return TufRepo(root_dir, expiry), []
    return TufRepo.create(root_dir, keys_dir, expiry)
