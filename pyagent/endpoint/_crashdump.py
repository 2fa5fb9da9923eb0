"""Crash reports at the endpoint: parse what an agent uploaded, compute a signature, group.

Pure functions, no I/O. Input: the minidump bytes (Crashpad's, or None when the agent could not write one), the host's
minimal crash record (text), and the Python tracebacks faulthandler wrote. The minidump's standard streams are read
with the PyPI `minidump` package; Crashpad's own stream (0x43500001, MinidumpCrashpadInfo) is read here for the
annotations the host passed to crashpad_handler (agent id, host version, bundle versions, platform).

Signature: the signal, the faulting module+offset, and the top native frames (module+offset; from a scan of the
crashing thread's stack for return addresses inside modules, since there is no unwind info at the endpoint), plus the
innermost Python function names when a Python traceback came with the report. Module offsets do not change with ASLR,
so the same crash in the same build gives the same signature.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from pyagent._crashrecord import parse_record

CRASHPAD_INFO_STREAM = 0x43500001
EXCEPTION_STREAM = 6
TOP_FRAMES = 4
STACK_SCAN_BYTES = 4096
MAX_DUMP_BYTES = 256 << 20

SIGNAL_NAMES = {4: "SIGILL", 5: "SIGTRAP", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 11: "SIGSEGV", 31: "SIGSYS"}

# AMD64 CONTEXT offsets (winnt.h layout, which Crashpad writes for x86-64).
_AMD64_RSP = 0x98
_AMD64_RIP = 0xF8
_AMD64_CONTEXT_SIZE = 0x4D0


class CrashDumpError(ValueError):
    """The dump is not a minidump this module can read (the message says what is wrong)."""


def _u32(data: bytes, offset: int) -> int:
    if offset < 0 or offset + 4 > len(data):
        raise CrashDumpError(f"truncated minidump: needs 4 bytes at offset {offset}, has {len(data)}")
    return int(struct.unpack_from("<I", data, offset)[0])


def _u64(data: bytes, offset: int) -> int:
    if offset < 0 or offset + 8 > len(data):
        raise CrashDumpError(f"truncated minidump: needs 8 bytes at offset {offset}, has {len(data)}")
    return int(struct.unpack_from("<Q", data, offset)[0])


def _streams(data: bytes) -> dict[int, tuple[int, int]]:
    """Stream type -> (rva, size) from the minidump header's directory."""
    if len(data) < 32 or data[:4] != b"MDMP":
        raise CrashDumpError("not a minidump (no MDMP signature)")
    count, rva = _u32(data, 8), _u32(data, 12)
    if count > 4096:
        raise CrashDumpError(f"implausible stream count {count}")
    out: dict[int, tuple[int, int]] = {}
    for i in range(count):
        base = rva + 12 * i
        kind, size, where = _u32(data, base), _u32(data, base + 4), _u32(data, base + 8)
        if where + size > len(data):
            raise CrashDumpError(f"stream {kind:#x} lies outside the file")
        out[kind] = (where, size)
    return out


def _utf8_string(data: bytes, rva: int) -> str:
    length = _u32(data, rva)
    if rva + 4 + length > len(data):
        raise CrashDumpError("annotation string lies outside the file")
    return data[rva + 4:rva + 4 + length].decode("utf-8", errors="replace")


def crashpad_annotations(data: bytes) -> dict[str, str]:
    """The simple annotations of Crashpad's MinidumpCrashpadInfo stream (empty when the stream is absent)."""
    streams = _streams(data)
    if CRASHPAD_INFO_STREAM not in streams:
        return {}
    rva, size = streams[CRASHPAD_INFO_STREAM]
    # version u32, report_id UUID(16), client_id UUID(16), simple_annotations {DataSize u32, Rva u32}, ...
    if size < 44:
        raise CrashDumpError("Crashpad info stream too short")
    dict_size, dict_rva = _u32(data, rva + 36), _u32(data, rva + 40)
    if not dict_size:
        return {}
    count = _u32(data, dict_rva)
    if count > 10000:
        raise CrashDumpError(f"implausible annotation count {count}")
    out: dict[str, str] = {}
    for i in range(count):
        key_rva, value_rva = _u32(data, dict_rva + 4 + 8 * i), _u32(data, dict_rva + 8 + 8 * i)
        out[_utf8_string(data, key_rva)] = _utf8_string(data, value_rva)
    return out


def _module_at(modules: list[dict[str, Any]], address: int) -> str | None:
    for m in modules:
        if m["base"] <= address < m["base"] + m["size"]:
            return f"{m['name'].rsplit('/', 1)[-1]}+{address - m['base']:#x}"
    return None


