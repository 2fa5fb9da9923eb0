"""pyagent.runtime._log: key=value lines through the host logger."""

from __future__ import annotations

import logging

import pytest

from pyagent.runtime import FakeHost, HostLogHandler, log_event
from pyagent.runtime._log import LogSetup, format_record, quote


@pytest.mark.parametrize(("value", "text"), [
    ("plain", "plain"),
    ("a.b-c/d:1", "a.b-c/d:1"),
    ("two words", '"two words"'),
    ("", '""'),
    ('say "hi"', '"say \\"hi\\""'),
    ("k=v", '"k=v"'),
    ("line1\nline2", '"line1\\nline2"'),
    ("back\\slash", '"back\\\\slash"'),
    (42, "42"),
    ("héllo", "héllo"),
])
def test_quote(value: object, text: str) -> None:
    assert quote(value) == text


def record(level: int = logging.INFO, msg: str = "bundle loaded", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("pyagent.runtime", level, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


def test_format_record() -> None:
    rec = record(event="bundle.loaded", fields={"bundle": "hello", "version": "1.0.0", "path": "/a b"})
    assert format_record(rec) == ('logger=pyagent.runtime event=bundle.loaded bundle=hello version=1.0.0 '
                                  'path="/a b" msg="bundle loaded"')
    assert format_record(record(logging.WARNING, "x")) == "logger=pyagent.runtime msg=x"


def test_exceptions_stay_on_one_line() -> None:
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = format_record(rec)
    assert "\n" not in line
    assert line.startswith("logger=x msg=failed exc=\"Traceback")
    assert "ValueError: bad\\nthing" in line


def test_handler_hands_lines_to_the_host(fake_host: FakeHost) -> None:
    logger = logging.getLogger("pyagent.test.handler")
    handler = HostLogHandler(fake_host.log)
    logger.addHandler(handler)
    logger.setLevel(1)
    logger.propagate = False
    try:
        log_event(logger, logging.INFO, "thing.done", "done", n=3)
        logger.debug("debug")
        logger.critical("critical")
        logger.log(5, "very low")
        logger.log(25, "between")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    assert fake_host.logs == [
        (20, "logger=pyagent.test.handler event=thing.done n=3 msg=done"),
        (10, "logger=pyagent.test.handler msg=debug"),
        (40, "logger=pyagent.test.handler msg=critical"),
        # other levels keep their own names (which other code may register) at the host level below them
        (10, 'logger=pyagent.test.handler msg="very low"'),
        (20, 'logger=pyagent.test.handler msg=between'),
    ]


def test_handler_never_raises(capsys: pytest.CaptureFixture[str]) -> None:
    def broken(level: int, line: str) -> None:
        raise OSError("host log gone")

    handler = HostLogHandler(broken)
    handler.handle(record())  # reported on stderr by logging.Handler.handleError, not raised
    assert "host log gone" in capsys.readouterr().err


def test_log_setup_installs_and_removes(fake_host: FakeHost) -> None:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    setup = LogSetup(fake_host.log, "warning")
    try:
        assert root.level == logging.WARNING
        logging.getLogger("some.library").warning("careful")
        logging.getLogger("some.library").info("not shown")
    finally:
        setup.close()
    assert root.level == level and root.handlers == handlers
    assert fake_host.logs == [(30, "logger=some.library msg=careful")]
