"""Human-readable output: tables, durations, agent records."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

SHORT_ID = 8


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    lines = ["  ".join(cell.ljust(w) for w, cell in zip(widths, line)).rstrip() for line in (headers, *rows)]
    return "\n".join(lines)


def short_ids(ids: Sequence[str]) -> dict[str, str]:
    """The shortest prefixes (at least SHORT_ID characters) that still tell these ids apart."""
    length = SHORT_ID
    while length < max((len(i) for i in ids), default=0):
        prefixes = [i[:length] for i in ids]
        if len(set(prefixes)) == len(set(ids)):
            break
        length += 4
    return {i: i[:length] for i in ids}


def ago(ms: Any, now: float | None = None) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    seconds = (time.time() if now is None else now) - ms / 1000
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def millis(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.2f} ms" if abs(value) < 100 else f"{value:.0f} ms"


def timestamp(ms: Any) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def bundles(record: dict[str, Any]) -> str:
    items = record.get("bundles") or []
    return ", ".join(f"{b.get('name')}@{b.get('version')}" for b in items if isinstance(b, dict)) or "-"


def agents_table(records: Sequence[dict[str, Any]]) -> str:
    ids = short_ids([str(r.get("agent_id")) for r in records])
    rows = [
        [ids[str(r.get("agent_id"))], str(r.get("name")), str(r.get("status") or "active"),
         "yes" if r.get("connected") else "no",
         str(r.get("host_version") or "-"), bundles(r), millis(r.get("latency_ms")), ago(r.get("last_seen"))]
        for r in records
    ]
    return table(["ID", "NAME", "STATUS", "CONNECTED", "HOST", "BUNDLES", "LATENCY", "LAST SEEN"], rows)


def agent_details(r: dict[str, Any]) -> str:
    def pairs(value: Any) -> str:
        if not isinstance(value, dict) or not value:
            return "-"
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))

    bundle_lines = [
        f"{b.get('name')} {b.get('version')}" + (f" (agents: {', '.join(b['agents'])})" if b.get("agents") else "")
        for b in (r.get("bundles") or []) if isinstance(b, dict)
    ]
    connected = "yes" if r.get("connected") else "no"
    fields = [
        ("agent id", str(r.get("agent_id"))),
        ("name", str(r.get("name"))),
        ("status", str(r.get("status") or "active")
         + (f" (certificate until {timestamp(r['cert_not_after'])})" if r.get("cert_not_after") else "")),
        ("connected", f"{connected} (peer {r['peer']})" if r.get("peer") else connected),
        ("host", f"{r.get('host_version') or '-'} (Python {r.get('python_version') or '-'})"),
        ("bundles", "; ".join(bundle_lines) or "-"),
        ("labels", pairs(r.get("labels"))),
        ("platform", pairs(r.get("platform"))),
        ("features", pairs(r.get("features"))),
        ("first seen", f"{timestamp(r.get('first_seen'))} ({ago(r.get('first_seen'))})"),
        ("last seen", f"{timestamp(r.get('last_seen'))} ({ago(r.get('last_seen'))})"),
        ("latency", millis(r.get("latency_ms"))),
        ("clock skew", millis(r.get("skew_ms"))),
        ("python lag", millis(r.get("py_lag_ms"))),
    ]
    width = max(len(k) for k, _ in fields) + 1
    return "\n".join(f"{(k + ':').ljust(width)} {v}" for k, v in fields)


def result_text(value: Any) -> str:
    """A call's result: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, ensure_ascii=False)
