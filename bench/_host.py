"""The `pyagent-host` the benchmarks run: the one installed next to this Python (scripts/dev.sh setup builds it)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def host_binary() -> str:
    found = shutil.which("pyagent-host") or str(Path(sys.executable).parent / "pyagent-host")
    if not os.access(found, os.X_OK):
        sys.exit("bench: pyagent-host not found; run scripts/dev.sh setup first")
    return found
