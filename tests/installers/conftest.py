from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The integration harness (EndpointProc, wait_for) is shared by import, not copied.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python" / "integration"))

from installer_certs import make_cert  # noqa: E402


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    return make_cert(tmp_path / "ca.pem", ca=True)
