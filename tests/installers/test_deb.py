"""The .deb in a real Debian bookworm root: install with apt, check what landed, run the installed agent as the service
user against a real endpoint, upgrade keeping a modified config, remove, purge.

The root comes from debootstrap (cached outside the repository, see rootfs.py) and is copied for each run; apt runs
inside it with chroot, /proc and /dev mounted for the duration. systemd does not run in a chroot, so the maintainer
scripts take their "no systemd" path and the test starts the host itself, exactly as the unit would (same user, same
command line). The unit file is checked with `systemd-analyze verify` against the root.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rootfs
from harness import BUNDLES, AgentProc, EndpointProc, wait_for
from pyagent.cli._package import PackageSpec, build_package
from release_host import release_host

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
APT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
           "HOME": "/root"}
IDLE_SECONDS = 10


def _require_root_tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("the installer tests need root (chroot, mount): run the test command as root, as CI does")
    missing = [t for t in ("debootstrap", "chroot", "mount", "dpkg-shlibdeps") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing tools {missing}: scripts/dev.sh setup installs them")


class Root:
    """A private copy of the cached bookworm root with /proc and /dev mounted."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *cmd: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["chroot", str(self.path), *cmd], env=APT_ENV, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode} in the chroot:\n{proc.stdout[-6000:]}")
        return proc

    def file(self, path: str) -> Path:
        return self.path / path.lstrip("/")

    def stat(self, path: str) -> tuple[int, str, str]:
        """(mode bits, owner, group) with names from the root's own passwd/group files."""
        st = os.lstat(self.file(path))
        return st.st_mode & 0o7777, self.user_name(st.st_uid), self.group_name(st.st_gid)

    def _table(self, name: str) -> list[list[str]]:
        return [line.split(":") for line in self.file(f"/etc/{name}").read_text().splitlines() if line]

    def user(self, name: str) -> list[str] | None:
        return next((u for u in self._table("passwd") if u[0] == name), None)

    def user_name(self, uid: int) -> str:
        return next((u[0] for u in self._table("passwd") if int(u[2]) == uid), str(uid))

    def group_name(self, gid: int) -> str:
        return next((g[0] for g in self._table("group") if int(g[2]) == gid), str(gid))

    def installed_version(self, package: str) -> str:
        proc = self.run("dpkg-query", "-W", "-f=${db:Status-Abbrev} ${Version}", package, check=False)
        return " ".join(proc.stdout.split()) if proc.returncode == 0 else "not known to dpkg"

    def install(self, deb: Path) -> str:
        inside = f"/tmp/{deb.name}"
        shutil.copy(deb, self.file(inside))
        os.chmod(self.file(inside), 0o644)
        out = self.run("apt-get", "install", "-y", "--no-install-recommends", inside).stdout
        self.file(inside).unlink()
        return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    _require_root_tools()
    try:
        _, built = rootfs.ensure_cached_root()
    except rootfs.RootfsError as exc:
        pytest.fail(f"cannot make the Debian root: {exc}")
    base = tmp_path_factory.mktemp("debroot")
    path, copy_seconds = rootfs.copy_root(base)
    print(f"\nrootfs: debootstrap {'took %.1f s' % built if built is not None else 'cached'}, "
          f"copy {copy_seconds:.1f} s")
    try:
        with rootfs.chroot_mounts(path):
            yield Root(path)
    finally:
        rootfs.remove_root(path)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EndpointProc]:
    ep = EndpointProc(tmp_path_factory.mktemp("ep") / "endpoint", heartbeat_interval=0.5).start()
    yield ep
    ep.stop()


def _package(endpoint: EndpointProc, out: Path, version: str, fmt: str = "deb") -> Path:
    return build_package(PackageSpec(
        endpoints=[endpoint.listen], ca=endpoint.ca, token=endpoint.agent_token, labels={"env": "test"}, fmt=fmt,
        out=out, version=version, host=release_host(), bundles=[BUNDLES / "hello"]))


