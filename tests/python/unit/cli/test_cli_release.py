"""`pyagent release init|bundle|host|ls` against a real `pyagent endpoint serve` subprocess."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import shutil
import stat
import sys
import tarfile
from pathlib import Path

import pytest
from clihelp import REPO, ServeProc, run_cli
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile, Targets

from pyagent.cli._errors import CliError
from pyagent.cli._release import bundle_archive, check_signed_by


def copy_bundle(tmp_path: Path, version: str = "1.0.0") -> Path:
    dest = tmp_path / f"hello-{version}"
    shutil.copytree(REPO / "bundles" / "hello", dest, ignore=shutil.ignore_patterns("__pycache__"))
    toml = dest / "bundle.toml"
    toml.write_text(toml.read_text().replace('version = "1.0.0"', f'version = "{version}"'))
    return dest


def test_bundle_archive_is_deterministic(tmp_path: Path) -> None:
    bundle = copy_bundle(tmp_path)
    (bundle / "a_first.txt").write_text("sorted before bundle.toml by name")
    name, version, first = bundle_archive(bundle)
    (bundle / "__pycache__").mkdir(exist_ok=True)
    (bundle / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    for path in bundle.rglob("*"):
        path.touch()  # new mtimes change nothing
    assert bundle_archive(bundle) == (name, version, first) and (name, version) == ("hello", "1.0.0")
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["bundle.toml", "a_first.txt"]
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and "__pycache__" not in m.name for m in members)
    assert gzip.decompress(first)  # a plain gzip stream
    assert first[4:8] == b"\0\0\0\0"  # gzip header mtime 0


def test_release_bundle_host_ls_and_refusals(tmp_path: Path) -> None:
    serve = ServeProc(tmp_path / "state").start()
    state = tmp_path / "state"
    try:
        assert "event=tuf.created" in serve.stderr() and "offline" in serve.stderr()
        result = run_cli("release", "ls", "--state-dir", state)
        assert result.returncode == 0 and "no releases" in result.stdout

        result = run_cli("release", "bundle", copy_bundle(tmp_path), "--state-dir", state)
        assert result.returncode == 0, result.stderr
        assert "released bundle hello 1.0.0: bundles/hello/1.0.0.tar.gz (targets version 2)" in result.stdout
        again = run_cli("release", "bundle", copy_bundle(tmp_path / "again"), "--state-dir", state)
        assert again.returncode == 0 and "released already" in again.stdout

        changed = copy_bundle(tmp_path / "changed")
        (changed / "extra.txt").write_text("other contents, same version")
        result = run_cli("release", "bundle", changed, "--state-dir", state)
        assert result.returncode == 1 and "released already with other contents" in result.stderr

        # The host: the real pyagent-host says its version; a wrong --version is refused before any upload.
        host = shutil.which("pyagent-host") or str(Path(sys.executable).parent / "pyagent-host")
        said = run_cli_host_version(host)
        result = run_cli("release", "host", host, "--platform", "linux-x86_64", "--version", "9.9.9",
                         "--state-dir", state)
        assert result.returncode == 2 and "does not contain 9.9.9" in result.stderr
        result = run_cli("release", "host", host, "--platform", "linux-x86_64", "--version", said,
                         "--state-dir", state)
        assert result.returncode == 0, result.stderr
        # A binary for another platform cannot run here: its version cannot be checked, it is released.
        other = tmp_path / "pyagent-host-arm"
        other.write_bytes(b"\x7fELF not for this machine")
        other.chmod(0o755)
        result = run_cli("release", "host", other, "--platform", "linux-aarch64", "--version", "0.3.0",
                         "--state-dir", state)
        assert result.returncode == 0, result.stderr
        result = run_cli("release", "host", other, "--platform", "Linux x86", "--version", "0.3.0",
                         "--state-dir", state)
        assert result.returncode == 2 and "bad --platform" in result.stderr

        listed = json.loads(run_cli("release", "ls", "--json", "--state-dir", state).stdout)
        assert listed["version"] == 4
        assert [t["path"] for t in listed["targets"]] == [
            "bundles/hello/1.0.0.tar.gz", "hosts/linux-aarch64/0.3.0/pyagent-host",
            f"hosts/linux-x86_64/{said}/pyagent-host"]
        assert listed["targets"][0]["length"] == len(bundle_archive(copy_bundle(tmp_path / "x"))[2])
        table = run_cli("release", "ls", "--state-dir", state).stdout
        assert "bundles/hello/1.0.0.tar.gz" in table and "linux-aarch64" in table

        # Keys that are not the repository's: refused, naming the problem (the endpoint would refuse too, HTTP 403).
        other_keys = tmp_path / "other-keys"
        assert run_cli("release", "init", "--keys", other_keys, "--state-dir", tmp_path / "scratch").returncode == 0
        result = run_cli("release", "bundle", copy_bundle(tmp_path / "v2", "2.0.0"), "--keys", other_keys,
                         "--state-dir", state)
        # Refused before anything is uploaded: the endpoint's targets.json is not signed by these keys.
        assert result.returncode == 1 and "not signed by the targets key" in result.stderr, result.stderr
        result = run_cli("release", "bundle", copy_bundle(tmp_path / "v3", "2.0.0"), "--keys", tmp_path / "none",
                         "--state-dir", state)
        assert result.returncode == 2 and "targets.key" in result.stderr
    finally:
        serve.stop()


def run_cli_host_version(host: str) -> str:
    import subprocess

    out = subprocess.run([host, "--version"], capture_output=True, text=True, timeout=10).stdout.split()
    return next(word for word in out if word[:1].isdigit())


def test_release_init_keeps_keys_where_told(tmp_path: Path) -> None:
    keys, state = tmp_path / "offline", tmp_path / "state"
    result = run_cli("release", "init", "--keys", keys, "--state-dir", state)
    assert result.returncode == 0, result.stderr
    assert f"new key: {keys / 'root.key'}" in result.stdout
    for name in ("root.key", "targets.key"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    assert not (state / "tuf-keys").exists()
    again = run_cli("release", "init", "--keys", keys, "--state-dir", state)
    assert again.returncode == 2 and "exists already" in again.stderr
    serve = ServeProc(state).start()  # the endpoint uses that repository, makes no keys of its own
    try:
        assert "event=tuf.created" not in serve.stderr() and not (state / "tuf-keys").exists()
        result = run_cli("release", "bundle", copy_bundle(tmp_path), "--keys", keys, "--state-dir", state)
        assert result.returncode == 0, result.stderr
    finally:
        serve.stop()


def test_release_refuses_to_sign_targets_it_did_not_sign() -> None:
    """A compromised endpoint must not get entries of its own signed with the offline targets key: the release
    command builds only on a targets document that carries a valid signature of that key."""
    ours, theirs = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    md = Metadata(Targets(version=3, expires=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=1)))
    md.sign(ours)
    check_signed_by(md, ours)  # ours, unchanged: fine
    slipped = Metadata.from_bytes(md.to_bytes())
    slipped.signed.targets["hosts/linux-x86_64/6.6.6/pyagent-host"] = TargetFile.from_data(
        "hosts/linux-x86_64/6.6.6/pyagent-host", b"evil")
    with pytest.raises(CliError, match="not signed by the targets key"):
        check_signed_by(slipped, ours)  # an entry added after our signature
    other = Metadata.from_bytes(md.to_bytes())
    other.signatures.clear()
    other.sign(theirs)
    with pytest.raises(CliError, match="no signature by this key"):
        check_signed_by(other, ours)
