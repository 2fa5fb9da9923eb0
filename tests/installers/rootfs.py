"""A minimal Debian bookworm root for installer tests, built once with debootstrap and reused.

The root is cached outside the repository (default `/var/cache/pyagent-tests/`, or `$PYAGENT_ROOTFS_CACHE`), built in a
temporary directory next to its final place and renamed into place when complete, so an interrupted build never leaves
a half root behind and two concurrent builds cannot mix. Each test run copies the cached root to a temporary directory
and works on the copy. The mirror is the one apt uses on this machine (read from /etc/apt/sources.list and
sources.list.d), so the test reaches no other host.

Run as a script to build (or time) the cache: `python tests/installers/rootfs.py [--rebuild]`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
# Bump when the recipe below changes so old caches are not reused.
RECIPE = 3
# Installed in the cached root: a Debian server has systemd (not running in a chroot), so the maintainer scripts take
# their "systemctl present, systemd not running" path and `systemd-analyze verify --root` finds the targets.
INSTALL = ["systemd"]
# Downloaded (not installed) into the cached root's apt archive, so installing the package in each test run does not
# fetch its dependencies again: the runtime libraries the host links.
PREFETCH = ["libpython3.11", "python3.11", "libuv1", "libssl3", "libjansson4"]
DEFAULT_CACHE = Path("/var/cache/pyagent-tests")


class RootfsError(Exception):
    """The root could not be built or used; the message says why (including debootstrap's own words)."""


def cache_dir() -> Path:
    return Path(os.environ.get("PYAGENT_ROOTFS_CACHE", str(DEFAULT_CACHE)))


def apt_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for the main archive (not -security/-updates)."""
    entries: list[tuple[str, list[str]]] = []  # (uri, suites)
    files = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*"))
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                    continue
                for uri in fields.get("uris", "").split():
                    entries.append((uri, fields.get("suites", "").split()))
        elif f.name.endswith(".list"):
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], [words[2]]))
    for uri, suites in entries:
        if SUITE in suites:
            return uri.rstrip("/")
    raise RootfsError(f"no apt source for the '{SUITE}' suite in {apt_dir}/sources.list(.d): cannot tell which "
                      "Debian mirror to use")


def cached_root() -> Path:
    return cache_dir() / f"{SUITE}-{VARIANT}-r{RECIPE}"


def _run(cmd: Sequence[str], what: str, timeout: float, **kw: object) -> str:
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise RootfsError(f"{what} did not finish within {timeout:.0f} s") from None
    text = out.stdout.decode(errors="replace")
    if out.returncode != 0:
        raise RootfsError(f"{what} failed (exit {out.returncode}):\n{text[-4000:]}")
    return text


def ensure_cached_root(rebuild: bool = False) -> tuple[Path, float | None]:
    """The cached root, built now if missing. Returns (path, seconds spent building or None if it was cached)."""
    final = cached_root()
    if final.is_dir() and not rebuild:
        return final, None
    if shutil.which("debootstrap") is None:
        raise RootfsError("debootstrap is not installed (scripts/dev.sh setup installs it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    started = time.monotonic()
    build = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    build.chmod(0o755)  # it becomes "/" of the root: mkdtemp's 0700 would lock every other user out
    try:
        _run(["debootstrap", f"--variant={VARIANT}", SUITE, str(build), mirror],
             f"debootstrap {SUITE} from {mirror}", timeout=1200)
        with chroot_mounts(build):
            _run(["chroot", str(build), "apt-get", "update", "-qq"], "apt-get update in the new root", timeout=600,
                 env=_apt_env())
            _run(["chroot", str(build), "apt-get", "install", "-y", "-qq", "--no-install-recommends", *INSTALL],
                 f"installing {' '.join(INSTALL)} in the new root", timeout=600, env=_apt_env())
            _run(["chroot", str(build), "apt-get", "install", "-y", "-qq", "--download-only", *PREFETCH],
                 "prefetching the runtime libraries", timeout=600, env=_apt_env())
        (build / "pyagent-rootfs.json").write_text(json.dumps(
            {"suite": SUITE, "variant": VARIANT, "mirror": mirror, "recipe": RECIPE,
             "built_seconds": round(time.monotonic() - started, 1)}) + "\n")
        if rebuild and final.exists():
            old = final.with_name(final.name + f".old-{os.getpid()}")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            build.rename(final)
        except OSError:
            if not final.is_dir():  # lost a race with another builder: theirs is as good as ours
                raise
            shutil.rmtree(build, ignore_errors=True)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    for stale in final.parent.glob(f"{SUITE}-{VARIANT}-r*"):  # roots of older recipes
        if stale.name != final.name and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return final, time.monotonic() - started


def copy_root(dest_parent: Path) -> tuple[Path, float]:
    """A private copy of the cached root under dest_parent; returns (path, seconds the copy took)."""
    src, _ = ensure_cached_root()
    dest = dest_parent / "root"
    started = time.monotonic()
    _run(["cp", "-a", "--reflink=auto", str(src), str(dest)], "copying the cached root", timeout=600)
    dest.chmod(0o755)
    return dest, time.monotonic() - started


def _apt_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8",
            "HOME": "/root"}


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[Path]:
    """/proc, /dev (and /dev/pts) mounted in root, and this machine's resolv.conf, for the duration; always unmounted,
    innermost first, even when the body fails."""
    mounted: list[Path] = []
    resolv = root / "etc" / "resolv.conf"
    try:
        for target, args in ((root / "proc", ["-t", "proc", "proc"]),
                             (root / "dev", ["--bind", "/dev"]),
                             (root / "dev" / "pts", ["--bind", "/dev/pts"])):
            target.mkdir(parents=True, exist_ok=True)
            _run(["mount", *args, str(target)], f"mount {target}", timeout=30)
            mounted.append(target)
        if Path("/etc/resolv.conf").exists():
            if resolv.is_symlink():
                resolv.unlink()
            shutil.copyfile("/etc/resolv.conf", resolv)
        yield root
    finally:
        for target in reversed(mounted):
            rc = subprocess.run(["umount", str(target)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, timeout=30, check=False).returncode
            if rc != 0:  # something still holds it (a process the test failed to stop): detach instead
                subprocess.run(["umount", "-l", str(target)], stdin=subprocess.DEVNULL, timeout=30, check=False)


def remove_root(root: Path) -> None:
    """Delete a private copy; refuses if anything is still mounted below it (it would delete the host's /dev)."""
    mounts = Path("/proc/self/mounts").read_text().split("\n")
    prefix = str(root.resolve()) + "/"
    busy = [m.split()[1] for m in mounts if m and (m.split()[1] + "/").startswith(prefix)]
    if busy:
        raise RootfsError(f"still mounted under {root}: {busy}; not deleting")
    shutil.rmtree(root, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    rebuild = "--rebuild" in argv
    try:
        path, seconds = ensure_cached_root(rebuild=rebuild)
    except RootfsError as exc:
        print(f"rootfs: {exc}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="pyagent-rootfs-") as tmp:
        _, copy_seconds = copy_root(Path(tmp))
    print(json.dumps({"root": str(path), "build_seconds": None if seconds is None else round(seconds, 1),
                      "copy_seconds": round(copy_seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