class InstalledAgent:
    """The installed host started in the root as the unit starts it: the service user, the packaged command line."""

    def __init__(self, root: Root, log: Path) -> None:
        user = root.user("pyagent")
        assert user is not None, "no pyagent user in the root"
        self.uid, self.gid = int(user[2]), int(user[3])
        self.root = root
        self.log_path = log
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(
                [shutil.which("chroot") or "/usr/sbin/chroot", f"--userspec={self.uid}:{self.gid}", f"--groups={self.gid}", str(root.path),
                 "/usr/lib/pyagent/bin/pyagent-host", "--config", "/etc/pyagent/agent.toml"],
                env={"PATH": "/usr/bin:/bin", "HOME": "/var/lib/pyagent", "LC_ALL": "C.UTF-8"},
                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, cwd="/")

    def agent_id(self) -> str:
        path = self.root.file("/var/lib/pyagent/agent-id")

        wait_for(lambda: path.exists() or self.proc.poll() is not None, 20, "the installed agent to write its id")
        if self.proc.poll() is not None:
            raise AssertionError(f"the installed host exited with {self.proc.returncode}:\n{self.log()}")
        return wait_for(lambda: path.read_text().strip(), 5, "a complete agent id")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pid(self) -> int:
        """The unit starts the supervisor; the worker is its child."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return wait_for(lambda: int(children.read_text().split()[0]) if children.read_text().split() else 0, 10,
                        "the supervisor to start the worker")

    def rss_kb(self) -> int:
        return _rss_kb(self.worker_pid())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective uid
    raise AssertionError(f"no Uid for pid {pid}")


@pytest.mark.timeout(900)  # a cold debootstrap (about 30 s here) runs in the fixture
def test_deb_install_run_upgrade_remove_purge(root: Root, endpoint: EndpointProc, tmp_path: Path,
                                              record_property: pytest.RecordProperty) -> None:
    deb1 = _package(endpoint, tmp_path / "v1", "0.1.0")
    deb2 = _package(endpoint, tmp_path / "v2", "0.1.1")

    # -- install: apt resolves the Debian dependencies (libpython3.11, libuv1, ...) in a root that has none of them.
    assert root.installed_version("libpython3.11") == "not known to dpkg"
    out = root.install(deb1)
    # systemd is installed in the root but not running (a chroot): enabled for the next boot, not started
    assert "systemd is not running; pyagent.service enabled, not started" in out, out
    wants = root.file("/etc/systemd/system/multi-user.target.wants/pyagent.service")
    assert os.readlink(wants) == "/lib/systemd/system/pyagent.service"
    assert root.installed_version("pyagent") == "ii 0.1.0-1"
    for lib in ("libpython3.11", "libuv1", "libssl3", "libjansson4"):
        assert root.installed_version(lib).startswith("ii "), lib

    # -- files, modes, owners
    expected = {
        "/usr/lib/pyagent/bin/pyagent-host": (0o755, "root", "root"),
        "/usr/lib/pyagent/python/pyagent/runtime/worker.py": (0o644, "root", "root"),
        "/usr/lib/pyagent/bundles/hello/bundle.toml": (0o644, "root", "root"),
        "/etc/pyagent/agent.toml": (0o640, "root", "pyagent"),
        "/etc/pyagent/ca.pem": (0o644, "root", "root"),
        "/lib/systemd/system/pyagent.service": (0o644, "root", "root"),
        "/var/lib/pyagent": (0o750, "pyagent", "pyagent"),
        "/var/log/pyagent": (0o750, "pyagent", "pyagent"),
    }
    for path, want in expected.items():
        assert root.stat(path) == want, path
    assert os.readlink(root.file("/usr/bin/pyagent-host")) == "/usr/lib/pyagent/bin/pyagent-host"
    # only the runtime, never the endpoint/CLI (they need cryptography, starlette, ...)
    assert not root.file("/usr/lib/pyagent/python/pyagent/endpoint").exists()
    assert not root.file("/usr/lib/pyagent/python/pyagent/cli").exists()
    assert root.file("/etc/pyagent/ca.pem").read_bytes() == endpoint.ca.read_bytes()
    config = root.file("/etc/pyagent/agent.toml").read_text()
    assert f'endpoints = ["{endpoint.listen}"]' in config and f'token = "{endpoint.agent_token}"' in config
    conffiles = root.file("/var/lib/dpkg/info/pyagent.conffiles").read_text().split()
    assert conffiles == ["/etc/pyagent/agent.toml", "/etc/pyagent/ca.pem"]

    # -- the user: a system account without a login shell or a home of its own
    user = root.user("pyagent")
    assert user is not None
    assert int(user[2]) < 1000 and user[5] == "/var/lib/pyagent" and user[6] == "/usr/sbin/nologin", user

    # -- the unit file, as systemd itself reads it, against the root's files
    unit = root.file("/lib/systemd/system/pyagent.service").read_text()
    for line in ("User=pyagent", "Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "ReadWritePaths=/var/lib/pyagent /var/log/pyagent",
                 "CapabilityBoundingSet=\n",
                 "ExecStart=/usr/lib/pyagent/bin/pyagent-host --config /etc/pyagent/agent.toml"):
        assert line in unit, line
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(["systemd-analyze", "verify", f"--root={root.path}", "pyagent.service"],
                                capture_output=True, text=True, timeout=60, check=False)
        assert verify.returncode == 0, verify.stderr
        security = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={root.path}",
                                   "--no-pager", "pyagent.service"],
                                  capture_output=True, text=True, timeout=60, check=False)
        exposure = security.stdout.strip().splitlines()[-1] if security.stdout.strip() else security.stderr
        record_property("systemd_exposure", exposure)
        print(f"\nsystemd-analyze security: {exposure}")
        assert security.returncode == 0 and "OK" in exposure, security.stdout[-3000:] + security.stderr

    # -- run it as the service user against the endpoint; call a bundle method through it
    installed = InstalledAgent(root, tmp_path / "installed-host.log")
    venv_agent: AgentProc | None = None
    try:
        agent_id = installed.agent_id()
        assert _uid_of(installed.proc.pid) == installed.uid  # the supervisor
        assert _uid_of(installed.worker_pid()) == installed.uid  # and the worker it started
        assert root.stat("/var/lib/pyagent/agent-id")[1] == "pyagent"
        endpoint.wait_connected(agent_id)
        assert endpoint.call(agent_id, "hello.greet", {"name": "deb"}) == {"result": "Hello, deb!"}
        record = endpoint.agent(agent_id)
        assert record is not None and record.get("labels", {}).get("env") == "test", record
        # The same bundle in the venv-built host, both idle for the same time, for the RSS comparison.
        venv_agent = AgentProc(tmp_path / "venv-agent", [endpoint], endpoint.ca, endpoint.agent_token,
                               bundles=[BUNDLES / "hello"], name="venv-agent").start()
        endpoint.wait_connected(venv_agent.agent_id)
        time.sleep(IDLE_SECONDS)
        assert venv_agent.proc is not None
        figures = {"installed_rss_kb": installed.rss_kb(), "venv_rss_kb": _rss_kb(venv_agent.proc.pid),
                   "idle_s": IDLE_SECONDS}
        record_property("rss", json.dumps(figures))
        print(f"\nrss: {json.dumps(figures)}")
    finally:
        if venv_agent is not None:
            venv_agent.stop()
        code = installed.stop()
    assert code == 0, installed.log()

    # -- upgrade with a locally modified config: the config is kept, the rest replaced
    modified = config + 'log_level = "debug"\n'
    root.file("/etc/pyagent/agent.toml").write_text(modified)
    out = root.install(deb2)
    assert root.installed_version("pyagent") == "ii 0.1.1-1"
    assert root.file("/etc/pyagent/agent.toml").read_text() == modified
    assert root.stat("/etc/pyagent/agent.toml") == (0o640, "root", "pyagent")
    assert not root.file("/etc/pyagent/agent.toml.dpkg-new").exists()
    assert root.file("/var/lib/pyagent/agent-id").read_text().strip() == agent_id  # state survives upgrades
    again = InstalledAgent(root, tmp_path / "upgraded-host.log")
    try:
        assert again.agent_id() == agent_id
        endpoint.wait_connected(agent_id)
        assert endpoint.call(agent_id, "hello.greet", {"name": "upgraded"}) == {"result": "Hello, upgraded!"}
        assert "level=debug" in again.log() or "level=DEBUG" in again.log(), again.log()[-2000:]
    finally:
        code = again.stop()
    assert code == 0, again.log()

    # -- remove: program gone, config and state kept
    root.run("apt-get", "remove", "-y", "pyagent")
    assert root.installed_version("pyagent") == "rc 0.1.1-1"
    assert not root.file("/usr/lib/pyagent").exists() and not root.file("/usr/bin/pyagent-host").exists()
    assert not root.file("/lib/systemd/system/pyagent.service").exists() and not os.path.lexists(wants)
    assert root.file("/etc/pyagent/agent.toml").read_text() == modified
    assert root.file("/var/lib/pyagent/agent-id").exists()

    # -- purge: config, state and logs gone; nothing of the package left
    root.run("apt-get", "purge", "-y", "pyagent")
    assert root.installed_version("pyagent") in ("not known to dpkg", "un ")
    for gone in ("/etc/pyagent", "/var/lib/pyagent", "/var/log/pyagent", "/usr/lib/pyagent"):
        assert not root.file(gone).exists(), gone
    assert root.user("pyagent") is not None  # kept on purpose: see installers/linux/deb/postrm


def test_packaged_tree_finds_its_runtime_beside_the_binary(tmp_path: Path, endpoint: EndpointProc) -> None:
    """Without a venv beside it the host finds its runtime in ../python (csrc/embed.c): an extracted package tree
    runs `--version`/`check-config` from any directory, with no PYAGENT_PYTHONPATH."""
    deb = _package(endpoint, tmp_path, "0.1.0")
    tree = tmp_path / "tree"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True, timeout=60)
    config = tmp_path / "agent.toml"
    config.write_text(f'endpoints = ["{endpoint.listen}"]\nca = "{endpoint.ca}"\nstate_dir = "{tmp_path / "s"}"\n'
                      f'bundles = ["{tree / "usr/lib/pyagent/bundles/hello"}"]\n')
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    proc = subprocess.run([str(tree / "usr/lib/pyagent/bin/pyagent-host"), "check-config", "--config", str(config)],
                          env=env, cwd="/", capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the same tree without its python directory cannot import the runtime: the path really comes from there
    shutil.rmtree(tree / "usr/lib/pyagent/python")
    proc = subprocess.run([str(tree / "usr/lib/pyagent/bin/pyagent-host"), "check-config", "--config", str(config)],
                          env=env, cwd="/", capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "cannot import the pyagent runtime" in proc.stderr, proc.stderr
