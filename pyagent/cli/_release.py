"""`pyagent release init|bundle|host|ls`: publish bundles and host binaries in the endpoint's TUF repository.

`init` creates the repository on disk (before the endpoint first starts), with the root and targets keys in a
directory the operator keeps (offline). `bundle` and `host` run wherever that directory is: they fetch the current
targets metadata through the operator API, upload the file, sign the next targets version with `KEYS/targets.key`
and post it; the endpoint verifies it against its trusted root and writes snapshot and timestamp
(docs/updates.md §1).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import io
import json
import re
import subprocess
import tarfile
import tomllib
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyagent._updatenames import HOST_NAME, bundle_name_problem, version_problem
from pyagent.cli._client import ApiClient, default_state_dir, find_api
from pyagent.cli._errors import EXIT_OK, CliError, UsageError
from pyagent.cli._format import table

if TYPE_CHECKING:
    from securesystemslib.signer import Signer
    from tuf.api.metadata import Metadata, Targets

_PLATFORM = re.compile(r"[a-z0-9_]+-[a-z0-9_]+\Z")
VERSION_TIMEOUT = 10.0
UPLOAD_TIMEOUT = 600.0


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or default_state_dir()).expanduser()


def _keys_dir(args: argparse.Namespace) -> Path:
    return Path(args.keys).expanduser() if args.keys else _state_dir(args) / "tuf-keys"


def _checked(problem_of: Callable[[object], str | None], what: str, value: Any) -> str:
    problem = problem_of(value)
    if problem is not None:
        raise UsageError(f"{what}: {problem}")
    return str(value)


# -- the bundle archive ---------------------------------------------------------------------------------------


def bundle_archive(directory: Path) -> tuple[str, str, bytes]:
    """(name, version, archive) of a bundle directory: a gzip'd tar of its files, `bundle.toml` at the top, sorted,
    mtime 0, owner 0, no `__pycache__`; the same directory always gives the same bytes."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a bundle directory")
    try:
        doc = tomllib.loads((directory / "bundle.toml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{directory} has no bundle.toml") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read {directory / 'bundle.toml'}: {exc}") from None
    name = _checked(bundle_name_problem, "bundle.toml: name", doc.get("name"))
    version = _checked(version_problem, "bundle.toml: version", doc.get("version"))
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # Sorted, bundle.toml first (a reader finds the name and version without reading the rest).
            for path in sorted(directory.rglob("*"), key=lambda p: (p.name != "bundle.toml" or p.parent != directory,
                                                                    p.relative_to(directory).as_posix())):
                rel = path.relative_to(directory)
                if "__pycache__" in rel.parts or path.suffix == ".pyc":
                    continue
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    raise UsageError(f"{path}: bundles hold regular files and directories only")
                info = tarfile.TarInfo(rel.as_posix())
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if path.is_dir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    data = path.read_bytes()
                    info.size = len(data)
                    info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                    tar.addfile(info, io.BytesIO(data))
    return name, version, raw.getvalue()


# -- publishing -------------------------------------------------------------------------------------------------


def publish(client: ApiClient, keys_dir: Path, path: str, data: bytes, custom: dict[str, Any]) -> dict[str, Any]:
    """Upload `data` as target `path` and post the next targets version, signed with KEYS/targets.key. Returns the
    endpoint's reply, or {"unchanged": True} when the same bytes are released under that path already."""
    from tuf.api.metadata import Metadata, TargetFile, Targets

    from pyagent.endpoint._tufrepo import RepoError, load_signer

    try:
        signer = load_signer(keys_dir / "targets.key")
    except RepoError as exc:
        raise UsageError(f"{exc} (pass --keys DIR: the directory with targets.key)") from None
    summary = client.get("/api/v1/releases")
    current: Metadata[Targets] = Metadata.from_dict(client.get("/api/v1/releases/metadata/targets.json"))
    check_signed_by(current, signer)
    target = TargetFile.from_data(path, data, ["sha256"])
    target.unrecognized_fields["custom"] = {"pyagent": custom}
    old = current.signed.targets.get(path)
    if old is not None:
        if old.hashes == target.hashes and old.length == target.length:
            return {"unchanged": True, "version": current.signed.version}
        raise CliError(f"{path} is released already with other contents; release a new version instead")
    client._request("PUT", "/api/v1/releases/targets/" + urllib.parse.quote(path), data, UPLOAD_TIMEOUT)
    current.signed.targets[path] = target
    current.signed.version += 1
    current.signed.expires = (dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
                              + dt.timedelta(seconds=float(summary.get("targets_expiry_s", 90 * 86400))))
    current.signatures.clear()
    current.sign(signer)
    reply: dict[str, Any] = client._request("POST", "/api/v1/releases/targets", current.to_bytes(), UPLOAD_TIMEOUT)
    return reply


def check_signed_by(current: Metadata[Targets], signer: Signer) -> None:
    """Refuse to build on a targets document the endpoint sent unless it carries a valid signature of this very key:
    the new version is signed over everything it lists, so a compromised endpoint must not slip entries in."""
    from securesystemslib.exceptions import UnverifiedSignatureError
    from tuf.api.serialization.json import CanonicalJSONSerializer

    key = signer.public_key
    signature = current.signatures.get(key.keyid)
    try:
        if signature is None:
            raise UnverifiedSignatureError("no signature by this key")
        key.verify_signature(signature, CanonicalJSONSerializer().serialize(current.signed))
    except UnverifiedSignatureError as exc:
        raise CliError(f"refusing to sign: the endpoint's targets.json (version {current.signed.version}) is not "
                       f"signed by the targets key {key.keyid[:12]}… ({exc}); was it changed on the endpoint, or "
                       "is this the wrong --keys directory?") from None


def _report(args: argparse.Namespace, what: str, path: str, reply: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps({"path": path, **reply}, indent=2))
    elif reply.get("unchanged"):
        print(f"{what} is released already ({path}, targets version {reply['version']})")
    else:
        print(f"released {what}: {path} (targets version {reply['version']})")
    return EXIT_OK


def run_release_bundle(args: argparse.Namespace) -> int:
    name, version, archive = bundle_archive(Path(args.path))
    path = f"bundles/{name}/{version}.tar.gz"
    client = ApiClient(find_api(args.state_dir, args.api))
    reply = publish(client, _keys_dir(args), path, archive, {"kind": "bundle", "name": name, "version": version})
    return _report(args, f"bundle {name} {version}", path, reply)


def run_release_host(args: argparse.Namespace) -> int:
    binary = Path(args.binary)
    version = _checked(version_problem, "--version", args.version)
    if not _PLATFORM.match(args.platform):
        raise UsageError(f"bad --platform {args.platform!r}: <system>-<machine> in lower case, e.g. linux-x86_64")
    try:
        data = binary.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {binary}: {exc.strerror or exc}") from None
    try:
        out = subprocess.run([str(binary.resolve()), "--version"], capture_output=True, text=True, errors="replace",
                             timeout=VERSION_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        out = None  # built for another platform (or not executable here): its version cannot be checked here
    if out is not None and version not in out.stdout + out.stderr:
        raise UsageError(f"{binary} --version says {(out.stdout + out.stderr).strip()[:200]!r}, which does not "
                         f"contain {version}")
    path = f"hosts/{args.platform}/{version}/pyagent-host"
    client = ApiClient(find_api(args.state_dir, args.api))
    reply = publish(client, _keys_dir(args), path, data,
                    {"kind": "host", "platform": args.platform, "version": version})
    return _report(args, f"host {version} for {args.platform}", path, reply)


def run_release_init(args: argparse.Namespace) -> int:
    from pyagent.endpoint._tufrepo import RepoError, TufRepo

    state = _state_dir(args)
    keys = _keys_dir(args)
    try:
        repo, made = TufRepo.create(state / "tuf", keys)
    except RepoError as exc:
        raise UsageError(str(exc)) from None
    print(f"created the TUF repository in {repo.dir} (root version {repo.root.signed.version})")
    for path in made:
        print(f"new key: {path}")
    print(f"keep {keys / 'root.key'} and {keys / 'targets.key'} offline; release with --keys {keys}")
    return EXIT_OK


def run_release_ls(args: argparse.Namespace) -> int:
    summary = ApiClient(find_api(args.state_dir, args.api)).get("/api/v1/releases")
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    targets = summary.get("targets", [])
    if not targets:
        print(f"no releases (targets version {summary.get('version')}); publish one with `pyagent release bundle`")
        return EXIT_OK
    rows = [[t["path"], str(t.get("kind") or "-"), str(t.get("name") or (HOST_NAME if t.get("kind") == "host"
                                                                         else "-")),
             str(t.get("version") or "-"), str(t.get("platform") or "-"), str(t["length"]),
             str(t["hashes"].get("sha256", ""))[:12]] for t in targets]
    print(table(["PATH", "KIND", "NAME", "VERSION", "PLATFORM", "BYTES", "SHA256"], rows))
    print(f"targets version {summary.get('version')}, expires {summary.get('expires')}")
    return EXIT_OK


def add_release_commands(commands: Any, client: argparse.ArgumentParser) -> None:
    release = commands.add_parser("release", help="publish bundles and host binaries (TUF repository)")
    sub = release.add_subparsers(dest="release_command", metavar="COMMAND", required=True)
    keys_help = "directory with root.key and targets.key (default: STATE_DIR/tuf-keys)"
    init = sub.add_parser("init", parents=[client], help="create the TUF repository in the state directory")
    init.add_argument("--keys", metavar="DIR", help=keys_help + "; keys missing there are made")
    init.set_defaults(handler=run_release_init)
    bundle = sub.add_parser("bundle", parents=[client], help="publish a bundle directory (name and version from "
                            "its bundle.toml)")
    bundle.add_argument("path", metavar="PATH")
    bundle.add_argument("--keys", metavar="DIR", help=keys_help)
    bundle.add_argument("--json", action="store_true")
    bundle.set_defaults(handler=run_release_bundle)
    host = sub.add_parser("host", parents=[client], help="publish a pyagent-host binary for one platform")
    host.add_argument("binary", metavar="BINARY")
    host.add_argument("--platform", required=True, metavar="P", help="<system>-<machine>, e.g. linux-x86_64")
    host.add_argument("--version", required=True, metavar="V", help="must appear in `BINARY --version` when the "
                      "binary runs here")
    host.add_argument("--keys", metavar="DIR", help=keys_help)
    host.add_argument("--json", action="store_true")
    host.set_defaults(handler=run_release_host)
    ls = sub.add_parser("ls", parents=[client], help="list the released targets")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(handler=run_release_ls)
