"""The updater task (`pyagent-host update`) lives no longer than the process that started it (csrc/main.c:
PR_SET_PDEATHSIG): an updater left behind by a SIGKILLed worker could otherwise stage an update under the next
worker. The updater here is blocked on an endpoint that accepts TCP connections and never answers (the kernel
completes the connection; nothing reads it, so the TLS handshake waits for its 30 s socket timeout)."""

from __future__ import annotations

import datetime as dt
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from harness import alive, host_binary, stop_process, wait_for
from pyagent.endpoint import _pki

pytestmark = pytest.mark.integration

# The parent: starts the updater with the arguments it is given, writes its pid, and waits for it.
PARENT = ("import subprocess, sys\n"
          "child = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)\n"
          "with open(sys.argv[1] + '.tmp', 'w') as f:\n"
          "    f.write(str(child.pid))\n"
          "import os\n"
          "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
          "child.wait()\n")


@pytest.fixture
def silent() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 that never accepts: connections complete, nothing answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield sock
    finally:
        sock.close()


def test_updater_exits_when_its_parent_is_killed(tmp_path: Path, silent: socket.socket) -> None:
    ca = _pki.create_ca()
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    state = tmp_path / "state"
    state.mkdir()
    # An enrolled agent's certificate: without one the updater gives up before its TLS handshake.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    client = _pki.KeyPair(key, _pki.issue_client_cert(ca, csr, "agent-1", dt.timedelta(days=1)))
    (state / "agent.crt").write_bytes(client.cert_pem())
    (state / "agent.key").write_bytes(client.key_pem())
    config = tmp_path / "agent.toml"
    config.write_text(f'endpoints = ["127.0.0.1:{silent.getsockname()[1]}"]\nca = "{tmp_path / "ca.pem"}"\n'
                      f'state_dir = "{state}"\n')
    pidfile = tmp_path / "updater.pid"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(pidfile), host_binary(), "update", "--config", str(config), "--kind",
         "bundle", "--name", "hello", "--version", "1.1.0", "--target", "bundles/hello/1.1.0.tar.gz"],
        stdin=subprocess.DEVNULL)
    updater = 0
    try:
        updater = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 30, "the updater's pid"))
        # Its connection is pending on the listening socket: the updater is waiting for a TLS handshake.
        readable, _, _ = select.select([silent], [], [], 60)
        assert readable, "the updater never connected to the endpoint"
        time.sleep(1)  # still waiting: the updater does not end on its own meanwhile
        assert alive(updater) and parent.poll() is None
        parent.kill()
        parent.wait(5)
        # Without PR_SET_PDEATHSIG it would wait out its 30 s socket timeout (and then stage what it could).
        wait_for(lambda: not alive(updater), 5, "the updater to exit after its parent was killed")
    finally:
        stop_process(parent, signal.SIGKILL, 5)
        if updater and alive(updater):
            os.kill(updater, signal.SIGKILL)


def test_updater_still_runs_to_its_end_with_a_live_parent(tmp_path: Path) -> None:
    """The parent check does not get in the way of an ordinary run: a usage error still gets its clear message and
    exit code 2 from the updater itself, and a bad config its `failed` line."""
    proc = subprocess.run([host_binary(), "update", "--config", str(tmp_path / "missing.toml"), "--kind", "bundle",
                           "--name", "hello", "--version", "1.1.0", "--target", "x"], capture_output=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert b'"state": "failed"' in proc.stdout and b"config error" in proc.stdout
    proc = subprocess.run([host_binary(), "update", "--kind", "bundle"], capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and b"pyagent-host update:" in proc.stderr
    assert b"is gone" not in proc.stderr
