"""Definitions for the OSes this machine cannot run: the MSI source builds with wixl (with a stand-in for the Windows
host binary, which does not exist yet), the launchd plist parses and names what the pkg installs, and every
maintainer script is valid sh. None of this installs anything: see docs/installers.md."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
from pathlib import Path

import pytest

from installer_certs import make_cert

REPO = Path(__file__).resolve().parents[2]
INSTALLERS = REPO / "installers"


def _msi_table(msi: Path, table: str) -> list[list[str]]:
    out = subprocess.run(["msiinfo", "export", str(msi), table], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return [line.split("\t") for line in out.splitlines()[3:]]  # after the column names, types and table name


def test_wxs_builds_an_msi_with_wixl(tmp_path: Path) -> None:
    if shutil.which("wixl") is None or shutil.which("wixl-heat") is None:
        pytest.fail("wixl is not installed (Debian package wixl; scripts/dev.sh setup installs it)")
    stage = tmp_path / "stage"
    (stage / "bin").mkdir(parents=True)
    (stage / "bin" / "pyagent-host.exe").write_bytes(b"MZ stand-in: no Windows host yet\n")
    make_cert(stage / "ca.pem", ca=True)
    (stage / "agent.toml").write_text('endpoints = ["ep.example:7443"]\nca = "ca.pem"\n')
    runtime = stage / "runtime"
    shutil.copytree(REPO / "pyagent" / "runtime", runtime / "python" / "pyagent" / "runtime",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "bundles" / "hello", runtime / "bundles" / "hello",
                    ignore=shutil.ignore_patterns("__pycache__"))
    files = "".join(f"./{p.relative_to(runtime).as_posix()}\n" for p in sorted(runtime.rglob("*")) if p.is_file())
    heat = subprocess.run(["wixl-heat", "-p", "./", "--directory-ref", "INSTALLDIR", "--component-group",
                           "RuntimeFiles", "--var", "var.RuntimeDir", "--win64"],
                          input=files, capture_output=True, text=True, check=True, timeout=60, cwd=runtime)
    (tmp_path / "runtime.wxs").write_text(heat.stdout)
    shutil.copy(INSTALLERS / "windows" / "pyagent.wxs", tmp_path)
    # wixl resolves File/@Source relative to the working directory and refuses absolute ones
    build = subprocess.run(["wixl", "-a", "x64", "-D", "Version=0.1.0", "-D", "Win64=yes", "-D", "SourceDir=stage",
                            "-D", "RuntimeDir=stage/runtime", "-o", "pyagent.msi", "pyagent.wxs", "runtime.wxs"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    msi = tmp_path / "pyagent.msi"
    assert build.returncode == 0 and msi.is_file(), build.stderr
    service = _msi_table(msi, "ServiceInstall")
    assert len(service) == 1, service
    assert service[0][1] == "pyagent" and service[0][8] == "NT AUTHORITY\\LocalService", service
    assert "[CommonAppDataFolder]pyagent\\agent.toml" in service[0][10]
    names = {row[2] for row in _msi_table(msi, "File")}
    assert {"pyagent-host.exe", "agent.toml", "ca.pem", "worker.py", "bundle.toml"} <= names, names
    controls = _msi_table(msi, "ServiceControl")
    assert controls and controls[0][1] == "pyagent", controls


def test_launchd_plist() -> None:
    with open(INSTALLERS / "macos" / "com.pyagent.agent.plist", "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "com.pyagent.agent"
    assert plist["UserName"] == "_pyagent" and plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"] == ["/usr/local/pyagent/bin/pyagent-host", "--config",
                                         "/Library/Application Support/pyagent/agent.toml"]
    build = (INSTALLERS / "macos" / "build-pkg.sh").read_text()
    assert '"$root/usr/local/pyagent/"' in build and "com.pyagent.agent.plist" in build
    post = (INSTALLERS / "macos" / "scripts" / "postinstall").read_text()
    assert "launchctl bootstrap system /Library/LaunchDaemons/com.pyagent.agent.plist" in post


@pytest.mark.parametrize("script", sorted(
    str(p.relative_to(INSTALLERS)) for p in
    [*(INSTALLERS / "linux").glob("*/*"), *(INSTALLERS / "macos" / "scripts").glob("*"),
     INSTALLERS / "macos" / "build-pkg.sh"]))
def test_scripts_are_valid_sh(script: str) -> None:
    path = INSTALLERS / script
    assert path.read_text().startswith("#!/bin/sh\n"), "maintainer scripts run under /bin/sh"
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    proc = subprocess.run(["sh", "-n", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
