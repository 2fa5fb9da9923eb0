"""The .rpm: built by `pyagent package --format rpm` (the real command line), checked with rpm's own queries. It is
not installed anywhere here (no rpm-based root); docs/installers.md says so."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

from installer_certs import make_cert
from harness import BUNDLES
from release_host import release_host

REPO = Path(__file__).resolve().parents[2]


def _rpm(*args: str) -> str:
    proc = subprocess.run(["rpm", *args], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def rpm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rpm")
    ca = make_cert(tmp / "ca.pem", ca=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pyagent.cli", "package", "--endpoint", "ep.example:7443", "--endpoint",
         "[2001:db8::1]:7443", "--ca", str(ca), "--token", 'tok"en', "--labels", "env=prod",
         "site=par 1", "--format", "rpm", "--out", str(tmp / "out"), "--version", "1.2.3", "--host", str(release_host()),
         "--bundle", str(BUNDLES / "hello")],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path == tmp / "out" / "pyagent-1.2.3-1.x86_64.rpm" and path.is_file()
    return path


def test_rpm_contents(rpm_file: Path) -> None:
    listing = {line.split()[-1] if "->" not in line else line.split()[-3]: line.split()
               for line in _rpm("-qlvp", str(rpm_file)).splitlines()}
    assert listing["/usr/lib/pyagent/bin/pyagent-host"][0] == "-rwxr-xr-x"
    agent_toml = listing["/etc/pyagent/agent.toml"]
    assert agent_toml[0] == "-rw-r-----" and agent_toml[2:4] == ["root", "pyagent"], agent_toml
    for path in ("/etc/pyagent/ca.pem", "/usr/lib/systemd/system/pyagent.service",
                 "/usr/lib/pyagent/python/pyagent/runtime/worker.py", "/usr/lib/pyagent/bundles/hello/bundle.toml",
                 "/usr/lib/pyagent/python/pyagent/runtime/__pycache__/worker.cpython-311.pyc", "/usr/bin/pyagent-host"):
        assert path in listing, path
    assert not any(p.startswith("/usr/lib/pyagent/python/pyagent/endpoint") for p in listing)
    # config files are %config(noreplace): an upgrade keeps a modified one
    flags = dict(line.split(" ", 1)[::-1] for line in
                 _rpm("-qp", "--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\n]", str(rpm_file)).splitlines())
    assert flags["/etc/pyagent/agent.toml"] == "cn" and flags["/etc/pyagent/ca.pem"] == "cn", flags


def test_rpm_config_scripts_and_requires(rpm_file: Path, tmp_path: Path) -> None:
    scripts = _rpm("-qp", "--scripts", str(rpm_file))
    for part in ("preinstall scriptlet", "useradd --system", "postinstall scriptlet", "chown root:pyagent",
                 "preuninstall scriptlet", "disable --now pyagent.service", "postuninstall scriptlet",
                 "try-restart pyagent.service"):
        assert part in scripts, part
    requires = _rpm("-qp", "--requires", str(rpm_file)).split("\n")
    for soname in ("libpython3.11.so.1.0()(64bit)", "libuv.so.1()(64bit)", "libssl.so.3()(64bit)",
                   "libjansson.so.4()(64bit)"):
        assert soname in requires, requires
    # the config inside, as the agent will read it (rpm2archive ships with rpm; cpio may not be installed)
    with open(rpm_file, "rb") as src, open(tmp_path / "payload.tar", "wb") as dst:
        subprocess.run(["rpm2archive", "-n", "-"], stdin=src, stdout=dst, check=True, timeout=60)
    with tarfile.open(tmp_path / "payload.tar") as tar:
        member = tar.extractfile("./etc/pyagent/agent.toml")
        assert member is not None
        config = tomllib.loads(member.read().decode())
    assert config == {"endpoints": ["ep.example:7443", "[2001:db8::1]:7443"], "ca": "/etc/pyagent/ca.pem",
                      "token": 'tok"en', "state_dir": "/var/lib/pyagent",
                      "bundles": ["/usr/lib/pyagent/bundles/hello"], "labels": {"env": "prod", "site": "par 1"}}
