"""Enrollment and operator tokens: generation, hashing, and the small text formats the CLI accepts.

A token is `<kind>_<secret>` where the secret is 32 random bytes (URL-safe base64). Only its SHA-256 is stored: the
secret has 256 bits of entropy, so a fast hash is enough (no password-style KDF needed) and a stolen database does not
give working tokens. Each token also has a short public id, shown by `ls` and used by `revoke`; it is not secret.
"""

from __future__ import annotations

import hashlib
import re
import secrets

ENROLL_PREFIX = "pae"
OPERATOR_PREFIX = "pao"
SCOPES = ("read", "call", "admin")
MAX_LABELS = 64
MAX_LABEL_CHARS = 256
MAX_DURATION_S = 10 * 365 * 86400

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([0-9]+)([smhdw])", re.ASCII)
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*")


class TokenFormatError(ValueError):
    """A token, duration, label or scope given as text is malformed; the message names the problem."""


def new_token(prefix: str) -> tuple[str, str, str]:
    """A fresh token: (token text to hand out once, its public id, the hash to store)."""
    token = f"{prefix}_{secrets.token_urlsafe(32)}"
    return token, secrets.token_hex(6), hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_duration(text: str) -> int:
    """`90`, `30s`, `15m`, `2h`, `7d`, `1w`, `1h30m` -> seconds (positive, at most ten years)."""
    if not isinstance(text, str):
        raise TokenFormatError(f"duration must be a string, got {type(text).__name__}")
    value = text.strip().lower()
    if not value:
        raise TokenFormatError("empty duration (expected e.g. 30m, 2h, 7d)")
    if value.isascii() and value.isdigit():  # str.isdigit() is also true of '¹', which int() refuses
        total = int(value)
    else:
        pos = 0
        total = 0
        for match in _DURATION_RE.finditer(value):
            if match.start() != pos:
                break
            total += int(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(value) or pos == 0:
            raise TokenFormatError(f"bad duration {text!r}: expected a number of seconds or e.g. 30m, 2h, 7d, 1h30m")
    if total <= 0:
        raise TokenFormatError(f"bad duration {text!r}: must be more than zero")
    if total > MAX_DURATION_S:
        raise TokenFormatError(f"bad duration {text!r}: more than ten years")
    return total


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` -> (key, value); the key starts with a letter or digit, the value may be empty."""
    key, eq, value = text.partition("=")
    if not eq:
        raise TokenFormatError(f"bad label {text!r}: expected key=value")
    if not _LABEL_KEY_RE.fullmatch(key) or len(key) > MAX_LABEL_CHARS:
        raise TokenFormatError(f"bad label {text!r}: the key must be letters, digits, '_', '.', '-', '/' "
                               f"(at most {MAX_LABEL_CHARS} characters)")
    if len(value) > MAX_LABEL_CHARS or not value.isprintable():
        raise TokenFormatError(f"bad label {text!r}: the value must be printable, at most {MAX_LABEL_CHARS} "
                               "characters")
    return key, value


def parse_labels(items: list[str]) -> dict[str, str]:
    if len(items) > MAX_LABELS:
        raise TokenFormatError(f"too many labels ({len(items)}, at most {MAX_LABELS})")
    labels: dict[str, str] = {}
    for item in items:
        key, value = parse_label(item)
        if key in labels:
            raise TokenFormatError(f"label {key!r} given twice")
        labels[key] = value
    return labels


def parse_scopes(text: str) -> tuple[str, ...]:
    """`read`, `read,call`, `admin` -> sorted unique scopes; unknown scopes are an error naming them."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise TokenFormatError(f"no scope given (expected one or more of {', '.join(SCOPES)})")
    for item in items:
        if item not in SCOPES:
            raise TokenFormatError(f"unknown scope {item!r} (expected {', '.join(SCOPES)})")
    return tuple(s for s in SCOPES if s in items)


def scope_allows(granted: tuple[str, ...] | list[str], needed: str) -> bool:
    """`admin` allows everything; `call` allows reading too (a caller must see whom it calls)."""
    if "admin" in granted:
        return True
    if needed == "read":
        return "read" in granted or "call" in granted
    return needed in granted
