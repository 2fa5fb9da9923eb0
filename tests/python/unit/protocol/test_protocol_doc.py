"""docs/protocol.md names every method and error code the code defines (the reference cannot drift silently)."""

from __future__ import annotations

import re
from pathlib import Path

from pyagent.protocol import ERROR_NAMES, METHODS

DOC = Path(__file__).resolve().parents[4] / "docs" / "protocol.md"
CSRC = Path(__file__).resolve().parents[4] / "csrc" / "proto.h"


def test_every_method_is_documented() -> None:
    doc = DOC.read_text()
    for method in METHODS:
        assert f"`{method}`" in doc, f"{method} is not in docs/protocol.md"


def test_every_error_code_is_documented_with_its_name() -> None:
    doc = DOC.read_text()
    for code, name in ERROR_NAMES.items():
        assert re.search(rf"^\| {code} \| {name} \|", doc, re.M), f"{code} {name} is not in the error table"


def test_c_and_python_agree_on_error_codes() -> None:
    c_codes = {int(v) for v in re.findall(r"#define PA_ERR_\w+ \((-\d+)\)", CSRC.read_text())}
    assert c_codes == set(ERROR_NAMES)
