"""The ledger reporter (`_ledger.py`): the supervisor's `updates.jsonl` and `restarts.jsonl` become outbox events
once each, across worker restarts, with torn or garbage lines skipped."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from pyagent.runtime._ledger import LedgerReporter
from pyagent.runtime._outbox import Outbox


def _update(seq: int, state: str, **kw: Any) -> str:
    rec = {"seq": seq, "time": "2026-01-01T00:00:00.000Z", "unix_ms": 1, "kind": "bundle", "name": "hello",
           "version": "1.2.0", "previous": "1.1.0", "state": state, "detail": "", "rollout": "r-1", **kw}
    return json.dumps(rec) + "\n"


def _restart(seq: int, reason: str = "exit_code") -> str:
    return json.dumps({"seq": seq, "reason": reason, "exit_code": 2, "signal": None, "restarts": seq}) + "\n"


def test_new_records_are_reported_once_and_remembered(tmp_path: Path) -> None:
    updates = tmp_path / "updates"
    updates.mkdir()
    (updates / "updates.jsonl").write_text(_update(1, "probation") + _update(2, "committed"))
    (tmp_path / "restarts.jsonl").write_text(_restart(4))
    outbox = Outbox(None)
    reporter = LedgerReporter(tmp_path, outbox.put)
    assert reporter.poll() == 3
    assert reporter.poll() == 0  # nothing new
    events = outbox.pending()
    assert [(e["agent"], e["event"]) for e in events] == [("pyagent", "update.state")] * 2 + \
        [("pyagent", "supervisor.restart")]
    assert events[0]["data"] == {"kind": "bundle", "name": "hello", "version": "1.2.0", "state": "probation",
                                 "detail": "", "rollout": "r-1", "previous": "1.1.0"}
    assert events[2]["data"]["reason"] == "exit_code" and events[2]["data"]["seq"] == 4
    assert json.loads((updates / "reported.json").read_text()) == {"updates": 2, "restarts": 4}

    # the next worker: only what is new since
    with open(updates / "updates.jsonl", "a") as f:
        f.write(_update(3, "rolled_back", detail="exit code 2"))
    again = Outbox(None)
    assert LedgerReporter(tmp_path, again.put).poll() == 1
    [event] = again.pending()
    assert event["data"]["state"] == "rolled_back" and event["data"]["detail"] == "exit code 2"


def test_torn_and_garbage_lines_are_skipped(tmp_path: Path, caplog: Any) -> None:
    (tmp_path / "restarts.jsonl").write_text(_restart(1) + "garbage\n" + '["seq"]\n' + '{"seq": "2"}\n'
                                             + _restart(3) + '{"seq": 4, "rea')
    outbox = Outbox(None)
    reporter = LedgerReporter(tmp_path, outbox.put)
    assert reporter.poll() == 2
    assert [e["data"]["seq"] for e in outbox.pending()] == [1, 3]
    assert reporter.lines_skipped == 4
    assert "line 2 is not a record with a seq" in caplog.text
    # the torn last line completed by the supervisor's write: reported now
    (tmp_path / "restarts.jsonl").write_text(_restart(1) + _restart(3) + _restart(4))
    assert reporter.poll() == 1


def test_unreadable_reported_file_and_a_restarted_sequence(tmp_path: Path) -> None:
    (tmp_path / "updates").mkdir()
    (tmp_path / "updates" / "reported.json").write_text("{not json")
    (tmp_path / "restarts.jsonl").write_text(_restart(7))
    outbox = Outbox(None)
    reporter = LedgerReporter(tmp_path, outbox.put)
    assert reporter.poll() == 1
    (tmp_path / "restarts.jsonl").write_text(_restart(1))  # the file was replaced: seq starts again
    assert reporter.poll() == 1
    assert [e["data"]["seq"] for e in outbox.pending()] == [7, 1]


def test_run_polls_until_cancelled(tmp_path: Path) -> None:
    outbox = Outbox(None)
    reporter = LedgerReporter(tmp_path, outbox.put)

    async def go() -> None:
        task = asyncio.get_running_loop().create_task(reporter.run(interval=0.02))
        await asyncio.sleep(0.05)
        (tmp_path / "restarts.jsonl").write_text(_restart(1))
        for _ in range(100):
            if outbox.pending():
                break
            await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.wait({task})

    asyncio.run(go())
    assert [e["event"] for e in outbox.pending()] == ["supervisor.restart"]
