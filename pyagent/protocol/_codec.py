"""The one place that turns messages into line bytes and back (swap the JSON library here)."""

from __future__ import annotations

import json
from typing import Any

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decode = json.loads


def encode(message: dict[str, Any]) -> bytes:
    """Encode one message as compact UTF-8 JSON, without the trailing newline."""
    return _encoder.encode(message).encode("utf-8")


def decode(line: bytes | str) -> Any:
    """Decode one frame; raises ValueError (json.JSONDecodeError or UnicodeDecodeError) on bad input."""
    return _decode(line)
