"""`pyagent-host enroll`: a short-lived process that enrolls the agent with its endpoint (DESIGN §2, §6).

    pyagent-host enroll --endpoint HOST:PORT --ca FILE --token TOKEN [--state-dir DIR] [--name NAME]
                        [--server-name NAME] [--timeout SECONDS]
    pyagent-host enroll --config FILE            (endpoint, ca, token, state_dir, name from the agent config)
    pyagent-host enroll --new-key --state-dir DIR (renewal: write agent.key.next, print its CSR)
    pyagent-host enroll --install --state-dir DIR (renewal: the enroll.renew result on stdin -> agent.key/crt)
    pyagent-host enroll --cert-info --state-dir DIR (write and print agent.crt.json: serial, not_before/after)

It generates the agent's private key locally (`STATE_DIR/agent.key`, mode 0600; it never leaves the machine), sends
a CSR with the enrollment token in `enroll.request` over TLS that verifies the endpoint against the pinned CA, and
writes the agent id (`STATE_DIR/agent-id`) and the client certificate (`STATE_DIR/agent.crt`) it gets back. While an
operator has not approved the agent it waits and asks again (same key, so no extra use of the token).

Renewal (`_renew.py` in the worker) runs `--new-key`, sends the CSR in `enroll.renew` over its live session, and
hands the result to `--install`, which checks it and replaces the key and the certificate. `agent.crt.json` next to
the certificate tells the worker when it expires without parsing X.509 itself.

This module imports `ssl` and `cryptography`; the long-running worker never does: it runs this as a subprocess.
The token may also come from `$PYAGENT_ENROLL_TOKEN` (keeps it out of `ps`). Exit codes: 0 enrolled, 1 failure,
2 bad usage, 3 refused by the endpoint (the message says why), 4 timed out waiting.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pyagent._files import write_atomic
from pyagent.protocol import ENROLLMENT_PENDING

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_TIMEOUT = 4

KEY_FILE = "agent.key"
CERT_FILE = "agent.crt"
NEXT_KEY_FILE = "agent.key.next"
ID_FILE = "agent-id"
CERT_INFO_FILE = "agent.crt.json"
TOKEN_ENV = "PYAGENT_ENROLL_TOKEN"
UNAUTHORIZED = -32000
MAX_REPLY_BYTES = 1 << 20
IO_TIMEOUT = 15.0
RETRY_MIN_S = 0.5
RETRY_MAX_S = 60.0

USAGE = (__doc__ or "").split("\n\n")[1] if __doc__ else "usage: pyagent-host enroll --help"


class EnrollError(Exception):
    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Pending(Exception):
    def __init__(self, message: str, agent_id: str | None, retry_after: float) -> None:
        super().__init__(message)
        self.agent_id = agent_id
        self.retry_after = retry_after


def _say(text: str) -> None:
    print(f"pyagent-host enroll: {text}", file=sys.stderr, flush=True)


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key at `path` (kept while an enrollment waits for approval), else a new EC P-256 key written 0600."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key
    key = ec.generate_private_key(ec.SECP256R1())
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> str:
    # The subject is only a hint: the endpoint chooses the agent id and every field of the certificate.
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64] or "agent")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def client_context(ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))  # the pinned CA only, never the system store
    return ctx


def exchange(host: str, port: int, server_name: str, ca: Path, method: str, params: dict[str, Any],
             timeout: float = IO_TIMEOUT) -> dict[str, Any]:
    """One request over a fresh server-authenticated TLS connection; returns the response message."""
    ctx = client_context(ca)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(json.dumps({"v": "1", "id": 1, "method": method, "params": params}).encode() + b"\n")
            buf = bytearray()
            while b"\n" not in buf:
                chunk = tls.recv(65536)
                if not chunk:
                    raise ConnectionError("the endpoint closed the connection without answering")
                buf += chunk
                if len(buf) > MAX_REPLY_BYTES:
                    raise ConnectionError(f"the endpoint's reply is over {MAX_REPLY_BYTES} bytes")
    reply = json.loads(bytes(buf).split(b"\n", 1)[0])
    if not isinstance(reply, dict):
        raise ConnectionError("the endpoint's reply is not a JSON object")
    return reply


def _check_certificate(pem: str, key: ec.EllipticCurvePrivateKey, agent_id: str) -> None:
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    if cert.public_key() != key.public_key():
        raise EnrollError("the endpoint returned a certificate for another key")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != agent_id:
        raise EnrollError("the endpoint returned a certificate for another agent id")


def cert_info(cert: x509.Certificate, received_ms: int) -> dict[str, Any]:
    """What the worker needs to schedule renewal (it never parses X.509 itself)."""
    return {"serial": format(cert.serial_number, "x"),
            "not_before": int(cert.not_valid_before_utc.timestamp() * 1000),
            "not_after": int(cert.not_valid_after_utc.timestamp() * 1000),
            "received": received_ms}


def write_cert_info(state_dir: Path, pem: str | bytes, received_ms: int | None = None) -> dict[str, Any]:
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    info = cert_info(x509.load_pem_x509_certificate(data),
                     int(time.time() * 1000) if received_ms is None else received_ms)
    write_atomic(state_dir / CERT_INFO_FILE, (json.dumps(info) + "\n").encode("ascii"), 0o644)
    return info


def enroll_once(args: dict[str, Any], key: ec.EllipticCurvePrivateKey, csr: str) -> str:
    """One `enroll.request`; returns the agent id after writing agent-id and agent.crt. Raises Pending,
    EnrollError, or OSError/ssl.SSLError/ValueError for a failed connection."""
    state_dir: Path = args["state_dir"]
    reply = exchange(args["host"], args["port"], args["server_name"], args["ca"], "enroll.request",
                     {"token": args["token"], "csr": csr, "name": args["name"]})
    error = reply.get("error")
    if isinstance(error, dict):
        code, message = error.get("code"), str(error.get("message", "no message"))
        raw_data = error.get("data")
        data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
        if code == ENROLLMENT_PENDING:
            agent_id = data.get("agent_id") if isinstance(data.get("agent_id"), str) else None
            retry = data.get("retry_after")
            raise Pending(message, agent_id, float(retry) if isinstance(retry, (int, float)) else 5.0)
        raise EnrollError(f"enrollment refused by the endpoint (code {code}): {message}",
                          EXIT_REFUSED if code == UNAUTHORIZED else EXIT_FAILURE)
    result = reply.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("agent_id"), str) \
            or not isinstance(result.get("certificate"), str):
        raise EnrollError("the endpoint's enroll.request result has no agent_id and certificate")
    agent_id = str(result["agent_id"])
    _check_certificate(result["certificate"], key, agent_id)
    write_atomic(state_dir / ID_FILE, (agent_id + "\n").encode("ascii"))
    write_atomic(state_dir / CERT_FILE, result["certificate"].encode("ascii"), 0o644)
    write_cert_info(state_dir, result["certificate"])
    return agent_id


def enroll(args: dict[str, Any]) -> int:
    state_dir: Path = args["state_dir"]
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = load_or_create_key(state_dir / KEY_FILE)
    csr = make_csr(key, args["name"])
    deadline = time.monotonic() + args["timeout"] if args["timeout"] else None
    parent = os.getppid()
    delay = RETRY_MIN_S
    announced_pending = False
    endpoint = f"{args['host']}:{args['port']}"
    while True:
        try:
            agent_id = enroll_once(args, key, csr)
        except Pending as exc:
            if exc.agent_id:
                write_atomic(state_dir / ID_FILE, (exc.agent_id + "\n").encode("ascii"))
            if not announced_pending:
                _say(f"pending: {exc}; asking again every {exc.retry_after:g} s")
                announced_pending = True
            wait = max(exc.retry_after, RETRY_MIN_S)
        except EnrollError as exc:
            _say(str(exc))
            return exc.exit_code
        except (OSError, ssl.SSLError, ValueError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason = (f"certificate verify failed: {exc.verify_message} (is the CA file the endpoint's CA, and "
                          "does its certificate name the host dialled?)")
            else:
                reason = f"{type(exc).__name__}: {exc}"
            _say(f"cannot enroll with {endpoint}: {reason}; retrying in {delay:.1f} s")
            wait = delay * (0.5 + random.random() / 2)
            delay = min(delay * 2, RETRY_MAX_S)
        else:
            _say(f"enrolled with {endpoint} as agent {agent_id}; certificate in {state_dir / CERT_FILE}")
            return EXIT_OK
        if deadline is not None and time.monotonic() + wait > deadline:
            _say(f"gave up after {args['timeout']:g} s")
            return EXIT_TIMEOUT
        end = time.monotonic() + wait
        while time.monotonic() < end:  # bounded sleep; leave when the worker that started us is gone
            if os.getppid() != parent:
                _say("the parent process is gone; stopping")
                return EXIT_FAILURE
            time.sleep(min(0.2, max(end - time.monotonic(), 0)))


def new_key(state_dir: Path) -> int:
    """Renewal: write a fresh key to agent.key.next and print its CSR on stdout (the worker sends it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(state_dir / NEXT_KEY_FILE, key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    sys.stdout.write(make_csr(key, "renewal"))
    sys.stdout.flush()
    return EXIT_OK


def install(state_dir: Path, stdin: Any) -> int:
    """Renewal: check the `enroll.renew` result (JSON on stdin) against agent.key.next and agent-id, then replace
    agent.key and agent.crt (each atomically; the key first) and agent.crt.json. Prints the new cert info."""
    try:
        result = json.loads(stdin.read(MAX_REPLY_BYTES + 1))
    except ValueError as exc:
        raise EnrollError(f"--install: the enroll.renew result on stdin is not JSON: {exc}") from None
    if not isinstance(result, dict) or not isinstance(result.get("certificate"), str) \
            or not isinstance(result.get("agent_id"), str):
        raise EnrollError("--install: the enroll.renew result has no agent_id and certificate")
    next_key = state_dir / NEXT_KEY_FILE
    if not next_key.is_file():
        raise EnrollError(f"--install: no new key ({next_key}); run --new-key first")
    key = serialization.load_pem_private_key(next_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise EnrollError(f"--install: {next_key} is not an EC key")
    try:
        current_id = (state_dir / ID_FILE).read_text().strip()
    except OSError as exc:
        raise EnrollError(f"--install: cannot read the agent id: {exc}") from None
    if result["agent_id"] != current_id:
        raise EnrollError(f"--install: the certificate is for agent {result['agent_id']}, this is {current_id}")
    try:
        _check_certificate(result["certificate"], key, current_id)
    except ValueError as exc:
        raise EnrollError(f"--install: the certificate cannot be read: {exc}") from None
    # The host reads key and certificate at each connect; the live session keeps the old ones.
    os.replace(next_key, state_dir / KEY_FILE)
    write_atomic(state_dir / CERT_FILE, result["certificate"].encode("ascii"), 0o644)
    info = write_cert_info(state_dir, result["certificate"])
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def show_cert_info(state_dir: Path) -> int:
    """Write agent.crt.json for the certificate in place (e.g. enrolled before it existed) and print it."""
    cert_path = state_dir / CERT_FILE
    try:
        pem = cert_path.read_bytes()
        mtime_ms = int(cert_path.stat().st_mtime * 1000)
    except OSError as exc:
        raise EnrollError(f"--cert-info: cannot read {cert_path}: {exc}") from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise EnrollError(f"--cert-info: {cert_path} is not a PEM certificate: {exc}") from None
    # When it was received is unknown: the file's mtime, but not before the certificate's start.
    received = max(mtime_ms, int(cert.not_valid_before_utc.timestamp() * 1000))
    info = write_cert_info(state_dir, pem, received)
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def _parse(argv: Sequence[str], environ: dict[str, str]) -> dict[str, Any]:
    opts: dict[str, str] = {}
    flags: set[str] = set()
    items = list(argv)
    i = 0
    valued = ("--endpoint", "--ca", "--token", "--state-dir", "--name", "--server-name", "--timeout", "--config")
    while i < len(items):
        arg = items[i]
        name, eq, value = arg.partition("=")
        if name in valued:
            if not eq:
                if i + 1 >= len(items):
                    raise EnrollError(f"{name} needs a value", EXIT_USAGE)
                value = items[i + 1]
                i += 1
            opts[name] = value
        elif arg in ("--new-key", "--install", "--cert-info", "-h", "--help"):
            flags.add(arg)
        else:
            raise EnrollError(f"unknown argument {arg!r}", EXIT_USAGE)
        i += 1
    if "-h" in flags or "--help" in flags:
        return {"help": True}
    for flag in ("--new-key", "--install", "--cert-info"):
        if flag in flags:
            if "--state-dir" not in opts:
                raise EnrollError(f"{flag} needs --state-dir", EXIT_USAGE)
            return {flag[2:].replace("-", "_"): True, "state_dir": Path(opts["--state-dir"])}
    args: dict[str, Any] = {}
    if "--config" in opts:
        from pyagent.runtime._config import load_config
        from pyagent.runtime._errors import ConfigError

        try:
            config = load_config(opts["--config"], environ)
        except ConfigError as exc:
            raise EnrollError(f"config error: {exc}", EXIT_USAGE) from None
        ep = config.endpoints[0]
        args.update(host=ep.host, port=ep.port, server_name=config.server_name_for(ep), ca=config.ca,
                    token=config.token, state_dir=config.state_dir, name=config.name)
    if "--endpoint" in opts:
        from pyagent.runtime._config import parse_endpoint

        try:
            ep = parse_endpoint(opts["--endpoint"])
        except ValueError as exc:
            raise EnrollError(f"--endpoint: {exc}", EXIT_USAGE) from None
        args.update(host=ep.host, port=ep.port, server_name=ep.host)
    for opt, key in (("--ca", "ca"), ("--state-dir", "state_dir")):
        if opt in opts:
            args[key] = Path(opts[opt])
    if "--name" in opts:
        args["name"] = opts["--name"]
    if "--server-name" in opts:
        args["server_name"] = opts["--server-name"]
    args["token"] = opts.get("--token") or environ.get(TOKEN_ENV) or args.get("token", "")
    args.setdefault("state_dir", Path("/var/lib/pyagent"))
    args.setdefault("name", socket.gethostname())
    try:
        args["timeout"] = float(opts.get("--timeout", "0"))
    except ValueError:
        raise EnrollError(f"--timeout must be a number of seconds, got {opts['--timeout']!r}", EXIT_USAGE) from None
    if "host" not in args:
        raise EnrollError("--endpoint HOST:PORT (or --config FILE) is required", EXIT_USAGE)
    if "ca" not in args:
        raise EnrollError("--ca FILE (the endpoint's CA certificate) is required", EXIT_USAGE)
    if not Path(args["ca"]).is_file():
        raise EnrollError(f"--ca: CA file not found: {args['ca']}", EXIT_USAGE)
    if not args["token"]:
        raise EnrollError(f"an enrollment token is required (--token, ${TOKEN_ENV}, or `token` in the config)",
                          EXIT_USAGE)
    return args


def main(argv: list[str], environ: dict[str, str] | None = None) -> int:
    """Entry point (`pyagent-host enroll ...`, argv without the program and `enroll`); returns the exit code."""
    try:
        args = _parse(argv, dict(os.environ if environ is None else environ))
        if args.get("help"):
            print(USAGE)
            return EXIT_OK
        if args.get("new_key"):
            return new_key(args["state_dir"])
        if args.get("install"):
            return install(args["state_dir"], sys.stdin)
        if args.get("cert_info"):
            return show_cert_info(args["state_dir"])
        return enroll(args)
    except EnrollError as exc:
        _say(str(exc) + ("\n" + USAGE if exc.exit_code == EXIT_USAGE else ""))
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except OSError as exc:
        _say(f"{type(exc).__name__}: {exc}")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
