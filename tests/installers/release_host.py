"""A release build of pyagent-host (-DPYAGENT_RELEASE=ON: no test hooks), as `pyagent package` requires.

Built once per test run into build/release-host, incrementally, against this venv's interpreter (Debian's python3,
so the host links Debian's libpython like the .deb needs).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "build" / "release-host"


@functools.cache
def release_host() -> Path:
    for cmd in (["cmake", "-S", str(REPO), "-B", str(BUILD), "-DPYAGENT_RELEASE=ON", "-DCMAKE_BUILD_TYPE=Release",
                 f"-DPython_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(BUILD), "-j2", "--target", "pyagent-host"]):
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    host = BUILD / "csrc" / "pyagent-host"
    version = subprocess.run([str(host), "--version"], capture_output=True, text=True, check=True).stdout
    assert "[test hooks]" not in version, version
    return host
