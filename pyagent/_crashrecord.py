"""The host's crash record (csrc/crash.c writes it with signal-safe calls): read by the runtime to collect pending
reports and by the endpoint to parse them, so its format is read in one place."""

from __future__ import annotations


def parse_record(text: str) -> dict[str, str]:
    """`key: value` lines; annotations as `annotation.<key>`; the backtrace section whole under `backtrace`."""
    meta: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == "backtrace:":
            j = i + 1
            while j < len(lines) and lines[j] != "end backtrace":
                j += 1
            meta["backtrace"] = "\n".join(lines[i + 1:j])
            i = j + 1
            continue
        key, sep, value = line.partition(": ")
        if sep:
            if key == "annotation":
                k, _, v = value.partition("=")
                meta[f"annotation.{k}"] = v
            else:
                meta[key] = value
        i += 1
    return meta