def _parse_minidump(data: bytes) -> dict[str, Any]:
    from minidump.minidumpfile import MinidumpFile  # type: ignore[import-untyped]  # imported on use

    if len(data) > MAX_DUMP_BYTES:
        raise CrashDumpError(f"minidump of {len(data)} bytes exceeds the {MAX_DUMP_BYTES}-byte limit")
    streams = _streams(data)
    if EXCEPTION_STREAM not in streams:
        raise CrashDumpError("the minidump has no exception stream")
    try:
        mf = MinidumpFile()
        mf.file_handle = io.BytesIO(data)
        # MinidumpFile._parse() also looks for a Windows PEB and logs a traceback on the root logger when there is
        # none (always, on Linux): run only its header and directory steps.
        mf._MinidumpFile__parse_header()
        mf._MinidumpFile__parse_directories()
    except Exception as exc:  # the package raises whatever its parsers hit on malformed input
        raise CrashDumpError(f"cannot parse the minidump: {type(exc).__name__}: {exc}") from None
    exc_stream = mf.exception.exception_records[0] if mf.exception and mf.exception.exception_records else None
    if exc_stream is None:
        raise CrashDumpError("the minidump has no exception record")
    record = exc_stream.ExceptionRecord
    modules = [{"name": str(m.name), "base": int(m.baseaddress), "size": int(m.size)}
               for m in (mf.modules.modules if mf.modules else [])]
    tid = int(exc_stream.ThreadId)
    ip = sp = None
    ctx = exc_stream.ThreadContext
    if ctx is not None and ctx.DataSize >= _AMD64_CONTEXT_SIZE:
        sp, ip = _u64(data, ctx.Rva + _AMD64_RSP), _u64(data, ctx.Rva + _AMD64_RIP)
    frames: list[str] = []
    if ip is not None:
        frames.append(_module_at(modules, ip) or f"?+{ip:#x}")
    if sp is not None and mf.threads:
        for t in mf.threads.threads:
            if int(t.ThreadId) != tid or t.Stack is None:
                continue
            start, size, rva = int(t.Stack.StartOfMemoryRange), int(t.Stack.DataSize), int(t.Stack.Rva)
            begin = max(0, sp - start)
            end = min(size, begin + STACK_SCAN_BYTES)
            for off in range(begin - begin % 8, end - 7, 8):
                value = _u64(data, rva + off)
                where = _module_at(modules, value)
                if where and where not in frames:
                    frames.append(where)
                if len(frames) >= TOP_FRAMES:
                    break
    return {"signal": int(record.ExceptionCode_raw if record.ExceptionCode_raw is not None else record.ExceptionCode),
            "code": int(record.ExceptionFlags), "address": int(record.ExceptionAddress), "crashing_thread": tid,
            "instruction_pointer": ip, "modules": modules, "frames": frames,
            "annotations": crashpad_annotations(data)}


_BT_FRAME = re.compile(r"^(?P<path>[^(\[]+)\((?P<sym>[^)]*)\)\s*\[(?P<addr>0x[0-9a-f]+)\]$")
_PY_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line \d+ in (?P<func>\S+)')


def record_frames(backtrace: str) -> list[str]:
    """Frames of a record's backtrace after the signal trampoline (libc's __restore_rt), as module(symbol)."""
    parsed = []
    for line in backtrace.splitlines():
        m = _BT_FRAME.match(line.strip())
        if m:
            parsed.append((m["path"].rsplit("/", 1)[-1], m["sym"]))
    start = next((i + 1 for i, (mod, _) in enumerate(parsed) if mod.startswith("libc.")), 0)
    return [f"{mod}({sym})" for mod, sym in parsed[start:start + TOP_FRAMES]]


def python_frames(traceback: str) -> list[str]:
    """The innermost Python functions of the crashing thread ("Current thread" / first thread block)."""
    out: list[str] = []
    in_block = False
    for line in traceback.splitlines():
        if line.startswith(("Current thread", "Thread ", "Fatal Python error")):
            if in_block and out:
                break
            in_block = line.startswith("Current thread") or not out
            continue
        m = _PY_FRAME.match(line)
        if in_block and m:
            out.append(f"{m['file'].rsplit('/', 1)[-1]}:{m['func']}")
        if len(out) >= 3:
            break
    return out


def parse_report(dump: bytes | None, record: str = "", python_traceback: str = "") -> dict[str, Any]:
    """A structured report: signal, signal_name, code, address, crashing_thread, modules, frames, annotations,
    python_traceback, record, dump_error, signature. Raises CrashDumpError only when there is nothing to go on."""
    meta = parse_record(record) if record else {}
    report: dict[str, Any] = {"signal": None, "code": None, "address": None, "crashing_thread": None,
                              "instruction_pointer": None, "modules": [], "frames": [], "annotations": {},
                              "python_traceback": python_traceback, "record": meta, "dump_error": None}
    if dump:
        try:
            report.update(_parse_minidump(dump))
        except CrashDumpError as exc:
            report["dump_error"] = str(exc)
    if report["signal"] is None and "signal" in meta:
        report["signal"] = int(meta["signal"].split()[0])
        report["code"] = int(meta.get("code", "0"))
        report["address"] = int(meta.get("address", "0x0"), 16)
        report["crashing_thread"] = int(meta["tid"]) if meta.get("tid", "").isdigit() else None
    if not report["frames"] and meta.get("backtrace"):
        report["frames"] = record_frames(meta["backtrace"])
    if not report["annotations"]:
        report["annotations"] = {k[len("annotation."):]: v for k, v in meta.items() if k.startswith("annotation.")}
    if report["signal"] is None:
        raise CrashDumpError(report["dump_error"] or "neither a minidump nor a crash record with a signal")
    report["signal_name"] = SIGNAL_NAMES.get(report["signal"], f"signal {report['signal']}")
    report["python_frames"] = python_frames(python_traceback)
    report["signature"] = signature(report)
    return report


def signature(report: Mapping[str, Any]) -> str:
    """A short stable id for "the same crash": signal + faulting location + top frames + innermost Python frames."""
    parts = [report.get("signal_name") or str(report.get("signal")), *report.get("frames", [])[:TOP_FRAMES],
             *report.get("python_frames", [])]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def group(reports: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Reports by signature, in the order first seen."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for report in reports:
        out.setdefault(str(report["signature"]), []).append(report)
    return out
