"""The one place that turns messages into line bytes and back (swap the JSON library here)."""

from __future__ import annotations

import json
import sys
from typing import Any

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_decode = json.loads


def encode(message: dict[str, Any]) -> bytes:
    """Encode one message as compact UTF-8 JSON, without the trailing newline."""
    return _encoder.encode(message).encode("utf-8")


# Protocol v1 allows nesting up to 2048 levels: the C host's parser (jansson) accepts that much. Python's json recurses
# once per level and its default limit (1000) would refuse such frames, so every process that speaks the protocol
# (worker, endpoint, CLI) raises it here, once, to fit.
MAX_NESTING = 2048
if sys.getrecursionlimit() < MAX_NESTING + 1000:
    sys.setrecursionlimit(MAX_NESTING + 1000)


def decode(line: bytes | str) -> Any:
    """Decode one frame; raises ValueError on bad input, including nesting deeper than the recursion limit allows."""
    try:
        return _decode(line)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
