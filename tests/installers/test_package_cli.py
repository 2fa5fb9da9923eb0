"""`pyagent package` refuses what it cannot package correctly, with a message naming the problem."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import BUNDLES
from installer_certs import make_cert
from release_host import release_host

REPO = Path(__file__).resolve().parents[2]
VENV_HOST = Path(sys.executable).parent / "pyagent-host"  # a development build: it has test hooks


def package(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyagent.cli", "package", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=REPO, env=env)


def base_args(ca: Path, out: Path) -> list[str]:
    return ["--endpoint", "127.0.0.1:7443", "--ca", str(ca), "--format", "deb", "--out", str(out),
            "--host", str(release_host()), "--bundle", str(BUNDLES / "hello")]


@pytest.mark.parametrize(("extra", "message"), [
    (["--labels", "novalue"], "--labels: expected KEY=VALUE, got 'novalue'"),
    (["--labels", "a=1", "a=2"], "label 'a' given twice"),
    (["--labels", "bad key=1"], "label name 'bad key'"),
    (["--version", "1.0-beta"], "--version '1.0-beta'"),
    (["--endpoint", "no-port"], "the agent would refuse this config"),
    (["--bundle", "/nonexistent"], "--bundle /nonexistent: not a bundle directory"),
    (["--host", "/nonexistent/pyagent-host"], "--host /nonexistent/pyagent-host: not an executable file"),
    (["--host", "{script}"], "is not an ELF executable"),
])
def test_bad_arguments(ca_file: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    script = tmp_path / "pyagent-host"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    extra = [a.format(script=script) for a in extra]
    proc = package(*base_args(ca_file, tmp_path / "out"), *extra)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not list((tmp_path / "out").glob("*.deb"))


def test_bad_ca(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    proc = package(*base_args(tmp_path / "junk.pem", tmp_path / "out"))
    assert proc.returncode == 2 and "not a PEM certificate file" in proc.stderr, proc.stderr
    leaf = make_cert(tmp_path / "leaf.pem", ca=False)
    proc = package(*base_args(leaf, tmp_path / "out"))
    assert proc.returncode == 2 and "no CA certificate in it" in proc.stderr, proc.stderr
    proc = package(*base_args(tmp_path / "missing.pem", tmp_path / "out"))
    assert proc.returncode == 2 and "No such file or directory" in proc.stderr, proc.stderr


def test_refuses_a_host_linked_to_another_libpython(ca_file: Path, tmp_path: Path) -> None:
    """The same host, made by the dynamic linker to load a libpython that no Debian package owns (as a host built
    against pyenv's or a venv from /usr/local would), is refused: the .deb would depend on the wrong library."""
    import os

    system_lib = next(Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib")
                      if (Path(p) / "libpython3.11.so.1.0").exists())
    private = tmp_path / "otherpython" / "lib"
    private.mkdir(parents=True)
    shutil.copy(system_lib / "libpython3.11.so.1.0", private)
    env = dict(os.environ, LD_LIBRARY_PATH=str(private))
    proc = package(*base_args(ca_file, tmp_path / "out"), env=env)
    assert proc.returncode == 1, proc.stderr
    assert f"pyagent-host links {private}/libpython3.11.so.1.0" in proc.stderr, proc.stderr
    assert "Debian's libpython3.11" in proc.stderr or "distribution's libpython3.11" in proc.stderr, proc.stderr
    assert not list((tmp_path / "out").glob("*.deb"))


def test_deb_metadata(ca_file: Path, tmp_path: Path) -> None:
    proc = package(*base_args(ca_file, tmp_path / "out"), "--version", "2.0.1", "--token", "t0k")
    assert proc.returncode == 0, proc.stderr
    deb = Path(proc.stdout.strip())
    assert deb == tmp_path / "out" / "pyagent_2.0.1-1_amd64.deb"
    fields = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends", "Version", "Architecture"], capture_output=True,
                            text=True, check=True, timeout=30).stdout
    depends = [d.split()[0] for d in fields.split("Depends:", 1)[1].split("\n", 1)[0].split(",")]
    assert {"libpython3.11", "python3.11", "libuv1", "libssl3", "libjansson4", "libc6"} <= set(depends), depends
    assert "Version: 2.0.1-1" in fields and "Architecture: amd64" in fields


def test_refuses_a_host_with_test_hooks(ca_file: Path, tmp_path: Path) -> None:
    """An installed agent must not be crashable on purpose: the development build (test hooks) is refused unless the
    operator says it is a test package."""
    assert "[test hooks]" in subprocess.run([str(VENV_HOST), "--version"], capture_output=True, text=True).stdout
    args = [a if a != str(release_host()) else str(VENV_HOST) for a in base_args(ca_file, tmp_path / "out")]
    refused = package(*args)
    assert refused.returncode != 0
    assert "built with test hooks" in refused.stderr and "PYAGENT_RELEASE=ON" in refused.stderr
    assert not list((tmp_path / "out").glob("*.deb"))
    allowed = package(*args, "--allow-test-hooks")
    assert allowed.returncode == 0, allowed.stderr
    assert list((tmp_path / "out").glob("*.deb"))
